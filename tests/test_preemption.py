"""preemption.StopRequest on one process: the first SIGTERM or Ctrl-C asks for a stop; while the
run saves, a second SIGTERM (a scheduler's second notice, or the one a dying sweep sends) changes
nothing, and a second Ctrl-C exits at once."""

import signal
import subprocess
import sys

import runs

SCRIPT = '''
import os, signal, sys
from research import preemption
with preemption.StopRequest(multi_process=False) as stop:
  os.kill(os.getpid(), getattr(signal, sys.argv[1]))
  print(stop.signal, stop.should_stop(0), flush=True)
  os.kill(os.getpid(), getattr(signal, sys.argv[2]))
  print('still saving', flush=True)
'''


def _signals(first, second):
  return subprocess.run([sys.executable, '-c', SCRIPT, first, second], cwd=runs.REPO,
                        capture_output=True, text=True, timeout=60,
                        preexec_fn=runs.default_ctrl_c)


def test_a_second_sigterm_changes_nothing_while_the_run_saves():
  for first in ('SIGTERM', 'SIGINT'):
    result = _signals(first, 'SIGTERM')
    assert result.returncode == 0, result.stderr
    assert result.stdout == f'{first} True\nstill saving\n'


def test_a_second_ctrl_c_exits_at_once():
  for first in ('SIGTERM', 'SIGINT'):
    result = _signals(first, 'SIGINT')
    assert result.returncode == -signal.SIGINT and result.stdout == f'{first} True\n'
