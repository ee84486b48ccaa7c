"""msgpack encoding of schema messages, with kind and schema version in each entry.

Wire form: a msgpack map ``{"k": kind, "v": version, "p": payload}``. Never pickle:
whatever arrives is validated against the schema of its kind before any stage sees it.
"""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import ValidationError

from stream.errors import DecodeError
from stream.schemas import MESSAGE_TYPES, Message

M = TypeVar("M", bound=Message)

REGISTRY: dict[str, type[Message]] = {cls.KIND: cls for cls in MESSAGE_TYPES}


def encode(message: Message) -> bytes:
    """Pack a message with its kind and schema version.

    Parameters:
        message: any schema message.

    Returns:
        The msgpack bytes to put in a stream entry.
    """
    payload = message.model_dump(mode="python", exclude_defaults=True)
    return msgpack.packb({"k": message.KIND, "v": message.VERSION, "p": payload}, use_bin_type=True)


def decode(data: bytes, expect: type[M] | tuple[type[Message], ...] | None = None) -> M:
    """Unpack and validate one entry.

    Parameters:
        data: the entry's bytes.
        expect: the message type(s) the caller accepts; ``None`` accepts any kind.

    Returns:
        The validated message.

    Raises:
        DecodeError: garbage bytes, an unknown kind, a schema version this code does
            not know, a kind the caller does not accept, or fields that do not validate.
    """
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        reason = f"not a msgpack entry ({type(exc).__name__}: {exc})"
        raise DecodeError(reason, data) from exc
    if not isinstance(envelope, dict) or not {"k", "v", "p"} <= envelope.keys():
        reason = "entry has no kind/version/payload envelope"
        raise DecodeError(reason, data)
    kind, version, payload = envelope["k"], envelope["v"], envelope["p"]
    cls = REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        reason = f"unknown message kind {kind!r}"
        raise DecodeError(reason, data)
    if version != cls.VERSION:
        reason = f"{kind!r} schema version {version!r}, this worker reads version {cls.VERSION}"
        raise DecodeError(reason, data)
    accepted = expect if isinstance(expect, tuple) else (expect,) if expect else None
    if accepted and cls not in accepted:
        names = ", ".join(repr(c.KIND) for c in accepted)
        reason = f"expected {names}, got {kind!r}"
        raise DecodeError(reason, data)
    try:
        return cls.model_validate(payload)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        reason = f"invalid {kind!r} v{version}: {problems}"
        raise DecodeError(reason, data) from exc
