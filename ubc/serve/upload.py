"""Reading an upload within bounds: the body's size is checked against the limit from its
Content-Length before a byte is read, then counted while it streams in, against a deadline;
what its volume will take in memory once decoded is read from its header alone and checked
against the service's per-request cap before it is decoded (issue 26)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from ubc.errors import UBCInputError
from ubc.io.nifti import declared_voxels
from ubc.io.readers import IN_MEMORY

__all__ = ["TooLarge", "TooSlow", "MIN_BODY_RATE", "WORKING_BYTES_PER_VOXEL", "check_length",
           "read_body", "decode_cost"]

MIN_BODY_RATE = 1024
"""Bytes per second a body may arrive at once its grace time is spent: each byte received
extends the deadline by 1/MIN_BODY_RATE s, so a client that sends at least this fast is never
cut off and one that trickles a byte a second is, when the grace time ends."""

WORKING_BYTES_PER_VOXEL = 4
"""What scoring a volume holds beside its voxels as stored: one float32 working copy (the
scaled intensities of a header with scl_slope, the mask in the input's grid)."""

_MB = 1024 * 1024


class TooLarge(Exception):
    """The upload, or the volume it declares, is over the service's limit (HTTP 413)."""


class TooSlow(Exception):
    """The body did not arrive in time (HTTP 408)."""


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse from the Content-Length header alone (before reading the body)."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise UBCInputError(f"Content-Length {content_length!r} is not a number") from None
    if length > limit:
        raise TooLarge(f"the upload is {length} bytes; the limit is {limit} bytes")


async def read_body(chunks: AsyncIterator[bytes], limit: int, grace_s: float) -> bytearray:
    """The body, counted as it streams in: ``TooLarge`` as soon as it passes ``limit``,
    ``TooSlow`` when it has not all come within ``grace_s`` seconds plus one second per
    ``MIN_BODY_RATE`` bytes received."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    buffer = bytearray()
    iterator = aiter(chunks)
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(anext(iterator), left)
        except StopAsyncIteration:
            return buffer
        except asyncio.TimeoutError:
            raise TooSlow(f"the body did not arrive in time: {len(buffer)} bytes in "
                          f"{grace_s + len(buffer) / MIN_BODY_RATE:.0f} s (a body must "
                          f"arrive at {MIN_BODY_RATE} bytes/s or faster)") from None
        buffer += chunk
        deadline += len(chunk) / MIN_BODY_RATE
        if len(buffer) > limit:
            raise TooLarge(f"the upload is over the limit of {limit} bytes")


def decode_cost(body: bytes | bytearray, limit: int) -> int:
    """Bytes of memory that decoding and scoring the volume in ``body`` will hold (its voxels
    as stored plus ``WORKING_BYTES_PER_VOXEL``), from its header alone; ``TooLarge`` over
    ``limit``, the loader's ``UBCInputError`` for a header it refuses."""
    shape, dtype = declared_voxels(body, name=IN_MEMORY)
    voxels = math.prod(shape)
    cost = voxels * (dtype.itemsize + WORKING_BYTES_PER_VOXEL)
    if cost > limit:
        size = " x ".join(map(str, shape))
        raise TooLarge(f"the volume's header declares {size} {dtype.name} voxels, "
                       f"{cost / _MB:,.0f} MB to decode and score; this service takes "
                       f"at most {limit / _MB:,.0f} MB per volume")
    return cost
