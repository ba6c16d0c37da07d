"""Checkpoints through the real command line: a resumed run equals an uninterrupted one, bitwise,
after unreadable steps, flipped bits, kill -9, SIGTERM and Ctrl-C; structure changes are named."""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return runs.write_corpus(tmp_path_factory.mktemp('data') / 'corpus')


@pytest.fixture(scope='module')
def straight(corpus, tmp_path_factory):
  """The uninterrupted run every interrupted one must equal: 20 steps, checkpoints every 5."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  runs.ok(runs.train(workdir, corpus))
  return workdir


def _largest_array_file(step_dir):
  data = step_dir / 'state' / 'ocdbt.process_0' / 'd'
  return max(data.iterdir(), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


def _delete_manifest(step_dir):
  (step_dir / 'state' / 'manifest.ocdbt').unlink()


def _raw_state(checkpoints, step):
  manager = ocp.CheckpointManager(checkpoints, item_names=('state', 'record'))
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(state['state']).items()}


def _flip_a_bit_silently(step_dir):
  """Flips one bit of the stored arrays such that orbax still reads the step without complaint
  (only the values differ): the corruption that only a checksum can catch."""
  path = _largest_array_file(step_dir)
  original = path.read_bytes()
  before = _raw_state(step_dir.parent, int(step_dir.name))
  for offset in range(len(original) // 2, len(original) - 64, 997)[:30]:
    flipped = bytearray(original)
    flipped[offset] ^= 0x08
    path.write_bytes(bytes(flipped))
    try:
      after = _raw_state(step_dir.parent, int(step_dir.name))
    except Exception:  # This offset broke the container format: orbax notices. Try another.
      continue
    if any(not np.array_equal(before[k], after[k]) for k in before):
      return
  raise AssertionError('no silently flippable bit found')


@pytest.mark.parametrize('corrupt_newest, corrupt_older', [
    (_truncate, _empty),  # A truncated data file, then an empty step folder.
    (_delete_manifest, _flip_a_bit_silently),  # A lost manifest, then a flipped bit.
], ids=['truncated+empty', 'manifest+bitflip'])
def test_unreadable_steps_are_moved_aside_and_the_run_finishes_exactly(
    tmp_path, corpus, straight, corrupt_newest, corrupt_older):
  resumed = tmp_path / 'resumed'
  runs.ok(runs.train(resumed, corpus, '--config.train.stop_at_step=15'))
  checkpoints = resumed / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['10', '15', '5']
  corrupt_newest(checkpoints / '15')
  corrupt_older(checkpoints / '10')
  # A save interrupted midway: orbax's temporary folder, never listed as a step.
  partial = checkpoints / '20.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(checkpoints / '5', partial)

  # Steps 10 and 15 will be saved again: they must not be in the way.
  result = runs.ok(runs.train(resumed, corpus))
  assert 'resumed from step 5' in result.stderr, result.stderr[-3000:]
  for step in (10, 15):
    assert f'Checkpoint step {step} in {checkpoints} is unreadable' in result.stderr
    assert f'aside to {checkpoints}/{step}.unreadable' in result.stderr
  if corrupt_older is _flip_a_bit_silently:
    assert 'fails its checksum' in result.stderr
  # The other reads of a step found unreadable fail too: their coroutines print nothing.
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr, (
      result.stderr[-3000:])
  assert sorted(os.listdir(checkpoints)) == ['10', '10.unreadable', '15', '15.unreadable', '20',
                                             partial.name]
  runs.assert_same_run(straight, resumed)

  again = runs.ok(runs.train(resumed, corpus))  # Nothing left to do: says so, changes nothing.
  assert 'already at step 20' in again.stderr


def test_a_failed_save_stops_the_run_and_the_last_good_checkpoint_resumes_exactly(
    tmp_path, corpus, straight):
  workdir = tmp_path / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=5'))
  # Files above 64 KiB cannot be written (EFBIG): a full disk for the checkpoint data only,
  # since the run's logs stay far smaller.
  limited = ['bash', '-c', 'ulimit -f 64 && exec "$@"', '--'] + runs.train_command(workdir, corpus)
  line = runs.error_line(subprocess.run(limited, cwd=runs.REPO, capture_output=True, text=True,
                                        timeout=600), code=1)
  assert line.startswith(f'error: Saving the checkpoint of step 10 in {workdir}/checkpoints '
                         'failed (')
  assert line.endswith("free disk space or fix the folder's permissions, then rerun the same "
                       'command to continue from the last saved step.')
  assert max(r['step'] for r in runs.metrics(workdir)) < 20  # It stopped, it did not go on.
  assert [n for n in os.listdir(workdir / 'checkpoints') if n.isdigit()] == ['5']
  result = runs.ok(runs.train(workdir, corpus))
  assert 'resumed from step 5' in result.stderr
  runs.assert_same_run(straight, workdir)


def _wait_for_step(workdir, process, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, open(f'{workdir}.log').read()[-3000:]
    if (workdir / 'metrics.jsonl').exists() and any(
        r['step'] >= step for r in runs.metrics(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f'step {step} not reached')


# Evaluating at every step slows the run down (so that it is still running when the test
# interrupts it) without changing its trajectory: evaluation reads the parameters only.
_SLOW_DOWN = ('--config.train.eval_every=1', '--config.train.eval_batches=16')


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, corpus, straight):
  resumed = tmp_path / 'resumed'
  process = runs.start(resumed, corpus, *_SLOW_DOWN)
  _wait_for_step(resumed, process, 12)  # Past the checkpoint of step 10, mid-way to 15.
  process.kill()
  process.wait()
  result = runs.ok(runs.train(resumed, corpus))
  assert 'resumed from step 10' in result.stderr or 'resumed from step 15' in result.stderr
  runs.assert_same_run(straight, resumed)


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_the_rerun_finishes_exactly(
    tmp_path, corpus, straight, signal_number):
  resumed = tmp_path / 'resumed'
  process = runs.start(resumed, corpus, *_SLOW_DOWN)
  _wait_for_step(resumed, process, 7)
  process.send_signal(signal_number)
  assert process.wait(timeout=120) == 0
  log = open(f'{resumed}.log').read()
  assert 'Traceback' not in log, log[-3000:]
  stopped = [line for line in log.splitlines() if line.startswith('Stopped at step ')]
  assert len(stopped) == 1 and stopped[0].endswith(
      f'on {signal.Signals(signal_number).name} with its checkpoint saved; rerun the same command '
      'to continue.'), log[-3000:]
  step = int(stopped[0].split()[3])
  assert 7 <= step < 20
  assert str(step) in os.listdir(resumed / 'checkpoints')  # Saved where it stopped.
  result = runs.ok(runs.train(resumed, corpus))
  assert f'resumed from step {step}' in result.stderr
  runs.assert_same_run(straight, resumed)


def test_a_second_ctrl_c_exits_at_once(tmp_path, corpus):
  workdir = tmp_path / 'run'
  process = runs.start(workdir, corpus, '--config.train.num_steps=100000')
  _wait_for_step(workdir, process, 2)
  # Ctrl-C until the process ends: the first asks for a clean stop, the next one (within
  # milliseconds, long before the step and its save are done) must end it at once.
  while process.poll() is None:
    process.send_signal(signal.SIGINT)
    time.sleep(0.01)
  assert process.returncode == -signal.SIGINT
  assert open(f'{workdir}.log').read().count('Ctrl-C again exits at once') == 1


@pytest.fixture(scope='module')
def stopped_at_5(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('stopped') / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=5'))
  return workdir


@pytest.mark.parametrize('overrides, fragment', [
    (['--config.optim.clip_norm=0'],
     "a different optimizer (optim.clip_norm: 1.0 there, 0.0 here);"),
    # The learning rate may change on resume: only what shapes the state is named.
    (['--config.optim.name=lion', '--config.optim.lr=1e-4'],
     "a different optimizer (optim.name: 'adamw' there, 'lion' here);"),
    (['--config.model.emb_dim=96'], 'a different model (model.emb_dim: 64 there, 96 here);'),
])
def test_a_changed_structure_is_named_and_nothing_is_moved(stopped_at_5, corpus, overrides,
                                                           fragment):
  before = sorted(os.listdir(stopped_at_5))
  records = {name: (stopped_at_5 / name).read_text()
             for name in ('config.json', 'environment.json')}
  line = runs.error_line(runs.train(stopped_at_5, corpus, *overrides))
  assert line.startswith(f'error: The checkpoint in {stopped_at_5}/checkpoints was written '
                         'for '), line
  assert fragment in line and line.endswith('or pass another --workdir.'), line
  assert sorted(os.listdir(stopped_at_5)) == before  # No dated config copy, no lock left behind.
  assert records == {name: (stopped_at_5 / name).read_text() for name in records}
  assert os.listdir(stopped_at_5 / 'checkpoints') == ['5']  # Nothing moved aside.


def test_a_checkpoint_of_another_family_is_named_by_its_family(stopped_at_5, corpus):
  # Not every model setting that differs: the family says it.
  line = runs.error_line(runs.command(
      'research.train', '--config', 'configs/encoder.py:bert_tiny', '--workdir',
      str(stopped_at_5), '--config.data.source=text', f'--config.data.paths={corpus}',
      f'--config.data.data_dir={corpus.parent / "tfds"}'))
  assert line == (f'error: The checkpoint in {stopped_at_5}/checkpoints was written for a model '
                  'of model.family=decoder and this config builds one of model.family=encoder; '
                  'resume with the decoder config it was written with, or pass another '
                  '--workdir.'), line
  assert os.listdir(stopped_at_5 / 'checkpoints') == ['5']


def test_keep_one_retains_only_the_final_checkpoint(tmp_path, corpus):
  workdir = tmp_path / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.num_steps=6',
                     '--config.checkpoint.every_steps=2', '--config.checkpoint.keep=1'))
  assert os.listdir(workdir / 'checkpoints') == ['6']
  line = runs.error_line(runs.train(tmp_path / 'other', corpus, '--config.checkpoint.keep=0'))
  assert line == 'error: config.checkpoint.keep must be positive, got 0.'
  assert not (tmp_path / 'other').exists()


def test_init_from_warm_starts_from_another_runs_parameters(tmp_path, corpus, straight):
  warm = tmp_path / 'warm'
  # A learning rate far below the parameters' float32 resolution leaves them unchanged.
  result = runs.ok(runs.train(warm, corpus, f'--config.checkpoint.init_from={straight}',
                              '--config.train.stop_at_step=5', '--config.optim.lr=1e-30'))
  assert 'warm start from the parameters of step 20' in result.stderr
  a, b = runs.params(straight, 20), runs.params(warm, 5)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=str(name))
  assert runs.losses(warm)[1][0] < runs.losses(straight)[1][0]  # It starts where the source ended.
