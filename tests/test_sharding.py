"""Sharded training equals single-device training; accumulation equals one large batch."""

import math

import jax
import numpy as np
import pytest

from research import config as config_lib
from research import mesh as mesh_lib
from research import partitioning
from research import train
from research.data import global_batch
from research.data import synthetic
from research.objectives import causal_lm

MESHES = [dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=4, tensor=2)]
SEQUENCE_MESH = dict(data=2, fsdp=1, sequence=2, tensor=2)  # One style: the sharding is shared.
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def _small_config(decoder_config, style):
  config = decoder_config('tiny')
  m = config.model
  m.style, m.num_heads, m.emb_dim, m.mlp_dim = style, 8, 64, 128
  m.num_kv_heads = 4 if style == 'llama' else 0
  config.train.batch_size, config.train.seq_len, config.train.num_steps = 16, 32, 10
  config.optim.name, config.optim.warmup_steps, config.optim.lr = 'adamw', 2, 1e-2
  return config


def _train(config, mesh_shape, steps=3):
  devices = jax.devices()[:math.prod(mesh_shape.values())]
  mesh_shape = {axis: mesh_shape.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  for axis, size in mesh_shape.items():
    config.mesh[axis] = size
  config_lib.validate(config, len(devices))
  trainer = train.setup(config, mesh_lib.make_mesh(mesh_shape, devices))
  state, records = trainer.state, []
  for step in range(steps):
    host_batch = trainer.pipeline.train_batch(step)
    state, metrics = trainer.train_step(
        state, global_batch.to_global(host_batch, trainer.batch_shardings), trainer.dropout_rng)
    records.append(jax.device_get(metrics))
  return records, jax.device_get(state.params)


def _assert_same_training(records, params, reference_records, reference_params):
  for got, want in zip(records, reference_records):
    assert abs(got['loss'] - want['loss']) <= 1e-5, (got['loss'], want['loss'])
    assert got['tokens'] == want['tokens']
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs


@pytest.mark.slow
@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_sharded_training_matches_one_device(decoder_config, style):
  reference = _train(_small_config(decoder_config, style), ONE_DEVICE)
  assert reference[0][-1]['loss'] < reference[0][0]['loss']  # The steps really train.
  # The sequence axis once (the sharding code is the same for both styles).
  meshes = MESHES + [SEQUENCE_MESH] if style == 'llama' else MESHES
  for mesh_shape in meshes:
    records, params = _train(_small_config(decoder_config, style), mesh_shape)
    _assert_same_training(records, params, *reference)


def test_parameters_are_sharded_as_the_rules_say(decoder_config):
  config = _small_config(decoder_config, 'llama')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  trainer = train.setup(config, mesh_lib.make_mesh(dict(data=1, fsdp=4, tensor=2)))
  # [layers, embed, heads, head_dim]
  query = trainer.state.params['layers']['attn']['query']['kernel']
  assert tuple(query.sharding.spec) == (None, 'fsdp', 'tensor', None)
  mu = trainer.state.opt_state[1][0].mu['layers']['attn']['query']['kernel']
  assert mu.sharding == query.sharding  # Optimizer moments follow their parameters.


def test_gradient_accumulation_matches_one_large_batch(decoder_config):
  mesh_shape = dict(data=2, fsdp=1, tensor=4)
  config = _small_config(decoder_config, 'llama')

  source = synthetic.MarkovSource(config.model.vocab_size, config.data.markov_branching,
                                  config.seed, config.data.min_doc_len,
                                  causal_lm.Transform())
  weights = source.batch(0, 16, 32)['weights']
  padding_per_micro_batch = [int((weights[i::4] == 0).sum()) for i in range(4)]
  assert len(set(padding_per_micro_batch)) > 1, padding_per_micro_batch  # Unequal padding.

  reference = _train(config, mesh_shape)
  accumulated_config = _small_config(decoder_config, 'llama')
  accumulated_config.optim.grad_accum_steps = 4
  _assert_same_training(*_train(accumulated_config, mesh_shape), *reference)


def test_an_unknown_logical_axis_name_is_an_error():
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  with pytest.raises(ValueError, match="Unknown logical axis name 'lenght'"):
    partitioning.logical_to_spec(('batch', 'lenght'), (8, 16), mesh)


def test_rules_name_only_mesh_axes_and_skip_the_reserved_ones_the_mesh_lacks():
  mesh = mesh_lib.make_mesh(dict(data=2, sequence=2, tensor=2), jax.devices()[:8])
  for _, axes in partitioning.LOGICAL_AXIS_RULES:
    for axis in (axes,) if isinstance(axes, str) else axes:
      assert axis in mesh_lib.MESH_AXES + (mesh_lib.EXPERT, mesh_lib.STAGE), axis
  spec = partitioning.logical_to_spec(('batch', 'length', 'expert', 'kv_length'), (4, 8, 2, 8),
                                      mesh)
  assert tuple(spec) == (('data', 'fsdp'), 'sequence', None, None)
