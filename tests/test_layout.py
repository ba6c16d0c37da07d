"""Stacked (scanned) and per-layer parameter layouts convert into each other, optimizer state
included, and a converted checkpoint (research.convert layout) resumes training exactly."""

import functools
import os

import jax
import numpy as np
import pytest

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import convert
from research import layout
from research import mesh as mesh_lib
from research import train
from research.data import global_batch


def _config(decoder_config, scan_layers=True):
  config = decoder_config('tiny')
  m = config.model
  m.num_layers, m.emb_dim, m.mlp_dim, m.scan_layers = 3, 32, 64, scan_layers
  config.train.batch_size, config.train.seq_len = 8, 32
  return config


def _trainer(config):
  mesh = mesh_lib.make_mesh(config_lib.validate(config, 1), jax.devices()[:1])
  return train.setup(config, mesh)


def _steps(trainer, state, first, count):
  losses = []
  for step in range(first, first + count):
    batch = global_batch.assemble(functools.partial(trainer.pipeline.train_batch, step),
                                  trainer.batch_shapes, trainer.batch_shardings)
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
    losses.append(float(metrics['loss']))
  return state, losses


def test_a_train_state_converts_both_ways_without_changing_a_number(decoder_config):
  state = _trainer(_config(decoder_config)).state
  per_layer = layout.convert(state, scan_layers=False)
  assert 'layers' not in per_layer.params and per_layer.params['layers_2']
  mu = per_layer.opt_state[1][0].mu  # Adam's first moment follows the parameters.
  assert set(mu) == set(per_layer.params)
  for i in range(3):  # Each layer from its own slice of the stack.
    np.testing.assert_array_equal(per_layer.params[f'layers_{i}']['mlp']['up']['kernel'],
                                  np.asarray(state.params['layers']['mlp']['up']['kernel'][i]))
  back = layout.convert(per_layer, scan_layers=True)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), state, back)
  assert all(jax.tree.leaves(same))


def test_twelve_layers_stack_in_numeric_order_and_back():
  """layers_10 follows layers_9, not layers_1 (as names would sort)."""
  per_layer = {f'layers_{i}': {'w': np.full((2,), i)} for i in range(12)}
  per_layer['embed'] = np.zeros(3)
  stacked = layout.stack(per_layer)
  assert stacked['layers']['w'][:, 0].tolist() == list(range(12))
  back = layout.unstack(stacked)
  assert sorted(back) == sorted(per_layer)
  assert all(np.array_equal(back[k]['w'], per_layer[k]['w']) for k in per_layer if k != 'embed')


def test_a_converted_checkpoint_resumes_with_the_losses_of_the_original_layout(decoder_config,
                                                                             tmp_path):
  config = _config(decoder_config)
  scanned = _trainer(config)
  state, _ = _steps(scanned, scanned.state, 0, 2)
  config_lib.record_run(config, str(tmp_path / 'run'))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), keep=1)
  checkpointer.save(2, state, checkpoint_lib.make_record(
      2, scanned.dropout_rng, scanned.pipeline.position(2), config))
  checkpointer.wait()
  checkpointer.close()
  _, want = _steps(scanned, state, 2, 3)

  new = convert.change_layout(str(tmp_path / 'run'), str(tmp_path / 'per_layer'))
  assert new.model.scan_layers is False
  per_layer_config = _config(decoder_config, scan_layers=False)
  per_layer = _trainer(per_layer_config)
  reader = checkpoint_lib.Checkpointer(str(tmp_path / 'per_layer' / 'checkpoints'), keep=1)
  restored, record = reader.restore(per_layer.state, per_layer.state_shardings,
                                    checkpoint_lib.settings(per_layer_config))
  reader.close()
  assert record['step'] == 2 and 'layers_2' in restored.params
  _, got = _steps(per_layer, restored, 2, 3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match='is not empty; pass a new or empty folder'):
    convert.change_layout(str(tmp_path / 'run'), str(tmp_path / 'per_layer'))


def test_a_run_with_factored_adafactor_moments_keeps_its_layout(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(os.path.join(repo, 'configs', 'encoder_decoder.py:t5_small'))
  assert config.optim.name == 'adafactor'
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(config.to_json_best_effort())
  with pytest.raises(ValueError, match='optim.name=adafactor cannot be changed'):
    convert.change_layout(str(tmp_path / 'run'), str(tmp_path / 'new'))


@pytest.mark.parametrize('spec', ['rnn.py:lstm_tiny', 'rnn_seq2seq.py:gru_attention_tiny',
                                  'ngram.py', 'word_vectors.py'])
def test_a_family_without_a_layer_stack_has_no_layout_to_change(tmp_path, spec):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(os.path.join(repo, 'configs', spec))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(config.to_json_best_effort())
  with pytest.raises(ValueError, match=rf'^model.family={config.model.family} has no stack of '
                     'layers whose layout could change'):
    convert.change_layout(str(tmp_path / 'run'), str(tmp_path / 'new'))
