"""Writes that must stay off the request path: items are added at once (no I/O, no await), and one
background task writes whatever has gathered, in batches, until nothing is left. A failed write is
reported once (`on_error(exception, items lost)`) and its items are dropped: what is written here is
a record of requests, never something a request waits for."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batches(Generic[T]):
    def __init__(self, write: Callable[[list[T]], Awaitable[None]], on_error: Callable[[Exception, int], None]) -> None:
        self._write, self._on_error = write, on_error
        self._pending: list[T] = []
        self._task: asyncio.Future | None = None

    def add(self, item: T) -> None:
        self._pending.append(item)
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._write(batch)
                except Exception as e:
                    self._on_error(e, len(batch) + len(self._pending))
                    self._pending.clear()
        finally:
            self._task = None

    async def flushed(self) -> None:
        """Wait until everything added so far is written (tests, shutdown)."""
        while self._task is not None:
            await asyncio.shield(self._task)
