"""Training state born sharded: abstract shapes via jax.eval_shape -> shardings -> jitted init."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from research import device_memory
from research import partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def _follow_params(abstract_opt_state, param_shardings, mesh):
  """Optimizer-state leaves that mirror a parameter (same path suffix and shape) share its
  sharding."""
  by_path = {}
  leaves = jax.tree_util.tree_leaves_with_path(param_shardings,
                                               is_leaf=lambda x: isinstance(x, tuple))
  for path, (shape, sharding) in leaves:
    by_path[tuple(path)] = (shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def leaf_sharding(path, leaf):
    for start in range(len(path)):
      match = by_path.get(tuple(path[start:]))
      if match and match[0] == leaf.shape:
        return match[1]
    return replicated
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt_state)


def _plan(model, tx, mesh, init_inputs):
  """(init_params(key) -> boxed params, abstract state, state shardings); nothing allocated."""
  def init_params(key):
    return model.init(key, **init_inputs, method='initialize')['params']

  boxed = jax.eval_shape(init_params, jax.random.key(0))
  param_shardings = partitioning.tree_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)
  shapes_and_shardings = jax.tree.map(lambda a, s: (a.shape, s), abstract_params, param_shardings)
  abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
  state_shardings = TrainState(
      step=NamedSharding(mesh, PartitionSpec()),
      params=param_shardings,
      opt_state=_follow_params(abstract_opt_state, shapes_and_shardings, mesh))
  abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                              opt_state=abstract_opt_state)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      state_shardings)
  return init_params, abstract_state, state_shardings


def abstract(model, tx, mesh, init_inputs):
  """(abstract state, state shardings): ShapeDtypeStructs carrying their shardings, for
  compiling the train step ahead of time (research/plan.py) without allocating anything."""
  return _plan(model, tx, mesh, init_inputs)[1:]


def initializer(model, tx, mesh, init_inputs):
  """(initialise, abstract state, state shardings), nothing allocated: `initialise(rng)` creates
  params and optimizer state directly into their shardings. A resumed run restores into the
  abstract state and never calls it, so it neither compiles nor runs the initialisation.

  `init_inputs`: keyword arguments of the model's `initialize` method, which creates every
  parameter (see research/models). `state_shardings` is what the train step is jitted with. A
  state larger than the memory of the devices that would hold it raises
  device_memory.MemoryShortage here, before anything is allocated.
  """
  init_params, abstract_state, state_shardings = _plan(model, tx, mesh, init_inputs)
  device_memory.check_state(abstract_state)  # See research/device_memory.py.

  def init_state(key):
    params = nn.meta.unbox(init_params(key))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  initialise = jax.jit(init_state, out_shardings=state_shardings)
  return initialise, abstract_state, state_shardings


def create(model, tx, mesh, init_inputs, rng):
  """Initialises params and optimizer state directly into their shardings (see initializer);
  returns (state, state_shardings)."""
  initialise, _, state_shardings = initializer(model, tx, mesh, init_inputs)
  return initialise(rng), state_shardings
