"""Optimisers, bf16 compute and dropout through the real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import mesh as mesh_lib
from research import train
from research.data import global_batch


def _trainer(config, mesh_shape=None):
  mesh_shape = mesh_shape or dict(data=1, fsdp=1, tensor=1)
  devices = jax.devices()[:int(np.prod(list(mesh_shape.values())))]
  mesh_shape = {axis: mesh_shape.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  for axis, size in mesh_shape.items():
    config.mesh[axis] = size
  config_lib.validate(config, len(devices))
  return train.setup(config, mesh_lib.make_mesh(mesh_shape, devices))


def _losses(trainer, config, steps, rng=None):
  state, losses = trainer.state, []
  for step in range(steps):
    batch = trainer.pipeline.train_batch(step)
    state, metrics = trainer.train_step(
        state, global_batch.to_global(batch, trainer.batch_shardings),
        trainer.dropout_rng if rng is None else rng)
    losses.append(float(metrics['loss']))
  return losses, state


@pytest.mark.slow
@pytest.mark.parametrize('name, lr', [('adamw', 3e-3), ('adafactor', 1e-1), ('lion', 3e-4)])
def test_each_optimizer_trains_on_a_sharded_mesh(decoder_config, name, lr):
  config = decoder_config('tiny')
  config.optim.name, config.optim.lr, config.optim.warmup_steps = name, lr, 5
  config.train.batch_size = 8
  trainer = _trainer(config, dict(data=2, fsdp=2, tensor=2))
  losses, state = _losses(trainer, config, steps=40)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
  assert int(state.step) == 40


def test_bfloat16_compute_keeps_float32_parameters(decoder_config):
  reference = decoder_config('tiny')
  low = decoder_config('tiny')
  low.model.dtype = 'bfloat16'
  ref_trainer, trainer = _trainer(reference), _trainer(low)
  ref_losses, _ = _losses(ref_trainer, reference, steps=5)
  losses, state = _losses(trainer, low, steps=5)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  np.testing.assert_allclose(losses, ref_losses, atol=0.05)
  assert losses != ref_losses  # Close, not the same: the products really ran in bf16.

  def bf16_products(trainer):
    batch = global_batch.to_global(trainer.pipeline.train_batch(0), trainer.batch_shardings)
    text = trainer.train_step.lower(trainer.state, batch, trainer.dropout_rng).as_text()
    dots = [line for line in text.splitlines() if 'dot_general' in line]
    return sum('bf16' in line for line in dots), len(dots)

  low_dots, all_dots = bf16_products(trainer)
  assert low_dots >= 0.8 * all_dots and bf16_products(ref_trainer)[0] == 0, (low_dots, all_dots)


def test_dropout_uses_the_explicit_rng_and_evaluation_is_deterministic(decoder_config):
  config = decoder_config('tiny')
  config.model.dropout_rate = 0.2
  trainer = _trainer(config)
  batch = global_batch.to_global(trainer.pipeline.train_batch(0), trainer.batch_shardings)

  def first_loss(key):
    state = jax.tree.map(jnp.copy, trainer.state)  # The step donates its input state.
    return float(trainer.train_step(state, batch, key)[1]['loss'])

  assert first_loss(jax.random.key(1)) == first_loss(jax.random.key(1))
  assert first_loss(jax.random.key(1)) != first_loss(jax.random.key(2))
  first = jax.device_get(trainer.eval_step(trainer.state.params, batch))
  second = jax.device_get(trainer.eval_step(trainer.state.params, batch))
  assert first == second
  plain = decoder_config('tiny')  # Evaluation runs without dropout: as the model without it.
  plain.model.dropout_rate = 0.0
  assert jax.device_get(_trainer(plain).eval_step(trainer.state.params, batch)) == first


def test_bits_per_byte_divide_the_loss_in_bits_by_the_bytes_the_targets_spell(decoder_config):
  from research import models, objectives
  config = decoder_config('tiny')
  config.data.source = 'stdlib'  # Text through the byte tokenizer (eos = 2 spells no byte).
  objective = objectives.build(config)
  model = models.get('decoder').build(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), method='initialize')
  targets = np.array([[70, 71, 2, 72, 73, 74, 0, 0]], np.int32)
  weights = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], np.float32)  # 4 weighted bytes and an eos.
  batch = dict(tokens=np.roll(targets, 1, axis=1), targets=targets, weights=weights,
               positions=np.arange(8, dtype=np.int32)[None], segment_ids=np.ones((1, 8), np.int32))
  sums = objectives.host_totals(objective.sums(model, params['params'], batch, None))['lm']
  assert sums['bytes'] == objective.target_bytes(batch) == 4.0
  metrics = objective.metrics({'lm': dict(sums, count=5.0)})
  assert metrics['bits_per_byte'] == pytest.approx(sums['loss'] / np.log(2) / 4.0)
  assert metrics['loss'] == pytest.approx(sums['loss'] / 5.0)
  assert 'bits_per_byte' in objective.metric_names()
  config.data.source = 'markov'  # Synthetic tokens spell no text: no bits per byte.
  assert 'bits_per_byte' not in objectives.build(config).metric_names()
