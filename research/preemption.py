"""Stopping a run cleanly: SIGTERM (schedulers, preemption, TPU maintenance) or Ctrl-C.

Every process must stop after the same step, or the ones still training wait forever on a
collective. The loop asks `should_stop(step)` once after each step, on every process:

- One process: the first SIGTERM or SIGINT sets a flag; the loop saves the current step, waits
  for the save and exits 0. A second Ctrl-C then ends the process at once (the last finished
  checkpoint is kept: saves are atomic); a second SIGTERM is ignored, since schedulers and a
  dying sweep send one while the save runs (SIGKILL still ends it).
- Several processes: SIGTERM is left to JAX's runtime, whose preemption notifier (SIGTERM, and the
  maintenance notice on TPU VMs) tells the coordination service; `should_stop` then returns True
  on every process at the same step (`multihost_utils.reached_preemption_sync_point`). Ctrl-C is
  turned into a SIGTERM of the process itself, so it joins the same agreement.
"""

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager that turns SIGTERM / SIGINT into a stop the training loop polls."""

  def __init__(self, multi_process=None):
    self.multi_process = jax.process_count() > 1 if multi_process is None else multi_process
    self.signal = None  # The name of the first signal this process received, e.g. 'SIGTERM'.
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Only it may install handlers.
      # With several processes SIGTERM stays with the runtime's preemption notifier.
      signals = (signal.SIGINT,) if self.multi_process else _SIGNALS
      self._previous = {s: signal.signal(s, self._handle) for s in signals}
    return self

  def __exit__(self, *exc_info):
    for number, handler in self._previous.items():
      signal.signal(number, handler)

  def should_stop(self, step):
    """Whether to stop after `step`; on several processes, True at the same step on all."""
    if not self.multi_process:
      return self.signal is not None
    if not multihost_utils.reached_preemption_sync_point(step):
      return False
    self.signal = self.signal or 'SIGTERM'
    print(f'Preemption notice (SIGTERM or Ctrl-C on a process of the job): every process saves '
          f'step {step} and stops.', file=sys.stderr, flush=True)
    return True

  def stopped_before_start(self):
    """The signal received before training started, if this process may stop on its own (one
    process only: several must agree, which they do at the first step)."""
    return None if self.multi_process else self.signal

  def _handle(self, number, frame):
    del frame
    if self.signal is not None:  # A second signal before the defaults were back: exit at once.
      signal.signal(number, signal.SIG_DFL)
      os.kill(os.getpid(), number)
      return
    self.signal = signal.Signals(number).name
    # Said before the defaults return, so that a quick second signal cannot cut the message off.
    print(f'\n{self.signal} received: stopping after the current step once its checkpoint is '
          'saved (Ctrl-C again exits at once).', file=sys.stderr, flush=True)
    for s in self._previous:
      # Ctrl-C again exits at once. A repeated SIGTERM changes nothing: a scheduler's second
      # notice, or the one a dying sweep sends its points (launch/sweep.py), must not cut the
      # save short; SIGKILL still ends the process.
      signal.signal(s, signal.SIG_IGN if s == signal.SIGTERM else signal.SIG_DFL)
    if self.multi_process:
      os.kill(os.getpid(), signal.SIGTERM)  # To the runtime's notifier, which tells every process.
