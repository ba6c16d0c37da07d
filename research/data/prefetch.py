"""Host rows of the coming training steps, computed ahead in a background thread.

The loop keeps one step in flight on the devices; while it waits for that step, a thread
computes the rows of the next `depth` steps that this host feeds (only its own ranges of the
global batch), so that reading, the objective's transform and packing overlap the device work
instead of adding to it. The thread mostly runs numpy and array_record reads and the loop
mostly waits on the devices, so the two rarely contend for the interpreter.
"""

import concurrent.futures
import time


class Prefetcher:

  def __init__(self, rows_of_step, ranges, first_step, stop_step, depth):
    """rows_of_step(step, lo, hi) -> dict of arrays; ranges: the (lo, hi) this host needs."""
    self._rows_of_step, self._ranges = rows_of_step, ranges
    self._stop_step, self._depth = stop_step, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='prefetch')
    self._futures = {}
    self.wait_s = 0.0  # Time the loop spent waiting for rows that were not ready.
    for step in range(first_step, min(first_step + depth, stop_step)):
      self._submit(step)

  def _compute(self, step):
    return {(lo, hi): self._rows_of_step(step, lo, hi) for lo, hi in self._ranges}

  def _submit(self, step):
    if step < self._stop_step and step not in self._futures:
      self._futures[step] = self._pool.submit(self._compute, step)

  def rows(self, step):
    """rows(lo, hi) of `step` (one of this host's ranges), and the next step queued."""
    self._submit(step)
    future = self._futures.pop(step)
    started = time.perf_counter()
    computed = future.result()  # Re-raises a data error of that step here.
    self.wait_s += time.perf_counter() - started
    self._submit(step + self._depth)
    return lambda lo, hi: computed[(lo, hi)]

  def close(self):
    for future in self._futures.values():
      future.cancel()
    self._pool.shutdown(wait=True)
