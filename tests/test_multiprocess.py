"""Two cooperating processes (launch/local.sh) train exactly like one process with the same mesh."""

import json
import os
import socket
import subprocess

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run(workdir, corpus, processes, local_devices, port):
  env = dict(os.environ, NUM_PROCESSES=str(processes), LOCAL_DEVICES=str(local_devices),
             PORT=str(port), PYTHON=os.path.join(REPO, '.venv', 'bin', 'python')
             if os.path.exists(os.path.join(REPO, '.venv', 'bin', 'python')) else 'python3')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={local_devices}'
  overrides = [f'--config.data.paths={corpus}', '--config.data.source=text',
               f'--config.data.data_dir={corpus.parent / "tfds"}', '--config.model.num_layers=2',
               '--config.model.emb_dim=64', '--config.model.mlp_dim=128',
               '--config.train.batch_size=8', '--config.train.seq_len=32',
               '--config.train.num_steps=6', '--config.train.log_every=1',
               '--config.train.eval_every=6', '--config.train.eval_batches=2',
               '--config.train.sample_tokens=0', '--config.mesh.data=2', '--config.mesh.fsdp=2',
               '--config.mesh.tensor=1']
  result = subprocess.run(['bash', 'launch/local.sh', 'configs/decoder.py:tiny', str(workdir),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def test_two_processes_match_one(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(12):
    (corpus / f'f{i}.txt').write_text(''.join(f'row {j} in file {i}\n' for j in range(30 + 5 * i)))
  one = _run(tmp_path / 'one', corpus, processes=1, local_devices=4, port=_free_port())
  two = _run(tmp_path / 'two', corpus, processes=2, local_devices=2, port=_free_port())
  assert [r['step'] for r in two] == list(range(1, 7))
  for a, b in zip(one, two):
    assert abs(a['loss'] - b['loss']) < 1e-5 and a['tokens'] == b['tokens'], (a, b)
  assert abs(one[-1]['eval_loss'] - two[-1]['eval_loss']) < 1e-5
