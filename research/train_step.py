"""Pure train and eval steps: (state, batch, rng[, frozen]) -> (state, metrics). No I/O here.

A batch is a dict of arrays described by the objective's batch spec (research/objectives). The
objective gives each loss term's sum over a (micro-)batch and its denominator over the whole
global batch (counts depend on the batch, not on the parameters). Each micro-batch's loss is the
sum over terms of (term sum / global term count), so gradients of micro-batches simply add up and
micro-batching, packing and the host count leave every term unchanged.

`frozen`: arrays an objective reads but never trains (a distillation teacher's parameters, from
objective.frozen(mesh)); they enter the steps as an argument, so that they are neither constants
of the compiled step nor part of the state (not trained, not in the optimizer state, not saved).
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from research import mesh as mesh_lib
from research import optim


def _split_micro_batches(batch, num_micro, mesh):
  """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i takes rows i, i + A, i + 2A...

  Taking strided rows keeps every micro-batch spread over all data shards (no resharding).
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, mesh_lib.BATCH_AXES, *([None] * (x.ndim - 2)))
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x
  return jax.tree.map(split, batch)


def _sums(objective, model, params, batch, rng, frozen):
  """The objective's sums; only an objective with frozen inputs is given them."""
  if frozen is None:
    return objective.sums(model, params, batch, rng)
  return objective.sums(model, params, batch, rng, frozen)


def _objective_value(sums, counts):
  return sum(sums[term]['loss'] / jnp.maximum(counts[term], 1.0) for term in counts)


def _totals(sums, counts):
  """{term: {'loss', 'correct', 'count'}}: what the objective's metrics are computed from."""
  return {term: dict(sums[term], count=counts[term]) for term in counts}


def make_train_step(model, objective, tx, schedule, grad_accum_steps=1, dropout=False, mesh=None):
  """Builds train_step(state, batch, rng, frozen=None); jit it at the call site with shardings and
  donation."""

  def grads_and_sums(params, batch, rng, counts, frozen):
    def loss(p, micro, key):
      sums = _sums(objective, model, p, micro, key, frozen)
      return _objective_value(sums, counts), sums
    return jax.grad(loss, has_aux=True)(params, batch, rng)

  def train_step(state, batch, rng, frozen=None):
    step_rng = jax.random.fold_in(rng, state.step) if dropout else None
    counts = objective.counts(batch)  # Over the whole global batch, before any split.
    if grad_accum_steps == 1:
      grads, sums = grads_and_sums(state.params, batch, step_rng, counts, frozen)
    else:
      micro_batches = _split_micro_batches(batch, grad_accum_steps, mesh)

      def accumulate(carry, inputs):
        index, micro = inputs
        key = None if step_rng is None else jax.random.fold_in(step_rng, index)
        grads, sums = grads_and_sums(state.params, micro, key, counts, frozen)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      shapes = jax.eval_shape(lambda p, micro: _sums(objective, model, p, micro, None, frozen),
                              state.params, jax.tree.map(lambda x: x[0], micro_batches))
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums),
                                      (jnp.arange(grad_accum_steps), micro_batches))
    # Named scopes label these operations in profiles (research/profiling.py).
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    with jax.named_scope('metrics'):
      metrics = dict(loss=_objective_value(sums, counts), tokens=objective.tokens(batch),
                     grad_norm=optim.global_norm(grads), learning_rate=schedule(state.step),
                     totals=_totals(sums, counts))
    return new_state, metrics

  return train_step


def make_eval_step(model, objective):
  """eval_step(params, batch, frozen=None) -> the objective's totals {term: {loss, correct,
  count}} (no dropout); sum them over batches and pass them to objective.metrics."""
  def eval_step(params, batch, frozen=None):
    return _totals(_sums(objective, model, params, batch, None, frozen), objective.counts(batch))
  return eval_step
