"""Real multi-process jobs on this machine (jax.distributed over gloo, free ports):

- 2 processes x 4 CPU devices train exactly like 1 process x 8 devices (the 1-process reference
  is stepped in this test process, through the same trainer; that every objective's batch is the
  same whatever the host count is tested in test_data.py), and each process profiles its own
  devices into a folder of its own;
- a checkpoint written by 2 processes resumes in 1 process on another mesh;
- SIGTERM to one process: every process saves the same step and exits 0, and the resumed run
  ends bitwise where an uninterrupted one does;
- kill -9 of one process: the job ends at once, the launcher names the lost process, and the
  last committed checkpoint still restores;
- a process that stops answering: the survivor exits non-zero within the heartbeat bound, and the
  runtime names the lost process.
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import runs
from launch import local_multiprocess
from research import config as config_lib
from research import mesh as mesh_lib
from research import objectives
from research import train
from research import workdir as workdir_lib
from research.data import global_batch

pytestmark = pytest.mark.slow

STEPS = 16
EVERY = 4  # Checkpoint interval.
# A profiler trace of two steps, which changes no figure of the run.
PROFILE = ('--config.train.profile_start_step=10', '--config.train.profile_num_steps=2')
DECODER = ('configs/decoder.py:tiny', '--config.model.num_layers=2', '--config.model.emb_dim=64',
           '--config.model.mlp_dim=128', '--config.train.sample_tokens=8')


def _overrides(corpus, model, *extra):
  return ['--config.data.source=text', f'--config.data.paths={corpus}',
          f'--config.data.data_dir={corpus.parent / "tfds"}', '--config.train.batch_size=8',
          '--config.train.seq_len=32', f'--config.train.num_steps={STEPS}',
          '--config.train.log_every=1', f'--config.train.eval_every={STEPS}',
          '--config.train.eval_batches=2', f'--config.checkpoint.every_steps={EVERY}',
          '--config.checkpoint.keep=10', '--config.train.sample_tokens=0',
          '--config.train.progress_bar=False', '--config.mesh.data=2', '--config.mesh.fsdp=4',
          # A wedged job (once, a resumed 2-process run stopped after step 13 until the 600 s
          # timeout) prints every thread's stack after 20 s and ends after 150 s, so that the
          # failure shows where each process waited.
          '--config.watchdog.slow_min_s=20', '--config.watchdog.exit_after_s=150',
          *model[1:], *extra]


def _one_process(workdir, corpus, model, *extra):
  """1 process x 8 devices (the test environment's)."""
  return runs.ok(runs.command('research.train', '--config', model[0], '--workdir', str(workdir),
                              *_overrides(corpus, model, *extra)))


def _set(config, override):
  """Applies '--config.a.b=value' to `config`, typed like the value it replaces."""
  key, text = override[len('--config.'):].split('=', 1)
  *path, name = key.split('.')
  node = config
  for part in path:
    node = node[part]
  old = node[name]
  node[name] = text.lower() == 'true' if isinstance(old, bool) else type(old)(text)


def _in_this_process(corpus, model):
  """The 1 process x 8 devices run of `model`, stepped here (one subprocess fewer): ({step:
  loss}, final params, the end-of-run sample or None)."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, model[0]))
  for override in _overrides(corpus, model):
    _set(config, override)
  mesh = mesh_lib.make_mesh(config_lib.validate(config, 8), jax.devices()[:8])
  trainer = train.setup(config, mesh)
  state, losses = trainer.state, {}
  for step in range(STEPS):
    batch = global_batch.assemble(functools.partial(trainer.pipeline.train_batch, step),
                                  trainer.batch_shapes, trainer.batch_shardings)
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
    totals = objectives.host_totals(metrics['totals'])
    losses[step + 1] = trainer.objective.metrics(totals)['loss']
  return losses, jax.device_get(state.params), train._sample(trainer, state.params, config)


def _two_processes(workdir, corpus, model, *extra):
  """2 processes x 4 devices through the launcher, the data axis split between them."""
  result = subprocess.run(
      [sys.executable, 'launch/local_multiprocess.py', '--processes=2', '--local_devices=4',
       model[0], str(workdir), *_overrides(corpus, model, '--config.mesh.dcn_data=2', *extra)],
      cwd=runs.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-20000:]  # Room for the watchdog's stacks.
  assert '[p1] ' in result.stderr and '[p0] final ' in result.stdout  # Prefixed streams.
  return result


def _start_processes(workdir, corpus, model, *extra, peer_timeout_s=100):
  """2 processes started directly (so that the test can signal one), stderr to <workdir>.pN."""
  port = local_multiprocess.free_port()
  children = []
  for index in range(2):
    command = local_multiprocess.train_command(
        sys.executable, index, model[0], str(workdir),
        _overrides(corpus, model, '--config.mesh.dcn_data=2',
                   f'--config.watchdog.peer_timeout_s={peer_timeout_s}', *extra))
    children.append(subprocess.Popen(
        command, cwd=runs.REPO, stdout=subprocess.DEVNULL,
        stderr=open(f'{workdir}.p{index}', 'w'),
        env=local_multiprocess.process_env(os.environ, index, 2, 4, port)))
  return children


def _losses(workdir):
  return {r['step']: r['loss'] for r in map(json.loads, open(workdir / 'metrics.jsonl'))}


def _wait_for_step(workdir, step, children, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (workdir / 'metrics.jsonl').exists() and max(_losses(workdir), default=0) >= step:
      return
    assert all(c.poll() is None for c in children), 'a process ended early'
    time.sleep(0.05)
  raise AssertionError(f'step {step} not reached')


def _params(workdir):
  return jax.device_get(workdir_lib.load_params(str(workdir))[1])


def _assert_close(params, reference, atol):
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference)
  assert max(jax.tree.leaves(diffs)) <= atol, diffs


def _assert_same_losses(losses, reference, steps):
  for step in steps:
    assert abs(losses[step] - reference[step]) <= 1e-5, (step, losses[step], reference[step])


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return runs.write_corpus(tmp_path_factory.mktemp('data') / 'corpus')


@pytest.fixture(scope='module')
def decoder_runs(tmp_path_factory, corpus):
  """The uninterrupted decoder runs the tests compare with: 2 processes x 4 devices (a workdir
  and its stderr) and 1 x 8 (stepped here)."""
  two = tmp_path_factory.mktemp('decoder') / 'two'
  said = _two_processes(two, corpus, DECODER, *PROFILE).stderr
  return two, said, _in_this_process(corpus, DECODER)


def test_two_processes_train_like_one(decoder_runs):
  two, said, (reference, params, sample) = decoder_runs
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert reference[STEPS] < reference[1]  # The steps really train.
  _assert_same_losses(_losses(two), reference, range(1, STEPS + 1))
  _assert_close(_params(two), params, atol=1e-4)
  # Only process 0 writes the run's records (process 1 would add dated copies and a lock).
  assert sorted(p.name for p in two.iterdir()) == [
      'checkpoints', 'config.json', 'environment.json', 'metrics.jsonl', 'profile', 'tensorboard',
      'tokenizer']
  # Each process traces into a folder of its own (both traces are named after this one host:
  # in one folder they clashed, and both processes crashed) and summarises its own devices.
  assert sorted(p.name for p in (two / 'profile').iterdir()) == ['process_0', 'process_1']
  for index in range(2):
    folder = two / 'profile' / f'process_{index}'
    assert len(list(folder.glob('plugins/profile/*/*.trace.json.gz'))) == 1
    assert f'[p{index}] Profile of 2 steps from step 10: {folder / "profile.md"}' in said
    profile = (folder / 'profile.md').read_text()
    assert f'` (steps 10-11, process {index} of 2) on ' in profile.splitlines()[0], profile
    for row in ('| forward | Decoder/layers/', '| backward | Decoder/layers/', '| optimizer | ',
                '| communication | all-reduce |'):
      assert row in profile, (index, row, profile)
  # The end-of-run sample: computed by both processes (decoders), printed once.
  assert sample is not None  # The decoder samples at the end (train.sample_tokens > 0).
  assert said.count('--- sample') == 1 and '[p1] --- sample' not in said
  assert said[said.index('--- sample'):].replace('[p0] ', '').startswith(
      f'--- sample (greedy) ---\n{sample}\n---')


def test_a_two_process_checkpoint_resumes_in_one_process_on_another_mesh(tmp_path, corpus,
                                                                       decoder_runs):
  workdir = tmp_path / 'moved'
  shutil.copytree(decoder_runs[0], workdir)
  for step in range(2 * EVERY, STEPS + 1, EVERY):  # Keep only step 4 of the 2-process run.
    shutil.rmtree(workdir / 'checkpoints' / str(step))
  (workdir / 'metrics.jsonl').write_text('')
  # 8 devices as (2 data, 2 sequence, 2 tensor): every array is laid out differently.
  _one_process(workdir, corpus, DECODER, '--config.mesh.fsdp=1', '--config.mesh.sequence=2',
               '--config.mesh.tensor=2')
  losses = _losses(workdir)
  assert sorted(losses) == list(range(EVERY + 1, STEPS + 1))
  _assert_same_losses(losses, decoder_runs[2][0], losses)


def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes_bitwise(
    tmp_path, corpus, decoder_runs):
  workdir = tmp_path / 'preempted'
  children = _start_processes(workdir, corpus, DECODER)
  _wait_for_step(workdir, 2, children)
  children[1].send_signal(signal.SIGTERM)
  codes = [c.wait(timeout=300) for c in children]
  said = [open(f'{workdir}.p{i}').read() for i in range(2)]
  assert codes == [0, 0], '\n'.join(text[-10000:] for text in said)
  stops = [[line for line in text.splitlines() if 'every process saves step' in line]
           for text in said]
  assert len(stops[0]) == 1 and stops[0] == stops[1], said[0][-3000:]  # One agreed step.
  stopped = int(stops[0][0].split('saves step ')[1].split()[0])
  assert 2 <= stopped < STEPS
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved[-1] == stopped, saved

  _two_processes(workdir, corpus, DECODER)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  reference = _params(decoder_runs[0])
  resumed = _params(workdir)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, resumed, reference)))


def test_a_killed_process_stops_the_job_and_the_launcher_names_it(tmp_path, corpus):
  workdir = tmp_path / 'killed'
  launcher = subprocess.Popen(
      [sys.executable, 'launch/local_multiprocess.py', '--processes=2', '--local_devices=4',
       DECODER[0], str(workdir), *_overrides(corpus, DECODER, '--config.mesh.dcn_data=2',
                                             '--config.watchdog.peer_timeout_s=5')],
      cwd=runs.REPO, stdout=subprocess.PIPE, stderr=open(f'{workdir}.log', 'w'), text=True)
  pids = [int(launcher.stdout.readline().split('pid ')[1].rstrip(')\n')) for _ in range(2)]
  _wait_for_step(workdir, EVERY + 2, [launcher])
  os.kill(pids[1], signal.SIGKILL)
  killed_at = time.monotonic()
  code = launcher.wait(timeout=120)
  elapsed = time.monotonic() - killed_at
  said = open(f'{workdir}.log').read()
  assert code != 0 and elapsed < 5 + 30, (code, elapsed)
  assert f'[launch] process 1 (pid {pids[1]}) was killed by SIGKILL' in said, said[-3000:]
  assert '[launch] process 0' in said  # The survivor ended with an error too.
  # The last committed checkpoint restores (its checksums are verified).
  step = workdir_lib.load_params(str(workdir))[2]
  assert step >= EVERY and step % EVERY == 0


def test_a_silent_peer_ends_the_survivor_within_the_heartbeat_bound_naming_it(tmp_path, corpus):
  """A host that stops answering (SIGSTOP: its connections stay open, as on a lost machine)."""
  workdir = tmp_path / 'silent'
  children = _start_processes(workdir, corpus, DECODER, peer_timeout_s=5)
  try:
    _wait_for_step(workdir, 2, children)
    children[1].send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    code = children[0].wait(timeout=120)
    elapsed = time.monotonic() - stopped_at
  finally:
    children[1].kill()
  said = open(f'{workdir}.p0').read()
  assert code != 0 and elapsed < 5 + 30, (code, elapsed)
  # The runtime's own words, which name the silent process (task 1).
  named = re.search(r'Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b', said)
  assert named, said[-3000:]


def test_a_bad_workdir_stops_every_process_at_once_from_the_launchers_folder(tmp_path):
  # Relative paths start in the launcher's working folder, as for research.train itself, and
  # every process checks the workdir before they wait on each other.
  (tmp_path / 'a_file').write_text('not a folder')
  started = time.monotonic()
  result = subprocess.run(
      [sys.executable, os.path.join(runs.REPO, 'launch', 'local_multiprocess.py'),
       '--processes=2', os.path.join(runs.REPO, 'configs/decoder.py:tiny'), 'a_file/run'],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and time.monotonic() - started < 25, result.stderr[-3000:]
  sentence = (f'error: --workdir a_file/run lies under the file {tmp_path}/a_file; pass a path '
              'in a folder.')
  assert f'[p0] {sentence}' in result.stderr and f'[p1] {sentence}' in result.stderr
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]


def test_a_state_too_large_for_the_hosts_stops_every_process_with_one_sentence(tmp_path):
  # Agreed before any process allocates: one that stopped alone would leave the other waiting.
  result = subprocess.run(
      [sys.executable, os.path.join(runs.REPO, 'launch', 'local_multiprocess.py'),
       '--processes=2', os.path.join(runs.REPO, 'configs/decoder.py:tiny'), 'run',
       '--config.model.mlp_dim=4000000000'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  for process in (0, 1):
    line = [l for l in result.stderr.splitlines() if l.startswith(f'[p{process}] error: ')]
    assert len(line) == 1 and line[0].startswith(
        f"[p{process}] error: The parameters and optimizer state need "), result.stderr[-3000:]
    assert (" TiB on process 0's 1 cpu device(s) and those of the 1 other process on its "
            'machine, more than the ') in line[0], line[0]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / 'run' / 'config.json').exists()
