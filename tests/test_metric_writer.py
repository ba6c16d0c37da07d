"""The metric writer: scalars reach metrics.jsonl and TensorBoard's event file, and TensorBoard
costs a run's start no PyTorch import (CI installs torch for the peer tests, as many users do)."""

import json
import struct
import subprocess
import sys

from tensorboardX.proto import event_pb2

import runs

WRITE = """
import sys
from research import metrics
writer = metrics.MetricWriter(sys.argv[1])
writer.write(3, {'loss': 2.5, 'eval_loss': float('nan')})
writer.write(4, {'loss': 2.25})
writer.close()
print('torch loaded by the writer:', 'torch' in sys.modules)
import torch  # Still importable afterwards.
print('torch', torch.__version__)
"""


def _events(folder):
  """[(step, tag, value)] of the scalar summaries in the event files under `folder` (TFRecord:
  a length, its CRC, the record, its CRC)."""
  found = []
  for path in sorted(folder.iterdir()):
    data = path.read_bytes()
    while data:
      (length,) = struct.unpack('<Q', data[:8])
      event = event_pb2.Event.FromString(data[12:12 + length])
      data = data[12 + length + 4:]
      found += [(event.step, value.tag, value.simple_value) for value in event.summary.value]
  return found


def test_scalars_reach_jsonl_and_tensorboard_without_importing_torch(tmp_path):
  result = subprocess.run([sys.executable, '-c', WRITE, str(tmp_path)], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'torch loaded by the writer: False\ntorch 2.' in result.stdout
  lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert lines == [dict(step=3, loss=2.5, eval_loss=None), dict(step=4, loss=2.25)]
  scalars = _events(tmp_path / 'tensorboard')
  assert [(step, tag, value) for step, tag, value in scalars if tag == 'loss'] == [
      (3, 'loss', 2.5), (4, 'loss', 2.25)]
  assert [step for step, tag, _ in scalars if tag == 'eval_loss'] == [3]
