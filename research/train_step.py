"""Pure train and eval steps: (state, batch, rng) -> (state, metrics). No I/O here.

A batch is a dict of [batch, length] arrays: tokens, targets, weights (0 for padding and for
positions without a next token), positions, and optionally segment_ids (packing; 0 = padding).
The loss is the sum of token losses over the whole global batch divided by its number of real
target tokens, so micro-batching, packing and the host count leave the objective unchanged.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from research import optim
from research.objectives import causal_lm


def _loss_sums(model, params, batch, rng):
  deterministic = rng is None
  logits = model.apply({'params': params}, batch['tokens'], batch['positions'],
                       batch.get('segment_ids'), deterministic=deterministic,
                       rngs=None if deterministic else {'dropout': rng})
  return causal_lm.loss_sums(logits, batch['targets'], batch['weights'])


def _split_micro_batches(batch, num_micro, mesh):
  """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i takes rows i, i + A, i + 2A...

  Taking strided rows keeps every micro-batch spread over all data shards (no resharding).
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, ('data', 'fsdp'), *([None] * (x.ndim - 2)))
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x
  return jax.tree.map(split, batch)


def make_train_step(model, tx, schedule, grad_accum_steps=1, dropout=False, mesh=None):
  """Builds train_step(state, batch, rng); jit it at the call site with shardings and donation."""

  def grads_and_sums(params, batch, rng):
    def loss(p, micro, key):
      sums = _loss_sums(model, p, micro, key)
      return sums['loss'], sums
    return jax.grad(loss, has_aux=True)(params, batch, rng)

  def train_step(state, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step) if dropout else None
    if grad_accum_steps == 1:
      grads, sums = grads_and_sums(state.params, batch, step_rng)
    else:
      micro_batches = _split_micro_batches(batch, grad_accum_steps, mesh)

      def accumulate(carry, inputs):
        index, micro = inputs
        key = None if step_rng is None else jax.random.fold_in(step_rng, index)
        grads, sums = grads_and_sums(state.params, micro, key)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      zero_sums = dict(loss=jnp.zeros(()), tokens=jnp.zeros(()), correct=jnp.zeros(()))
      (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums),
                                      (jnp.arange(grad_accum_steps), micro_batches))
    denominator = jnp.maximum(sums['tokens'], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = dict(loss=sums['loss'] / denominator, accuracy=sums['correct'] / denominator,
                   tokens=sums['tokens'], grad_norm=optim.global_norm(grads),
                   learning_rate=schedule(state.step))
    return new_state, metrics

  return train_step


def make_eval_step(model):
  """eval_step(params, batch) -> summed loss, tokens and correct predictions (deterministic)."""
  def eval_step(params, batch):
    return _loss_sums(model, params, batch, None)
  return eval_step
