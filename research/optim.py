"""Optimiser from config: warm-up + decay schedule, weight-decay mask, clipping.

Gradient accumulation lives in train_step.py, where the loss is normalised by the token count of
the whole global batch; the optimiser only ever sees the final, already normalised gradient.

`mu_dtype` stores the first moment (momentum) of adamw and lion in bfloat16, saving a quarter of
adamw's state; the second moment always stays float32, where its small values keep their
precision. The dtype is part of the state's structure, so a checkpoint records it and a resume
with another mu_dtype is refused in one sentence (research/checkpoint.py).
"""

import jax
import jax.numpy as jnp
import optax

from research.config import ConfigError

_NO_DECAY_LEAVES = ('scale', 'bias')  # Norm scales and biases.
_EMBEDDING_LEAVES = ('embedding',)
MU_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_HAVE_MU = ('adamw', 'lion')  # The optimizers with a first moment whose dtype optax sets.
# The settings that shape the state's arrays (which optimizer, the first moment's dtype, a
# clipping stage or none); the others (the schedule, betas, weight decay) may change on resume,
# so a checkpoint of another state names only these.
STATE_SETTINGS = ('optim.name', 'optim.mu_dtype', 'optim.clip_norm')


def learning_rate_schedule(optim, num_steps):
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then the chosen decay.

  Closed forms for s >= W (W = warmup_steps, T = num_steps, r = end_lr_ratio):
    cosine:   lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (T - W))) / 2)
    linear:   lr * (1 - (1 - r) * (s - W) / (T - W))
    rsqrt:    lr * sqrt(max(W, 1) / max(s, W, 1))
    constant: lr
  """
  lr, warmup = optim.lr, optim.warmup_steps
  end = lr * optim.end_lr_ratio
  decay_steps = max(num_steps - warmup, 1)
  base = max(warmup, 1)
  decays = {
      'cosine': lambda: optax.cosine_decay_schedule(lr, decay_steps, alpha=optim.end_lr_ratio),
      'linear': lambda: optax.linear_schedule(lr, end, decay_steps),
      'rsqrt': lambda: lambda count: lr * jnp.sqrt(base / jnp.maximum(count + warmup, base)),
      'constant': lambda: optax.constant_schedule(lr),
  }
  decay = _choose('optim.decay', optim.decay, decays)()
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _choose(key, name, table):
  if name not in table:
    raise ConfigError(f'config.{key}={name!r} is not one of {sorted(table)}.')
  return table[name]


def weight_decay_mask(params, decay_embeddings=False, decay_norms_and_biases=False):
  """True for leaves that receive weight decay: kernels always, others only when asked."""
  def decide(path, _):
    leaf = getattr(path[-1], 'key', str(path[-1]))
    if leaf in _NO_DECAY_LEAVES:
      return decay_norms_and_biases
    if leaf in _EMBEDDING_LEAVES:
      return decay_embeddings
    return True
  return jax.tree_util.tree_map_with_path(decide, params)


def mu_dtype(optim):
  """The dtype of the first moment named by optim.mu_dtype; ConfigError for an unknown name, or
  for a non-default one with an optimizer that keeps no first moment."""
  name = optim.get('mu_dtype', 'float32')  # The config of a run recorded before the key existed.
  dtype = _choose('optim.mu_dtype', name, MU_DTYPES)
  if name != 'float32' and optim.name not in _HAVE_MU:
    raise ConfigError(f'config.optim.mu_dtype={name!r} applies only to optim.name in '
                      f'{list(_HAVE_MU)} ({optim.name} keeps no first moment); leave it float32.')
  return dtype


def make_optimizer(optim, num_steps):
  """Returns (optax transformation, schedule)."""
  schedule = learning_rate_schedule(optim, num_steps)
  mask = lambda params: weight_decay_mask(params, optim.decay_embeddings,
                                          optim.decay_norms_and_biases)
  mu = mu_dtype(optim)
  optimizers = {
      'adamw': lambda: optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                   mu_dtype=mu, weight_decay=optim.weight_decay, mask=mask),
      'lion': lambda: optax.lion(schedule, b1=optim.b1, b2=optim.b2, mu_dtype=mu,
                                 weight_decay=optim.weight_decay, mask=mask),
      'adafactor': lambda: optax.adafactor(schedule, weight_decay_rate=optim.weight_decay or None,
                                           weight_decay_mask=mask),
  }
  core = _choose('optim.name', optim.name, optimizers)()
  if optim.clip_norm > 0:
    core = optax.chain(optax.clip_by_global_norm(optim.clip_norm), core)
  return core, schedule


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
