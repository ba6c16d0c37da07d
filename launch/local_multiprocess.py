"""Runs training as N cooperating processes on this machine: a rehearsal of a multi-host job.

  python launch/local_multiprocess.py [--processes 2] [--local_devices 4] \
      configs/decoder.py:tiny /tmp/tiny [--config.key=value ...]

Each process runs `python -m research.train` in the launcher's working folder (relative paths
mean what they mean to research.train), sees `--local_devices` CPU devices and joins the others
through jax.distributed on a free local port (gloo collectives). Its output is streamed with a
`[pN]` prefix; when one process fails, the others are stopped and its exit code is returned.
SIGTERM or Ctrl-C to the launcher is passed on once to every process, which then stop together
after saving a checkpoint.
"""

import argparse
import codecs
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 20  # After a failure, how long the other processes get to stop before being killed.


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(base, index, processes, local_devices, port):
  """The environment of process `index`: its place in the job and its CPU devices."""
  env = dict(base, RESEARCH_CLUSTER='local', RESEARCH_COORDINATOR=f'localhost:{port}',
             RESEARCH_NUM_PROCESSES=str(processes), RESEARCH_PROCESS_ID=str(index),
             JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  flags = [f for f in base.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={local_devices}'])
  # `-m research.train` from any working folder (the launcher's, where relative paths start).
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [p for p in [base.get('PYTHONPATH')] if p])
  return env


def train_command(python, index, config, workdir, overrides):
  progress = ['--config.train.progress_bar=False'] if index else []  # One bar: process 0's.
  return [python, '-m', 'research.train', '--config', config, '--workdir', workdir, *progress,
          *overrides]


def _stream(pipe, prefix, out):
  """Copies `pipe` to `out`, each line (or progress-bar update) preceded by `prefix`."""
  at_line_start = True
  decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')  # Characters split by reads.
  while True:
    chunk = os.read(pipe.fileno(), 65536)
    if not chunk:
      break
    text = decoder.decode(chunk)
    pieces = []
    for char in text:
      if at_line_start:
        pieces.append(prefix)
      pieces.append(char)
      at_line_start = char in '\n\r'
    out.write(''.join(pieces))
    out.flush()


def _ending(code):
  if code < 0:
    return f'was killed by {signal.Signals(-code).name}'
  return f'exited with code {code}'


class _Parser(argparse.ArgumentParser):
  """Errors as one sentence (`error: ...`, exit 2), as the project's other commands give them."""

  def error(self, message):
    raise ValueError(f'{message[:1].upper()}{message[1:].rstrip(".")}; see --help.')


def _parse(argv):
  parser = _Parser(prog='python launch/local_multiprocess.py',
                   description=__doc__.split('\n\n')[0],
                   epilog='Arguments after WORKDIR are --config.KEY=VALUE overrides, given to '
                          'every process.')
  parser.add_argument('--processes', type=int, default=2,
                      help='How many processes (default: 2).')
  parser.add_argument('--local_devices', type=int, default=1,
                      help='CPU devices per process (default: 1).')
  parser.add_argument('--python', default=sys.executable,
                      help='The Python that runs them (default: this one).')
  parser.add_argument('config', help='Config file and variant, e.g. configs/decoder.py:tiny.')
  parser.add_argument('workdir', help="The run's workdir, shared by the processes.")
  args, overrides = parser.parse_known_args(argv)
  if args.processes < 1 or args.local_devices < 1:
    parser.error('--processes and --local_devices must be at least 1')
  unknown = [a for a in overrides if not a.startswith('--config.')]
  if unknown:  # A mistyped option would reach research.train as a config or a workdir.
    parser.error(f'unknown argument {unknown[0]} (after the options, CONFIG, WORKDIR and '
                 '--config.KEY=VALUE overrides only)')
  if shutil.which(args.python) is None:
    parser.error(f'--python {args.python} is not a Python to run')
  return args, overrides


def main(argv):
  try:
    args, overrides = _parse(argv)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  port = free_port()
  children = []
  for index in range(args.processes):
    child = subprocess.Popen(
        train_command(args.python, index, args.config, args.workdir, overrides),
        env=process_env(os.environ, index, args.processes, args.local_devices, port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)  # Ctrl-C reaches the children once, through the launcher.
    print(f'[launch] process {index} started (pid {child.pid})', flush=True)
    children.append(child)
  streams = [threading.Thread(target=_stream, args=(pipe, f'[p{i}] ', out), daemon=True)
             for i, child in enumerate(children)
             for pipe, out in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))]
  for thread in streams:
    thread.start()

  def forward(number, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(number)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  status, failed_at, reported = 0, None, set()
  while any(child.poll() is None for child in children) or len(reported) < len(children):
    for index, child in enumerate(children):
      if child.poll() is None or index in reported:
        continue
      reported.add(index)
      if child.returncode == 0:
        continue
      print(f'[launch] process {index} (pid {child.pid}) {_ending(child.returncode)}'
            + ('; stopping the others.' if status == 0 else '.'), file=sys.stderr, flush=True)
      if status == 0:
        status, failed_at = child.returncode, time.monotonic()
        for other in children:
          if other.poll() is None:
            other.terminate()
    if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
      for child in children:
        if child.poll() is None:
          child.kill()
    time.sleep(0.1)
  for thread in streams:
    thread.join()
  return status if status >= 0 else 128 - status  # Killed by signal N: 128 + N, as shells do.


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
