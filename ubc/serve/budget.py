"""The server-wide memory budget of the volumes being decoded and scored at once (issue 26):
each request reserves what its volume will take (``ubc.serve.upload.decode_cost``) before it
is decoded and gives it back when it is answered; a request that finds no room waits for
it, at most ``wait_s`` seconds, then is refused (``Overloaded``: HTTP 503)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ubc.scoring.predictor import Overloaded

__all__ = ["DecodeBudget"]


class DecodeBudget:
    """``total`` bytes shared by the requests of one process."""

    def __init__(self, total: int, wait_s: float) -> None:
        if total < 1:
            raise ValueError(f"the decode budget must be positive, got {total}")
        self.total, self.wait_s = total, wait_s
        self.in_use = 0
        self._room = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` (at most ``total``) of the budget for the body of the block."""
        if nbytes > self.total:
            raise ValueError(f"{nbytes} bytes is more than the whole budget of {self.total}")
        async with self._room:
            try:
                await asyncio.wait_for(
                    self._room.wait_for(lambda: self.in_use + nbytes <= self.total),
                    self.wait_s)
            except asyncio.TimeoutError:
                raise Overloaded(f"the server is decoding {self.in_use:,} bytes of volumes "
                                 f"(its budget is {self.total:,}); retry later") from None
            self.in_use += nbytes
        try:
            yield
        finally:
            async with self._room:
                self.in_use -= nbytes
                self._room.notify_all()
