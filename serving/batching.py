"""Micro-batching of the nhle model server: concurrent small requests gathered into one ONNX
Runtime call (serving.micro_batching, off by default; docs/benchmarks.md section 8 says why).

A request of fewer than `max_images` images is queued with the model it read (so a hot swap
never mixes versions in one call); one thread takes the first waiting request, gathers others
until the call holds `max_images` images or `wait_ms` has passed since that first one, runs the
call for each model present and hands every request its own rows. Larger requests run directly
(LoadedModel.gathered decides).

Never imports torch.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np


class MicroBatcher:
    def __init__(self, max_images: int, wait_ms: float):
        self.max_images, self.wait_seconds = max_images, wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self.calls = self.images = 0  # for /model: how much gathering happened
        self._thread = threading.Thread(target=self._run, name="nhle-micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, model, x: np.ndarray) -> Future:
        """Queue x (fewer than max_images images) for the next call on `model`; the Future gets its rows."""
        done: Future = Future()
        self._queue.put((model, x, done))
        return done

    def stop(self):
        self._queue.put(None)

    def _gather(self, first) -> list:
        waiting, n = [first], len(first[1])
        deadline = time.monotonic() + self.wait_seconds
        while n < self.max_images:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # stop: finish what was gathered, then end
                self._queue.put(None)
                break
            if n + len(item[1]) > self.max_images:
                self._queue.put(item)  # goes first in the next call (order among requests is free)
                break
            waiting.append(item)
            n += len(item[1])
        return waiting

    def _run(self):
        while True:
            first = self._queue.get()
            if first is None:
                return
            waiting = self._gather(first)
            for model in {id(m): m for m, _, _ in waiting}.values():
                mine = [(x, done) for m, x, done in waiting if m is model]
                try:
                    p = model.compute(np.concatenate([x for x, _ in mine]))
                except Exception as err:  # each request gets the failure, the thread goes on
                    for _, done in mine:
                        done.set_exception(err)
                    continue
                self.calls += 1
                self.images += len(p)
                start = 0
                for x, done in mine:
                    done.set_result(p[start : start + len(x)])
                    start += len(x)
