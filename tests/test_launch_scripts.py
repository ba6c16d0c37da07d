"""The cloud launch scripts cannot run here: their dry runs print the exact commands, and bad
arguments stop with one line (exit 2)."""

import os
import shlex
import signal
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, **env):
  return subprocess.run(['bash', f'launch/{script}', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, **env))


def test_tpu_pod_dry_runs_print_the_gcloud_commands():
  where = ['--name', 'pod', '--zone', 'us-east5-a', '--dry_run']
  create = _run('tpu_pod.sh', 'create', *where, '--type', 'v5p-64', '--spot', '--queued')
  assert create.returncode == 0, create.stderr
  assert create.stdout.split() == (
      'gcloud compute tpus queued-resources create pod --node-id pod --zone us-east5-a '
      '--accelerator-type v5p-64 --runtime-version v2-alpha-tpuv5 --spot').split()
  run = _run('tpu_pod.sh', 'run', *where, '--config', 'configs/decoder.py:llama_1b', '--run',
             'r1', '--bucket', 'ckpts', '--', '--config.mesh.fsdp=-1')
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith('gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all')
  remote = shlex.split(_remote_command(run.stdout))
  job = shlex.split(remote[remote.index('-c') + 1])
  assert 'RESEARCH_CLUSTER=tpu_pod' in remote and '--config.mesh.fsdp=-1' in job
  assert job[job.index('--workdir') + 1] == '/mnt/ckpts/runs/r1'
  status = _run('tpu_pod.sh', 'status', *where)
  assert status.returncode == 0 and status.stdout.startswith(
      'gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all --command')
  setup = _run('tpu_pod.sh', 'setup', *where, '--bucket', 'ckpts')
  assert setup.returncode == 0 and setup.stdout.count('--worker=all') == 2, setup.stdout
  assert 'gcsfuse' in setup.stdout and 'pip\\ install' in setup.stdout
  delete = _run('tpu_pod.sh', 'delete', *where)
  assert delete.stdout.strip() == 'gcloud compute tpus tpu-vm delete pod --zone us-east5-a --quiet'


@pytest.mark.parametrize('run_name, overrides', [('r1', []),
                                                ('my run', ['--config.optim.lr=1e-3'])])
def test_tpu_pod_workers_run_exactly_the_train_command(run_name, overrides):
  """The command each worker's shell runs, read back as that shell would: with no overrides
  (no stray empty argument) and with a run name that holds a space."""
  run = _run('tpu_pod.sh', 'run', '--name', 'pod', '--zone', 'z', '--dry_run', '--config',
             'configs/decoder.py:tiny', '--run', run_name, '--bucket', 'b', '--', *overrides)
  assert run.returncode == 0, run.stderr
  remote = shlex.split(_remote_command(run.stdout))
  assert remote[:8] == ['cd', '~/research', '&&', 'rm', '-f', '~/train.exit', '~/train.pid', '&&']
  assert remote[8:13] == ['{', 'RESEARCH_CLUSTER=tpu_pod', 'nohup', 'bash', '-c']
  assert remote[14:] == ['<', '/dev/null', '>', '/dev/null', '2>&1', '&', '}']
  job = shlex.split(remote[13])
  train = job.index('python3')
  assert job[train:job.index('>', train)] == [
      'python3', '-m', 'research.train', '--config', 'configs/decoder.py:tiny', '--workdir',
      f'/mnt/b/runs/{run_name}', '--config.train.progress_bar=False', *overrides]


def _remote_command(gcloud_line):
  gcloud = shlex.split(gcloud_line)
  return gcloud[gcloud.index('--command') + 1]


def test_tpu_pod_status_names_each_worker_s_state_and_fails_where_a_job_failed(tmp_path):
  """The workers' commands of `run` and `status`, run here by bash as a worker's shell would, with
  HOME a temporary folder and a python3 that trains until HOME/release exists, then exits with
  the status FAKE_EXIT names."""
  home, tools = tmp_path / 'home', tmp_path / 'bin'
  (home / 'research').mkdir(parents=True)
  tools.mkdir()
  (tools / 'python3').write_text('#!/bin/sh\necho "trained $*"\n'
                                 'while [ ! -f "$HOME/release" ]; do sleep 0.05; done\n'
                                 'exit "$FAKE_EXIT"\n')
  (tools / 'python3').chmod(0o755)
  where = ['--name', 'p', '--zone', 'z', '--dry_run']
  run = _remote_command(_run('tpu_pod.sh', 'run', *where, '--config', 'configs/decoder.py:tiny',
                             '--run', 'r1', '--bucket', 'b').stdout)
  status = _remote_command(_run('tpu_pod.sh', 'status', *where).stdout)

  def on_worker(command, **env):
    return subprocess.run(['bash', '-c', command], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, HOME=str(home), PATH=f'{tools}:{os.environ["PATH"]}',
                                   **env))

  def wait_for(name):
    deadline = time.monotonic() + 30
    while not (home / name).exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert (home / name).exists()

  def says(result, state, succeeds):
    assert result.stdout.endswith(f': research.train {state}\n'), result.stdout
    assert (result.returncode == 0) == succeeds

  says(on_worker(status), 'has not run here', False)
  for code in (3, 0):
    (home / 'release').unlink(missing_ok=True)
    assert on_worker(run, FAKE_EXIT=str(code)).returncode == 0  # Started in the background.
    wait_for('train.pid')
    says(on_worker(status), 'is running', True)
    # A SIGTERM to the job's shell (a preempted VM sends one to every process) leaves it to
    # record the trainer's status.
    os.kill(int((home / 'train.pid').read_text()), signal.SIGTERM)
    (home / 'release').touch()
    wait_for('train.exit')
    says(on_worker(status), f'exited with status {code}', code == 0)
    assert (home / 'train.log').read_text().startswith('trained -m research.train --config')
  # A job whose shell was killed outright records nothing: not taken for a running one.
  (home / 'release').unlink()
  on_worker(run, FAKE_EXIT='0')
  wait_for('train.pid')
  os.kill(int((home / 'train.pid').read_text()), signal.SIGKILL)
  deadline = time.monotonic() + 30
  while 'is running' in on_worker(status).stdout and time.monotonic() < deadline:
    time.sleep(0.05)  # The signal is delivered a moment later.
  says(on_worker(status), 'ended without an exit status (killed)', False)
  (home / 'release').touch()  # Ends the orphaned trainer.


@pytest.mark.parametrize('args, message', [
    (['create', '--zone', 'z'], 'pass --name and --zone.'),
    (['create', '--name', 'p', '--zone', 'z', '--bogus'], 'unknown option --bogus'),
    (['resize', '--name', 'p', '--zone', 'z'], 'unknown action resize; use create, setup, run, '
     'status, logs or delete.'),
    (['run', '--name', 'p', '--zone', 'z', '--dry_run'], 'run needs --config, --run and --bucket.'),
    (['setup', '--name', 'p', '--zone', 'z', '--dry_run'], 'setup needs --bucket'),
    (['create', '--name'], '--name needs a value.'),
    (['run', '--name', 'p', '--zone', 'z', '--bucket', 'b', '--run', 'r', '--config', 'c.py:x',
      '--', '--config.mesh.fsdp=-1', '--dry_run'],  # Not a dry run: refused before gcloud.
     '--dry_run goes before --; what follows -- is passed to research.train.'),
])
def test_tpu_pod_bad_arguments_are_one_line(args, message):
  result = _run('tpu_pod.sh', *args)
  assert result.returncode == 2 and result.stdout == ''
  said = result.stderr.strip()
  assert said.startswith('error: ') and '\n' not in said and message in said, said


def test_slurm_dry_run_prints_the_srun_command_and_bad_arguments_are_refused():
  result = _run('slurm.sbatch', 'configs/decoder.py:llama_1b', '/shared/runs/a',
                '--config.mesh.fsdp=-1', DRY_RUN='1', PYTHON='python3')
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == [
      'srun', '--kill-on-bad-exit=1', '--export=ALL\\,RESEARCH_CLUSTER=slurm', 'python3', '-m',
      'research.train', '--config', 'configs/decoder.py:llama_1b', '--workdir', '/shared/runs/a',
      '--config.train.progress_bar=False', '--config.mesh.fsdp=-1']
  missing = _run('slurm.sbatch', 'configs/decoder.py:llama_1b')
  assert missing.returncode == 2 and missing.stderr.startswith('usage: sbatch')


def test_slurm_reads_a_relative_workdir_in_the_submit_folder(tmp_path):
  # The job starts in the folder it was submitted from and runs in the checkout.
  result = subprocess.run(['bash', os.path.join(REPO, 'launch', 'slurm.sbatch'),
                           'configs/decoder.py:tiny', 'runs/a'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DRY_RUN='1', PYTHON='python3'))
  assert result.returncode == 0, result.stderr
  words = result.stdout.split()
  assert words[words.index('--workdir') + 1] == f'{tmp_path}/runs/a'


def test_slurm_finds_the_checkout_wherever_the_job_was_submitted_from(tmp_path):
  # sbatch runs a spooled copy of the script: a submit folder outside the checkout must not
  # become the project's root.
  python = tmp_path / 'stand-in-python'
  python.write_text('#!/bin/sh\n')
  python.chmod(0o755)
  arguments = ('configs/decoder.py:tiny', '/shared/runs/a')
  env = dict(SLURM_SUBMIT_DIR=str(tmp_path), DRY_RUN='1')
  result = _run('slurm.sbatch', *arguments, PYTHON=str(python), **env)
  assert result.returncode == 0 and result.stdout.split()[3] == str(python), result.stderr
  for bad_env, sentence in (
      (dict(REPO=str(tmp_path)), f'error: no checkout of the project (research/train.py) in '
                                 f'{tmp_path}; submit from the repository root or set REPO=PATH.'),
      (dict(PYTHON=str(tmp_path / 'python')), f'error: {tmp_path}/python is not a Python to run; '
                                              f'run make setup in {REPO} or set PYTHON=PATH.')):
    result = _run('slurm.sbatch', *arguments, **env, **bad_env)
    assert (result.returncode, result.stdout, result.stderr.strip()) == (2, '', sentence)


def test_tpu_pod_help_prints_its_usage():
  result = _run('tpu_pod.sh', '--help')
  assert result.returncode == 0 and result.stderr == ''
  assert result.stdout.startswith('A TPU VM slice through `gcloud compute tpus`')
  assert '--dry_run              print the commands instead of running them' in result.stdout
