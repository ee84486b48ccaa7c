"""The frame blob store, run against every implementation (see ``conftest.blobs``)."""

from __future__ import annotations

import asyncio

from brokers.blobs import BlobStore


async def test_put_many_then_get_many_returns_blobs_in_key_order(blobs: BlobStore) -> None:
    # Given three blobs stored in one call
    await blobs.put_many({"d:front:1": b"one", "d:front:2": b"two", "d:back:1": b"\x00\xff"})
    # When fetched in another order; Then each comes back under its key
    assert await blobs.get_many(["d:back:1", "d:front:2", "d:front:1"]) == [b"\x00\xff", b"two", b"one"]


async def test_missing_keys_come_back_as_none(blobs: BlobStore) -> None:
    # Given one stored blob; When it and an unknown key are fetched; Then the unknown is None
    await blobs.put("a", b"x")
    assert await blobs.get_many(["nope", "a"]) == [None, b"x"]
    assert await blobs.get_many([]) == []


async def test_blobs_expire_after_their_ttl(blobs: BlobStore) -> None:
    # Given a blob with a one-second TTL and one with the default
    await blobs.put("short", b"x", ttl_s=1)
    await blobs.put("long", b"y")
    # When its TTL has passed
    await asyncio.sleep(1.1)
    # Then only the short one is gone
    assert await blobs.get_many(["short", "long"]) == [None, b"y"]


async def test_delete_many_counts_existing_blobs(blobs: BlobStore) -> None:
    # Given two blobs; When three keys are deleted; Then two existed and none remains
    await blobs.put_many({"a": b"1", "b": b"2"})
    assert await blobs.delete_many(["a", "b", "c"]) == 2
    assert await blobs.get_many(["a", "b"]) == [None, None]


async def test_bytes_in_flight_grow_on_put_and_shrink_on_release(blobs: BlobStore) -> None:
    # Given 10 + 20 bytes put
    await blobs.put_many({"a": b"x" * 10, "b": b"y" * 20})
    grown = await blobs.bytes_in_flight()
    # When a consumer releases 10
    await blobs.release(10)
    # Then 20 stay in flight
    assert (grown, await blobs.bytes_in_flight()) == (30, 20)


async def test_bytes_in_flight_never_go_below_zero(blobs: BlobStore) -> None:
    # Given 5 bytes in flight; When more is released than was put; Then the count is zero
    await blobs.put("a", b"12345")
    await blobs.release(50)
    assert await blobs.bytes_in_flight() == 0


async def test_a_versioned_put_never_overwrites_a_higher_version(blobs: BlobStore) -> None:
    # Given a blob stored at version 4
    assert await blobs.put_versioned("ckpt", b"four", 4, ttl_s=60)
    # When a writer that fell behind puts version 2, and then one at 4 and at 6 come
    behind = await blobs.put_versioned("ckpt", b"two", 2, ttl_s=60)
    assert await blobs.get("ckpt") == b"four"
    same = await blobs.put_versioned("ckpt", b"four again", 4, ttl_s=60)
    ahead = await blobs.put_versioned("ckpt", b"six", 6, ttl_s=60)
    # Then the older one was refused, the equal and the newer ones stored
    assert (behind, same, ahead) == (False, True, True)
    assert await blobs.get("ckpt") == b"six"
    assert await blobs.bytes_in_flight() == 0  # not frames in flight
