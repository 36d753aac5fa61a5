"""Reading an upload within bounds: the body's size is checked against the limit from its
Content-Length before a byte is read, then counted while it streams in. (What a .nii.gz
body may inflate to is bounded by the loader, ``ubc.io``, before it allocates.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ubc.errors import UBCInputError

__all__ = ["TooLarge", "check_length", "read_body"]


class TooLarge(Exception):
    """The upload is over the service's limit (HTTP 413)."""


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


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The body, counted as it streams in: ``TooLarge`` as soon as it passes ``limit``."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            raise TooLarge(f"the upload is over the limit of {limit} bytes")
    return bytes(buffer)
