"""Dynamic batching for one tier: concurrent requests are grouped up to `max_batch` items or
`max_wait` seconds after the first, and each group runs in the tier's worker thread. The queue
holds at most `max_queue` items: one more raises `Overloaded` (the service answers 503)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from typing import Callable


class Overloaded(Exception):
  """The tier's queue is full."""


class Batcher:
  """`await submit(key, item)` -> the item's result. `run(key, items)` gets items of one `key`
  (the versions they are served with) and returns one result per item."""

  def __init__(self, name: str, run: Callable, *, max_batch: int, max_wait: float, max_queue: int,
               observe: Callable[[str, int, int, float], None] = lambda *a: None):
    self.name, self._run, self.observe = name, run, observe
    self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
    self._queue: collections.deque = collections.deque()
    self._ready: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"fmx-{name}")
    self.running = 0  # items in the batch being computed

  @property
  def depth(self) -> int:
    return len(self._queue) + self.running

  def start(self) -> None:
    self._ready = asyncio.Event()
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    self._pool.shutdown(wait=True)

  async def submit(self, key, item):
    if len(self._queue) >= self.max_queue:
      raise Overloaded(self.name)
    future = asyncio.get_running_loop().create_future()
    self._queue.append((key, item, future))
    self._ready.set()
    return await future

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      while not self._queue:
        self._ready.clear()
        await self._ready.wait()
      deadline = loop.time() + self.max_wait
      while len(self._queue) < self.max_batch and loop.time() < deadline:
        self._ready.clear()
        try:
          await asyncio.wait_for(self._ready.wait(), deadline - loop.time())
        except asyncio.TimeoutError:
          break
      key = self._queue[0][0]
      batch = []
      rest = collections.deque()
      while self._queue and len(batch) < self.max_batch:  # one key (versions) per batch
        entry = self._queue.popleft()
        if entry[2].done():  # its request was cancelled (timed out) while waiting
          continue
        (batch if entry[0] is key else rest).append(entry)
      self._queue.extendleft(reversed(rest))
      if not batch:
        continue
      self.running = len(batch)
      t0 = time.perf_counter()
      try:
        results = await loop.run_in_executor(self._pool, self._run, key, [e[1] for e in batch])
        for (_, _, fut), res in zip(batch, results):
          if not fut.done():
            fut.set_result(res)
      except Exception as e:  # pylint: disable=broad-except  # fails this batch's requests only
        for _, _, fut in batch:
          if not fut.done():
            fut.set_exception(e)
      finally:
        self.running = 0
        self.observe(self.name, len(batch), len(self._queue), time.perf_counter() - t0)
