"""A peer trainer in a process of its own, timed by research.bench train --peer.

The peer (eager PyTorch) and our step must not share a process: PyTorch's OpenMP threads
busy-wait after each operation and XLA's thread pool does too, so whichever side ran the last
window would steal cores from the other's. Here each side's threads stop spinning and sleep while
the other runs its window, so both are timed as they run alone, still in alternating windows of
one run (same machine, same moment).

Protocol (one line each way): the parent writes a JSON header {module, config, batch_size,
seq_len}; this process answers 'ready' or 'error: SENTENCE'; then each line N runs N training
steps and answers the tokens trained; an empty line or end of input ends it.

  python -m research.peers.serve   (started by research/bench.py, not by hand)
"""

import importlib
import json
import os
import subprocess
import sys

import ml_collections


class PeerProcess:
  """run_steps(n) -> tokens of the peer `module`'s trainer (make_trainer) in a child process."""

  def __init__(self, module, config, batch_size, seq_len):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get('PYTHONPATH')] if p]))  # From any directory.
    self.process = subprocess.Popen([sys.executable, '-m', 'research.peers.serve'], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._send(json.dumps(dict(module=module, config=json.loads(config.to_json_best_effort()),
                               batch_size=batch_size, seq_len=seq_len)))
    try:
      answer = self._receive()
    except RuntimeError:
      self.close()
      raise
    if answer != 'ready':
      self.close()
      raise ValueError(answer.removeprefix('error: '))

  def _send(self, line):
    self.process.stdin.write(line + '\n')
    self.process.stdin.flush()

  def _receive(self):
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'The peer process ended (exit code {self.process.wait()}).')
    return line.strip()

  def __call__(self, count):
    self._send(str(count))
    return float(self._receive())

  def close(self):
    """Ends the child (asked first, killed if it does not end) and closes both pipes."""
    if self.process.poll() is None:
      try:
        self.process.stdin.close()
        self.process.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()
        self.process.wait()
    for pipe in (self.process.stdin, self.process.stdout):
      pipe.close()


def main():
  # The protocol keeps stdout to itself: anything the peer's libraries print goes to stderr.
  protocol = os.fdopen(os.dup(sys.stdout.fileno()), 'w')
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  header = json.loads(sys.stdin.readline())
  config = ml_collections.ConfigDict(header['config'])
  try:
    run_steps = importlib.import_module(header['module']).make_trainer(
        config, header['batch_size'], header['seq_len'])
  except ValueError as error:
    print(f'error: {error}', file=protocol, flush=True)
    return 0
  except ImportError as error:  # PyTorch or transformers, which training itself does not need.
    missing = isinstance(error, ModuleNotFoundError) and (error.name or '').split('.')[0] in (
        'torch', 'transformers')
    reason = (f'needs {error.name}, which is not installed here' if missing
              else f'could not be imported ({error})')
    print(f'error: --peer=torch {reason}; install the peers with pip install -r '
          'requirements-bench.txt, which pins versions that work.', file=protocol, flush=True)
    return 0
  print('ready', file=protocol, flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    print(run_steps(int(line)), file=protocol, flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
