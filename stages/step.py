"""The one result type of a stateful stage: what to publish, and what to release.

A stateful stage (the temporal windows, the fuser) is called with one input at a time and
answers with a ``Step`` (after bytewax's ``StatefulLogic``, which returns emitted items and
does no IO itself). The runtime publishes ``outputs``, then acknowledges the inputs whose
tokens are in ``release``: their effect is now in published outputs, so a crash before
then replays them and rebuilds the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

#: What a stage emits (``Segment`` for the windows, any ``Message`` for the fuser).
Out = TypeVar("Out")


@dataclass
class Step(Generic[Out]):
    """What one call of a stateful stage produced.

    Attributes:
        outputs: messages to publish, in order (closed windows in index order; verdicts).
        release: tokens of inputs no longer needed (safe to acknowledge once ``outputs``
            are published), in order.
        spent_blobs: blob keys of frames no stage will read again (the fuser's closed
            windows, less the key frames the report and vlm show).
    """

    outputs: list[Out] = field(default_factory=list)
    release: list[Any] = field(default_factory=list)
    spent_blobs: list[str] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        """Append another step's outputs, releases and spent blobs."""
        self.outputs.extend(other.outputs)
        self.release.extend(other.release)
        self.spent_blobs.extend(other.spent_blobs)
