"""A thread that notices a stalled training step.

The loop calls `beat()` each time a step is known to have finished on the device. When the step
after it has taken `slow_factor` times the median of the recent steps (and at least `min_s`),
every thread's Python stack is written to stderr, once per stalled step: on a multi-host job each
process does so, which shows where each one waits. A step that takes `exit_after_s` ends the
process with exit code 1, so that a hang nothing else notices (a wedged collective) frees its
machines; a lost peer is noticed sooner by the runtime's heartbeat (watchdog.peer_timeout_s).
Evaluation and checkpointing run `paused()`, and nothing is judged before the first beat (the
first step compiles).
"""

import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque


def _exit_now(code):
  sys.stderr.flush()
  os._exit(code)  # The main thread may be stuck in a collective: no clean exit can be awaited.


class Watchdog:

  def __init__(self, slow_factor, min_s, exit_after_s, window=50, poll_s=1.0, out=None,
               exit_now=_exit_now):
    self.slow_factor, self.min_s, self.exit_after_s = slow_factor, min_s, exit_after_s
    self.poll_s = poll_s
    self._out = out or sys.stderr
    self._exit_now = exit_now
    self._durations = deque(maxlen=window)
    self._lock = threading.Lock()
    self._last = None  # time.monotonic() of the last beat; None before the first and while paused.
    self._step = None
    self._reported = None  # The step whose stall was last reported.
    self._done = threading.Event()
    self._thread = None

  def start(self):
    self._thread = threading.Thread(target=self._watch, name='watchdog', daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self._done.set()
    if self._thread is not None:
      self._thread.join()

  def beat(self, step):
    """Step `step` has finished."""
    now = time.monotonic()
    with self._lock:
      if self._last is not None:
        self._durations.append(now - self._last)
      self._last, self._step = now, step

  @contextlib.contextmanager
  def paused(self):
    """Work that is not a training step (evaluation, saving): not timed, not judged."""
    with self._lock:
      self._last = None
    try:
      yield
    finally:
      with self._lock:
        if self._step is not None:
          self._last = time.monotonic()

  def _watch(self):
    while not self._done.wait(self.poll_s):
      with self._lock:
        if self._last is None:
          continue
        waited = time.monotonic() - self._last
        step = self._step + 1
        median = statistics.median(self._durations) if len(self._durations) >= 3 else None
      if 0 < self.exit_after_s <= waited:
        self._say(f'watchdog: step {step} has not finished after {waited:.0f} s (watchdog.'
                  f'exit_after_s={self.exit_after_s:g}); Python stacks follow, then this '
                  f'process (index {_process_index()}) exits with code 1.')
        self._exit_now(1)
        return
      if (median is not None and waited >= max(self.slow_factor * median, self.min_s)
          and self._reported != step):
        self._reported = step
        self._say(f'watchdog: step {step} has taken {waited:.1f} s, {waited / median:.0f}x the '
                  f'median step ({median:.3g} s); Python stacks of process {_process_index()} '
                  'follow.')

  def _say(self, message):
    print(message, file=self._out, flush=True)
    faulthandler.dump_traceback(file=self._out, all_threads=True)
    self._out.flush()


def _process_index():
  import jax  # Imported late: this module is also used without a backend.
  return jax.process_index()
