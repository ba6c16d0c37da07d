"""Ctrl-C in the commands with nothing to save (research/cli.py exit_on_interrupt): the process
ends at once, even inside a long call that holds Python's main thread, with one sentence."""

import os
import signal
import subprocess
import sys

import runs

# Makes a scratch folder, then spins in one long C call that releases the GIL but checks no
# signal, as an XLA compilation does (Python's own handler, and a KeyboardInterrupt, would wait
# for it to return: minutes).
SCRIPT = '''
import sys
from research import cli
cli.exit_on_interrupt('Interrupted; nothing was written.')
with cli.removed_on_interrupt(sys.argv[1]):
  __import__('os').makedirs(sys.argv[1])
  print('ready', flush=True)
  __import__('hashlib').pbkdf2_hmac('sha256', b'key', b'salt', 2 * 10 ** 9)
print('finished', flush=True)
'''


def _run(scratch):
  process = subprocess.Popen([sys.executable, '-c', SCRIPT, str(scratch)], cwd=runs.REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=runs.default_ctrl_c)
  try:
    assert process.stdout.readline() == 'ready\n'
    process.send_signal(signal.SIGINT)
    return process, process.communicate(timeout=30)
  finally:
    process.kill()


def test_ctrl_c_inside_a_long_call_exits_at_once_with_one_sentence_and_no_scratch(tmp_path):
  process, (_, err) = _run(tmp_path / 'scratch')
  assert process.returncode == 130 and err.strip() == 'Interrupted; nothing was written.', err
  assert not (tmp_path / 'scratch').exists()


def test_a_process_started_to_ignore_ctrl_c_keeps_ignoring_it(tmp_path):
  # As a shell script's `command &` starts it; the C call is cut short by a SIGTERM instead.
  process = subprocess.Popen(
      [sys.executable, '-c', SCRIPT, str(tmp_path / 'scratch')], cwd=runs.REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
  try:
    assert process.stdout.readline() == 'ready\n'
    process.send_signal(signal.SIGINT)
    try:
      process.wait(timeout=3)
    except subprocess.TimeoutExpired:
      pass
    assert process.poll() is None  # Still running: the SIGINT was ignored.
  finally:
    process.kill()
    process.communicate()
