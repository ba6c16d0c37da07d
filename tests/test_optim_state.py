"""optim.mu_dtype: a bfloat16 first moment trains like float32, is saved and restored as bfloat16,
and a resume with another mu_dtype, an unknown name or an optimizer without one is one sentence."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import mesh as mesh_lib
from research import models
from research import optim
from research import train
from research import train_state
from research.data import global_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _moments(opt_state):
  """(first moments, second moments or None) of the adamw or lion state inside the chain."""
  state = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, 'mu'))
               if hasattr(s, 'mu'))
  return state.mu, getattr(state, 'nu', None)


def _run(optim_config, params, grads):
  tx, _ = optim.make_optimizer(optim_config, num_steps=10)
  opt_state = tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


@pytest.mark.parametrize('name', ['adamw', 'lion'])
def test_a_bfloat16_first_moment_updates_like_float32(decoder_config, name):
  config = decoder_config('tiny')
  o = config.optim
  o.name, o.decay, o.warmup_steps, o.lr, o.clip_norm = name, 'constant', 0, 1e-2, 0.0
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)},
            'norm': {'scale': jnp.ones((32,), jnp.float32)}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(3)]
  reference, reference_state = _run(o, params, grads)
  o.mu_dtype = 'bfloat16'
  got, state = _run(o, params, grads)
  mu, nu = _moments(state)
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  if nu is not None:
    assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(_moments(reference_state)[0])} == {
      jnp.dtype(jnp.float32)}
  # Each step moves a parameter by about lr (adamw: mu / sqrt(nu); lion: a sign). bfloat16 keeps
  # 8 bits of the stored moment, so adamw's steps differ by under 1% of lr; lion's signs agree
  # except where a moment is within a rounding of 0, which these random gradients never reach.
  steps = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)), got, reference)
  assert max(float(x.max()) for x in jax.tree.leaves(steps)) <= 0.01 * o.lr * len(grads)
  moved = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                          for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))])
  assert moved.mean() > 0.5 * o.lr  # The steps are large next to the tolerance above.


@pytest.mark.parametrize('key, value, words', [
    ('mu_dtype', 'float16', "config.optim.mu_dtype='float16' is not one of"),
    ('name', 'adafactor', "applies only to optim.name in ['adamw', 'lion']"),
])
def test_mu_dtype_errors_are_one_sentence(decoder_config, key, value, words):
  config = decoder_config('tiny')
  config.optim.mu_dtype = 'bfloat16'
  config.optim[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert words in str(error.value) and str(error.value).count('. ') == 0, str(error.value)


def _config(decoder_config, mu_dtype):
  config = decoder_config('tiny')
  config.optim.mu_dtype = mu_dtype
  config.mesh.data = 1
  config.model.num_layers = 1
  return config


def test_a_resumed_run_restores_its_bfloat16_first_moment_without_a_fresh_state(
    decoder_config, tmp_path):
  config = _config(decoder_config, 'bfloat16')
  mesh = mesh_lib.make_mesh(config_lib.validate(config, 1), jax.devices()[:1])
  trainer = train.setup(config, mesh)
  state = jax.tree.map(jnp.copy, trainer.state)  # The step donates its input state.
  for step in range(2):  # Moments off their initial zeros, so that a reset would show.
    batch = global_batch.to_global(trainer.pipeline.train_batch(step), trainer.batch_shardings)
    state, _ = trainer.train_step(state, batch, trainer.dropout_rng)
  saved = jax.device_get(state)
  assert all(np.any(x) for x in jax.tree.leaves(_moments(saved.opt_state)[0]))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(3, state, checkpoint_lib.make_record(
      3, trainer.dropout_rng, trainer.pipeline.position(3), config))
  checkpointer.wait()

  config.checkpoint.init_from = str(tmp_path / 'pretrained')  # Its own checkpoints come first.

  def refuse(rng):
    raise AssertionError('a resumed run initialised a fresh state')

  # The run restores into the state's shapes: it holds one copy of the state, never a fresh one.
  resumed = dataclasses.replace(trainer, initialise=refuse)
  restored, _, description = train._start_up(config, resumed, checkpointer)
  assert description == (f'resumed from step 2 in {tmp_path} (checkpoint.init_from={tmp_path}/'
                         'pretrained is not read: a run that has checkpoints resumes from them)')
  mu, nu = _moments(restored.opt_state)
  assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), b)

  other = _config(decoder_config, 'float32')
  family = models.get(other.model.family)
  tx, _ = optim.make_optimizer(other.optim, other.train.num_steps)
  abstract, shardings = train_state.abstract(family.build(other.model), tx, mesh,
                                             family.init_inputs(other.train.seq_len))
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    checkpointer.restore(abstract, shardings, checkpoint_lib.settings(other))
  assert "optim.mu_dtype: 'bfloat16' there, 'float32' here" in str(error.value), str(error.value)
  checkpointer.close()


# Another value for every optim setting, to see whether it changes the state's arrays.
_OTHER_VALUES = dict(name=['lion', 'adafactor'], mu_dtype=['bfloat16'], clip_norm=[0.0, 0.5],
                     lr=[1e-4], warmup_steps=[0], decay=['constant', 'linear', 'rsqrt'],
                     end_lr_ratio=[0.0], b1=[0.8], b2=[0.9], eps=[1e-6], weight_decay=[0.0],
                     decay_embeddings=[True], decay_norms_and_biases=[True],
                     grad_accum_steps=[2])


def _state_arrays(optim_config):
  params = {'layer': {'kernel': jnp.zeros((4, 8)), 'bias': jnp.zeros(8)},
            'embedding': jnp.zeros((16, 4))}
  tx, _ = optim.make_optimizer(optim_config, num_steps=10)
  state = jax.eval_shape(tx.init, params)
  return {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_the_settings_named_as_shaping_the_optimizer_state_are_exactly_those_that_do(
    decoder_config):
  base = decoder_config('tiny').optim
  assert sorted(_OTHER_VALUES) == sorted(base.keys())  # A new setting needs a value here.
  shaping = set()
  for key, values in _OTHER_VALUES.items():
    for value in values:
      other = base.copy_and_resolve_references()
      other[key] = value
      if _state_arrays(other) != _state_arrays(base):
        shaping.add(f'optim.{key}')
  assert shaping == set(optim.STATE_SETTINGS)
