"""Checkpoints through the real command line: exact resume, interrupted saves, start-up precedence."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  for i in range(20):
    (root / f'f{i}.txt').write_text(''.join(f'line {j} of file {i}\n' for j in range(40 + i)))
  return root


def _train(workdir, corpus, *overrides):
  """Runs the real command line: a small model, sharded over (2 data, 2 fsdp, 2 tensor)."""
  args = [sys.executable, '-m', 'research.train', '--config', 'configs/decoder.py:tiny',
          '--workdir', str(workdir), '--config.data.source=text', f'--config.data.paths={corpus}',
          f'--config.data.data_dir={corpus.parent / "tfds"}', '--config.model.num_layers=2',
          '--config.model.emb_dim=64', '--config.model.mlp_dim=128', '--config.model.dropout_rate=0.1',
          '--config.train.batch_size=8', '--config.train.seq_len=32', '--config.train.num_steps=20',
          '--config.train.log_every=1', '--config.train.eval_every=10', '--config.train.eval_batches=1',
          '--config.checkpoint.every_steps=5', '--config.train.sample_tokens=0',
          '--config.train.progress_bar=False', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          '--config.mesh.tensor=2', *overrides]
  return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def _losses(workdir):
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {r['step']: (r['loss'], r['grad_norm'], r['accuracy']) for r in records}


def _params(workdir, step):
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'record'))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  manager.close()
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(state['params']).items()}


def _ok(result):
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_resume_continues_the_exact_trajectory_despite_broken_saves(tmp_path, corpus):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  _ok(_train(straight, corpus))
  _ok(_train(resumed, corpus, '--config.train.stop_at_step=10'))
  checkpoints = resumed / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == ['10', '5']
  # A save interrupted midway: orbax's temporary folder, never listed as a step.
  partial = checkpoints / '15.orbax-checkpoint-tmp-1700000000'
  shutil.copytree(checkpoints / '10', partial)
  shutil.rmtree(partial / 'state' / 'ocdbt.process_0')
  # A finished-looking step whose array data were lost (truncated copy): skipped with a warning.
  shutil.copytree(checkpoints / '10', checkpoints / '12')
  shutil.rmtree(checkpoints / '12' / 'state' / 'ocdbt.process_0')
  shutil.rmtree(checkpoints / '12' / 'state' / 'd')

  result = _ok(_train(resumed, corpus))
  assert 'resumed from step 10' in result.stderr, result.stderr[-2000:]
  assert 'Checkpoint step 12' in result.stderr and 'unreadable' in result.stderr

  straight_losses, resumed_losses = _losses(straight), _losses(resumed)
  assert sorted(resumed_losses) == list(range(1, 21))
  assert resumed_losses == straight_losses  # Identical at every step.
  a, b = _params(straight, 20), _params(resumed, 20)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == np.float32
    np.testing.assert_array_equal(a[name], b[name], err_msg=str(name))  # Bitwise.

  again = _ok(_train(resumed, corpus))  # Nothing left to do: says so, changes nothing.
  assert 'already at step 20' in again.stderr


def test_checkpoint_of_another_model_shape_is_one_sentence(tmp_path, corpus):
  workdir = tmp_path / 'run'
  _ok(_train(workdir, corpus, '--config.train.stop_at_step=5'))
  before = sorted(os.listdir(workdir / 'checkpoints'))
  result = _train(workdir, corpus, '--config.model.emb_dim=96')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: The checkpoint in ') and 'different model' in lines[-1]
  assert lines[-1].endswith('or another --workdir.')
  assert sorted(os.listdir(workdir / 'checkpoints')) == before  # Nothing saved was touched.


def test_init_from_warm_starts_from_another_runs_parameters(tmp_path, corpus):
  source, warm = tmp_path / 'source', tmp_path / 'warm'
  _ok(_train(source, corpus, '--config.train.num_steps=5'))
  result = _ok(_train(warm, corpus, f'--config.checkpoint.init_from={source}',
                      '--config.train.stop_at_step=5', '--config.optim.lr=0'))
  assert 'warm start from the parameters of step 5' in result.stderr
  a, b = _params(source, 5), _params(warm, 5)
  for name in a:  # With a zero learning rate the warm-started parameters stay those of the source.
    np.testing.assert_array_equal(a[name], b[name], err_msg=str(name))
  assert _losses(warm)[1][0] < _losses(source)[1][0]  # It starts where the source ended.
