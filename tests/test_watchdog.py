"""The watchdog reports a stalled step with every thread's stack, and ends a hung process."""

import threading
import time

from research import watchdog as watchdog_lib


def _steps(watchdog, count, seconds):
  for step in range(count):
    time.sleep(seconds)
    watchdog.beat(step)


def test_a_step_far_slower_than_the_median_dumps_the_python_stacks(tmp_path):
  out = open(tmp_path / 'stderr', 'w+')
  watchdog = watchdog_lib.Watchdog(slow_factor=5, min_s=0.2, exit_after_s=0, poll_s=0.05,
                                   out=out).start()
  try:
    _steps(watchdog, 5, 0.02)
    time.sleep(0.6)  # Step 5 stalls: far above 5 x 0.02 s and above min_s.
    watchdog.beat(5)
    _steps(watchdog, 3, 0.02)
  finally:
    watchdog.stop()
  out.seek(0)
  text = out.read()
  assert text.count('watchdog: step 5 has taken') == 1, text  # Reported once per stalled step.
  assert 'the median step' in text
  assert '_steps' in text or 'test_a_step_far_slower' in text  # The main thread's stack.
  assert 'Thread' in text


def test_paused_work_and_the_first_step_are_not_judged(tmp_path):
  out = open(tmp_path / 'stderr', 'w+')
  watchdog = watchdog_lib.Watchdog(slow_factor=2, min_s=0.05, exit_after_s=0.3, poll_s=0.02,
                                   out=out).start()
  try:
    time.sleep(0.4)  # Compiling the first step: no beat yet.
    _steps(watchdog, 4, 0.01)
    with watchdog.paused():  # An evaluation.
      time.sleep(0.4)
    watchdog.beat(4)
  finally:
    watchdog.stop()
  out.seek(0)
  assert out.read() == ''


def test_a_step_past_exit_after_s_ends_the_process(tmp_path):
  out = open(tmp_path / 'stderr', 'w+')
  exited = threading.Event()
  codes = []

  def exit_now(code):
    codes.append(code)
    exited.set()

  watchdog = watchdog_lib.Watchdog(slow_factor=100, min_s=100, exit_after_s=0.2, poll_s=0.02,
                                   out=out, exit_now=exit_now).start()
  try:
    _steps(watchdog, 3, 0.01)
    assert exited.wait(5)
  finally:
    watchdog.stop()
  out.seek(0)
  text = out.read()
  assert codes == [1]
  assert 'step 3 has not finished after' in text and 'exits with code 1' in text, text
