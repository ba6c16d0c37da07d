"""Stopping a run cleanly: SIGTERM (schedulers, preemption) or Ctrl-C.

The first signal asks the training loop to stop after the current step, save it and wait for the
save to finish, then exit 0; the signal handlers are then reset to their defaults, so a second
Ctrl-C or SIGTERM ends the process at once (the last finished checkpoint is kept: saves are
atomic). Agreement on the stopping step across hosts belongs to the multi-host runtime.
"""

import os
import signal
import sys
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager that turns SIGTERM / SIGINT into a flag the loop polls (`.signal`)."""

  def __init__(self):
    self.signal = None  # The name of the first signal received, e.g. 'SIGTERM'.
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Only it may install handlers.
      self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
    return self

  def __exit__(self, *exc_info):
    for number, handler in self._previous.items():
      signal.signal(number, handler)

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
    for s in _SIGNALS:
      signal.signal(s, signal.SIG_DFL)
