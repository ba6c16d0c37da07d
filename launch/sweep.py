"""Runs every point of a sweep as a training run and records each in the sweep's registry.

  python -m launch.sweep --sweep configs/sweeps/lr.py --config configs/decoder.py:tiny \
      --workdir runs/lr [--parallel 2] [-- --config.train.progress_bar=False ...]
  python -m launch.sweep ... --launcher slurm [--launcher_args='--nodes=2'] [--dry_run]
  python -m launch.sweep ... --launcher tpu_pod \
      --launcher_args='--name sweep-{i} --zone us-east5-a --bucket BUCKET'

Each point trains in <workdir>/<run> (its name: the overrides and a hash of the resolved config;
research/sweeps.py) with its output in <workdir>/<run>/sweep.log. Locally the points run one
after another, or --parallel N at a time, each on its share of the GPUs or CPU cores. Running the
sweep again skips finished runs, resumes interrupted ones from their checkpoints and retries
failed ones; a failed point is recorded with its error line and the others go on. SIGTERM or
Ctrl-C stops the running points, which save a checkpoint first.

--launcher slurm submits one `sbatch launch/slurm.sbatch` job per point; --launcher tpu_pod
starts one `launch/tpu_pod.sh run` per point, on the slice named by --launcher_args with {i}
replaced by the point's index in the sweep (a slice trains one run at a time). Both record the
points as submitted; the next invocation marks those whose workdir has reached its last step
finished, and --resubmit submits the others again (a job that failed or ran out of time resumes
from its checkpoint). --dry_run prints the commands instead. Arguments after `--` go to every run
unchanged and are not part of a run's name: they say how a run executes (--cpu_devices, the
RUN_CONTROL config keys below), while what it trains belongs in the sweep.
"""

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax

from research import cli
from research import config as config_lib
from research import models
from research import report
from research import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_NAME = 'sweep.log'
LAUNCHERS = ('local', 'slurm', 'tpu_pod')
SUBMITTERS = {'slurm': 'sbatch', 'tpu_pod': 'gcloud'}  # The programs that submit a point.
# Config keys that say how a run executes, not what it trains: the only ones that may follow
# `--` (any other would change every run without changing its name).
RUN_CONTROL = ('train.progress_bar', 'train.tensorboard', 'train.stop_at_step',
               'train.profile_start_step', 'train.profile_num_steps', 'watchdog.')


def check_passthrough(arguments):
  arguments = iter(arguments)
  for argument in arguments:
    if argument == '--cpu_devices':
      next(arguments, None)  # Its value.
      continue
    if not argument.startswith(('--config.', '--cpu_devices=')):
      raise sweeps.SweepError(f'{argument} after -- is not a run-control setting of research.'
                              'train; only --cpu_devices and --config. settings that leave what '
                              f'a run trains unchanged ({", ".join(RUN_CONTROL)}...) may follow '
                              '--.')
    key = argument[len('--config.'):].split('=', 1)[0]
    if argument.startswith('--config.') and not key.startswith(RUN_CONTROL):
      raise sweeps.SweepError(f'{argument.split("=", 1)[0]} after -- would change what every '
                              'run trains without changing its name; set it in the sweep (e.g. '
                              f"* points({{'{key}': ...}})) or in --config.")


def check_launcher_options(options):
  """One sentence for an option that the chosen launcher would silently ignore, and for
  --launcher_args that a shell could not split."""
  if options.launcher == 'local':
    given = [flag for flag, value in (('--launcher_args', options.launcher_args),
                                      ('--resubmit', options.resubmit)) if value]
    if given:
      raise sweeps.SweepError(f'{" and ".join(given)} apply to --launcher slurm or tpu_pod, not '
                              'to local runs; drop them or choose a cluster launcher.')
  elif options.parallel != 1:
    raise sweeps.SweepError(f'--parallel applies to --launcher local; the cluster schedules the '
                            f'points --launcher {options.launcher} submits, so drop it.')
  try:
    shlex.split(options.launcher_args)
  except ValueError as error:
    raise sweeps.SweepError(f'--launcher_args {options.launcher_args!r} cannot be split as a '
                            f'shell would ({error}); balance its quotes.') from None


def _parser():
  parser = cli.Parser(prog='python -m launch.sweep', description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', required=True, help='The sweep file, configs/sweeps/NAME.py.')
  parser.add_argument('--config', default=None, help='FILE:VARIANT of points that name none.')
  parser.add_argument('--workdir', required=True, help='The sweep folder: registry and runs.')
  parser.add_argument('--parallel', type=int, default=1, help='Points run at once (local).')
  parser.add_argument('--launcher', default='local', choices=LAUNCHERS)
  parser.add_argument('--launcher_args', default='', help='Arguments of sbatch / tpu_pod.sh.')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands, run nothing.')
  parser.add_argument('--resubmit', action='store_true', help='Submit again the points that were '
                      'submitted but have not finished (a job that failed or ran out of time).')
  return parser


# Reading a run's workdir.


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def saved_step(workdir):
  """The step of the newest complete checkpoint in `workdir` (0 when none)."""
  folder = os.path.join(workdir, 'checkpoints')
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(
      folder) else []
  return max(steps, default=0)


def finished(workdir):
  """Whether the run in `workdir` has logged and saved its last step (a counted model saves no
  checkpoints: its metrics at the last step suffice)."""
  config = _read_json(os.path.join(workdir, 'config.json'))
  if config is None:
    return False
  last = config['train']['num_steps']
  checkpoints = os.path.join(workdir, 'checkpoints')
  saved = not os.path.isdir(checkpoints) or os.path.isdir(os.path.join(checkpoints, str(last)))
  return last in report.metric_lines(workdir) and saved


def outcome(run, workdir, step=None):
  """What the registry records of a run's workdir: step (the last logged unless given), tokens,
  FLOPs, final and best metrics."""
  config = _read_json(os.path.join(workdir, 'config.json'))
  lines = report.metric_lines(workdir)
  final, best = {}, {}
  for entry in lines.values():
    for name, value in entry.items():
      final[name] = value
      direction = report.direction(name) if name.startswith('eval_') else None
      if direction is not None and (name not in best
                                    or (value < best[name]) == (direction == 'min')):
        best[name] = value
  step = max(lines, default=0) if step is None else step
  result = dict(step=step, final=final, best=best, tokens=None, flops=None, num_steps=None,
                params=None, non_embedding_params=None)
  if config is not None:
    t = config['train']
    # Positions per row: an encoder-decoder's rows hold both streams.
    result.update(num_steps=t['num_steps'],
                  tokens=step * t['batch_size'] * (t['seq_len'] + t.get('target_len', 0)))
    result.update(sizes(run.config))
    if result['params'] is not None:
      result['flops'] = step * sweeps.flops_per_step(run.config)
  environment = _read_json(os.path.join(workdir, 'environment.json')) or {}
  result['git'] = environment.get('git') or config_lib.git_revision()
  return result


def sizes(config):
  """The run's parameter count, with and without embeddings (None for a counted model)."""
  family = models.get(config.model.family)
  if getattr(family, 'COUNTED', False):
    return dict(params=None, non_embedding_params=None)
  total = models.count_params(family, config.model)
  return dict(params=total,
              non_embedding_params=total - models.count_embedding_params(family, config.model))


def error_line(log_path):
  """The line that says why a run failed: its `error:` line, else the last line it wrote."""
  if not os.path.exists(log_path):
    return 'no output'
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  starts = [i for i, line in enumerate(lines) if line.startswith('$ ')]
  lines = lines[starts[-1] + 1 if starts else 0:]  # This attempt's output only.
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or ['no output'])[-1]


# The registry.


class Recorder:
  """Appends a sweep's records; the wall time of a run adds up over invocations."""

  def __init__(self, folder, launcher):
    self.folder, self.launcher = folder, launcher
    try:
      self.records = (report.load_registry(folder)
                      if os.path.exists(os.path.join(folder, report.REGISTRY)) else {})
    except ValueError as error:  # A damaged line: one sentence naming it.
      raise sweeps.SweepError(str(error)) from None

  def adopt(self, runs):
    """Gives a run the name it was recorded under when only its name changed (e.g. seeds added
    to the sweep name runs by their seed): the config hash identifies it."""
    by_digest = {name.rsplit('-', 1)[-1]: name for name in self.records}
    for run in runs:
      digest = run.name.rsplit('-', 1)[-1]
      if run.name not in self.records and digest in by_digest:
        run.name = by_digest[digest]
      record = self.records.get(run.name)
      if record is not None and (record['variant'], record.get('group')) != (run.variant,
                                                                             run.group):
        # Grouped as the sweep is now, with what its workdir says read again.
        fields = outcome(run, self.workdir(run)) if record['status'] == 'finished' else {}
        self.record(run, record['status'], error=record.get('error'),
                    workdir=record['workdir'], launcher=record.get('launcher'), **fields)

  def workdir(self, run):
    """Where the run trains: its folder in the sweep, or for a point submitted to a TPU pod the
    bucket's folder it was recorded with (a sweep folder copied elsewhere keeps its runs)."""
    record = self.records.get(run.name, {})
    if record.get('launcher') == 'tpu_pod':
      return record['workdir']
    return os.path.join(self.folder, run.name)

  def status(self, run):
    return self.records.get(run.name, {}).get('status')

  def record(self, run, status, **fields):
    previous = self.records.get(run.name, {})
    record = dict(
        run=run.name, workdir=os.path.abspath(os.path.join(self.folder, run.name)),
        config=run.spec, overrides=run.overrides, variant=run.variant, group=run.group,
        seed=run.config.seed,
        status=status, error=None, launcher=self.launcher, wall_s=previous.get('wall_s', 0.0),
        updated=datetime.datetime.now().isoformat(timespec='seconds'))
    for name in ('step', 'num_steps', 'tokens', 'flops', 'params', 'non_embedding_params',
                 'final', 'best', 'git', 'job'):
      record[name] = previous.get(name)
    record.update(fields)
    self.records[run.name] = record
    sweeps.append_record(self.folder, record)
    return record


# Where each local point runs.


def _visible_gpus():
  listed = os.environ.get('CUDA_VISIBLE_DEVICES')
  if listed is not None:
    return [gpu for gpu in listed.split(',') if gpu.strip()]
  try:
    names = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [str(i) for i, line in enumerate(names.stdout.splitlines()) if line.startswith('GPU')]


def slots(parallel):
  """One (environment changes, CPU cores) per parallel point: the GPUs split evenly when there
  are any, else the CPU cores."""
  gpus = _visible_gpus()
  if gpus:
    if len(gpus) % parallel:
      raise sweeps.SweepError(f'--parallel {parallel} does not divide the {len(gpus)} GPUs; '
                              'choose a divisor.')
    share = len(gpus) // parallel
    return [({'CUDA_VISIBLE_DEVICES': ','.join(gpus[i * share:(i + 1) * share])}, None)
            for i in range(parallel)]
  cores = sorted(os.sched_getaffinity(0))
  if parallel > len(cores):
    raise sweeps.SweepError(f'--parallel {parallel} exceeds the {len(cores)} CPU cores; run at '
                            'most one point per core.')
  share = len(cores) // parallel
  return [({}, set(cores[i * share:(i + 1) * share])) for i in range(parallel)]


def train_command(run, workdir, passthrough):
  return [sys.executable, '-m', 'research.train', '--config', run.spec, '--workdir', workdir,
          *run.arguments(), *passthrough]


# What a point's process runs first, before it becomes the trainer (so that nothing runs between
# fork and exec in the sweep, a multithreaded process): on Linux it asks for SIGTERM when the sweep
# dies, so that a sweep killed by SIGKILL, which it cannot catch, leaves no trainer running on
# (SIGTERM makes a trainer save and stop; one saving already ignores it: research/preemption.py);
# then it pins itself to its cores, if given any.
_POINT_SETUP = """
import ctypes, os, signal, sys
sweep, cores = int(sys.argv[1]), sys.argv[2]
if sys.platform == 'linux':
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  if os.getppid() != sweep:  # The sweep died before the request above.
    sys.exit(143)
if cores:
  os.sched_setaffinity(0, {int(c) for c in cores.split(',')})
os.execvp(sys.argv[3], sys.argv[3:])
"""


def point_command(command, cores):
  """`command` run on `cores` only (None: anywhere), and stopped by SIGTERM when this process
  dies (_POINT_SETUP)."""
  return [sys.executable, '-c', _POINT_SETUP, str(os.getpid()),
          ','.join(map(str, sorted(cores or ()))), *command]


class _Stop:
  """SIGTERM / SIGINT to the sweep: the running points are asked to stop (and save)."""

  def __init__(self):
    self.signal = None

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, number, frame):
    self.signal = signal.Signals(number).name

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)


def run_local(runs, recorder, folder, parallel, passthrough):
  """Runs the points, `parallel` at a time; returns the records of this invocation."""
  free = slots(parallel)
  waiting = list(runs)
  active = {}  # Popen -> (run, slot, started)
  done = []
  with _Stop() as stop:
    while waiting or active:
      while waiting and free and stop.signal is None:
        run = waiting.pop(0)
        slot = free.pop(0)
        workdir = os.path.join(folder, run.name)
        os.makedirs(workdir, exist_ok=True)
        env_changes, cores = slot
        log = open(os.path.join(workdir, LOG_NAME), 'a')
        command = train_command(run, workdir, passthrough)
        log.write(f'$ {shlex.join(command)}\n')
        log.flush()
        process = subprocess.Popen(
            point_command(command, cores), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **env_changes},
            # Its own session: a terminal's Ctrl-C reaches the sweep only, which then asks each
            # run once to stop (a second signal would stop a run in the middle of its save).
            start_new_session=True)
        log.close()
        recorder.record(run, 'running')
        active[process] = (run, slot, time.monotonic())
      if stop.signal is not None:
        for process in active:
          if process.poll() is None and not getattr(process, 'asked', False):
            process.send_signal(signal.SIGTERM)
            process.asked = True
        waiting = []
      for process in [p for p in active if p.poll() is not None]:
        run, slot, started = active.pop(process)
        free.append(slot)
        done.append(_finish(run, process.returncode, time.monotonic() - started, recorder,
                            folder, stopped=stop.signal is not None))
        _print_outcome(done[-1], len(done), len(runs))
      time.sleep(0.1)
    return done, stop.signal


def _finish(run, returncode, seconds, recorder, folder, stopped):
  workdir = os.path.join(folder, run.name)
  wall_s = recorder.records.get(run.name, {}).get('wall_s', 0.0) + seconds
  if returncode == 0 and finished(workdir):
    return recorder.record(run, 'finished', wall_s=wall_s, **outcome(run, workdir))
  if returncode == 0 or stopped:  # Stopped before its last step: it resumes from its checkpoint.
    return recorder.record(run, 'interrupted', wall_s=wall_s,
                           **outcome(run, workdir, step=saved_step(workdir)))
  return recorder.record(run, 'failed', error=error_line(os.path.join(workdir, LOG_NAME)),
                         wall_s=wall_s, **outcome(run, workdir))


def _print_outcome(record, index, total):
  shown = {k: v for k, v in record.get('final', {}).items() if k in ('loss', 'eval_loss')}
  metrics = ' '.join(f'{k}={v:.4g}' for k, v in shown.items())
  detail = record['error'] if record['status'] == 'failed' else metrics
  print(f'[{index}/{total}] {record["run"]}: {record["status"]} after {record["wall_s"]:.0f} s '
        f'{detail}'.rstrip(), flush=True)


# Cluster launchers.


def submit_command(run, launcher, launcher_args, folder, passthrough):
  """The command that submits one point, and the workdir it will train in."""
  extra = [arg.replace('{i}', str(run.index)) for arg in shlex.split(launcher_args)]
  if launcher == 'slurm':
    workdir = os.path.abspath(os.path.join(folder, run.name))
    return (['sbatch', *extra, os.path.join(REPO, 'launch', 'slurm.sbatch'), run.spec, workdir,
             *run.arguments(), *passthrough], workdir)
  bucket = extra[extra.index('--bucket') + 1] if '--bucket' in extra[:-1] else None
  if bucket is None:
    raise sweeps.SweepError('--launcher tpu_pod needs --bucket BUCKET in --launcher_args.')
  name = f'{os.path.basename(os.path.abspath(folder))}/{run.name}'
  return ([os.path.join(REPO, 'launch', 'tpu_pod.sh'), 'run', *extra, '--config', run.spec,
           '--run', name, '--', *run.arguments(), *passthrough], f'/mnt/{bucket}/runs/{name}')


def submit(runs, recorder, launcher, launcher_args, folder, passthrough):
  """Submits each of `runs`; returns the names of those that could not be submitted."""
  if launcher == 'tpu_pod' and '{i}' not in launcher_args:
    raise sweeps.SweepError('A TPU slice trains one run at a time: put {i} in the slice name of '
                            '--launcher_args (one slice per point), or pass --dry_run to print '
                            'the commands and run them in turn.')
  program = SUBMITTERS[launcher]
  if runs and shutil.which(program) is None:
    raise sweeps.SweepError(f'--launcher {launcher} submits with {program}, which is not on this '
                            f'machine\'s PATH; run the sweep where {program} is, or pass '
                            '--dry_run to print the commands.')
  unsubmitted = []
  for count, run in enumerate(runs, 1):
    command, workdir = submit_command(run, launcher, launcher_args, folder, passthrough)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      line = (result.stderr.strip().splitlines() or ['no output'])[-1]
      recorder.record(run, 'failed', error=f'{command[0]} failed: {line}', workdir=workdir)
      print(f'[{count}/{len(runs)}] {run.name}: not submitted ({line})', flush=True)
      unsubmitted.append(run.name)
      continue
    job = re.search(r'(\d+)\s*$', result.stdout.strip())
    recorder.record(run, 'submitted', workdir=workdir, job=job.group(1) if job else None)
    print(f'[{count}/{len(runs)}] {run.name}: submitted', flush=True)
  return unsubmitted


def refresh(runs, recorder):
  """Marks submitted (or running, from a sweep that was killed) points finished when their
  workdir says so."""
  for run in runs:
    record = recorder.records.get(run.name)
    if record and record['status'] in ('submitted', 'running') and finished(
        recorder.workdir(run)):
      recorder.record(run, 'finished', workdir=recorder.workdir(run),
                      **outcome(run, recorder.workdir(run)))


def main(argv):
  # The sweep itself only counts parameters: it leaves every accelerator to its runs.
  jax.config.update('jax_platforms', 'cpu')
  args, passthrough = argv[1:], []
  if '--' in argv:
    cut = argv.index('--')
    args, passthrough = argv[1:cut], argv[cut + 1:]
  try:
    options = _parser().parse_args(args)
    check_passthrough(passthrough)
    if options.parallel < 1:
      raise sweeps.SweepError(f'--parallel {options.parallel} must be at least 1.')
    check_launcher_options(options)
    cli.check_folder(options.workdir, '--workdir')
    points, default = sweeps.load(options.sweep)
    runs = sweeps.expand(points, options.config or default)
    folder = options.workdir
    if options.dry_run:
      for run in runs:
        command = (train_command(run, os.path.join(folder, run.name), passthrough)
                   if options.launcher == 'local' else
                   submit_command(run, options.launcher, options.launcher_args, folder,
                                  passthrough)[0])
        print(shlex.join(command))
      return 0
    recorder = Recorder(folder, options.launcher)
    recorder.adopt(runs)
    refresh(runs, recorder)
    skipped = [run for run in runs if recorder.status(run) == 'finished'
               and finished(recorder.workdir(run))]
    pending = [run for run in runs if run not in skipped
               and (options.launcher == 'local' or options.resubmit
                    or recorder.status(run) != 'submitted')]
    print(f'{len(runs)} points: {len(skipped)} finished before, {len(pending)} to '
          f'{"run" if options.launcher == "local" else "submit"}.', flush=True)
    if options.launcher != 'local':
      unsubmitted = submit(pending, recorder, options.launcher, options.launcher_args, folder,
                           passthrough)
      if unsubmitted:
        print(f'{len(unsubmitted)} of {len(pending)} points were not submitted: '
              f'{", ".join(unsubmitted)}; the lines above give why, and the same command '
              'submits them again.', file=sys.stderr)
        return 1
      return 0
    done, stopped = run_local(pending, recorder, folder, options.parallel, passthrough)
  except ValueError as error:  # SweepError, ConfigError and the command line's errors.
    print(f'error: {error}', file=sys.stderr)
    return 2
  failed = [record['run'] for record in done if record['status'] == 'failed']
  if stopped:
    print(f'Stopped on {stopped}; run the same command to resume.', file=sys.stderr)
    return 130 if stopped == 'SIGINT' else 143
  if failed:
    print(f'{len(failed)} of {len(runs)} points failed: {", ".join(failed)}; see their '
          f'{LOG_NAME}.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
