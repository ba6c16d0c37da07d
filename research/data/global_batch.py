"""Host numpy rows -> global jax.Arrays sharded over the batch axes of the mesh.

The objective's batch spec (research/objectives: field -> per-row shape, dtype, logical axes)
gives each field's global shape and sharding; fields may have any rank ([batch] labels,
[batch, length] tokens, [batch, predictions] positions...). Each host computes only the batch
rows that its own devices hold: `assemble` asks `rows(lo, hi)` for exactly those ranges of the
global batch (the batch is a pure function of the step, so any host can produce any rows).
"""

import functools

import jax

from research import partitioning


def batch_shapes(fields, batch_size):
  return {name: (batch_size,) + f.shape for name, f in fields.items()}


def batch_shardings(fields, batch_size, mesh):
  return {name: partitioning.logical_sharding(('batch',) + f.axes, shape, mesh)
          for (name, f), shape in zip(fields.items(), batch_shapes(fields, batch_size).values())}


def abstract(fields, batch_size, mesh):
  """The batch as ShapeDtypeStructs with their shardings, for compiling a step ahead of time."""
  shapes = batch_shapes(fields, batch_size)
  shardings = batch_shardings(fields, batch_size, mesh)
  return {name: jax.ShapeDtypeStruct(shapes[name], field.dtype, sharding=shardings[name])
          for name, field in fields.items()}


def assemble(rows, shapes, shardings):
  """Global arrays of `shapes` from rows(lo, hi) -> dict of [hi - lo, ...] numpy arrays."""
  batch_size = next(iter(shapes.values()))[0]
  if jax.process_count() == 1:
    return jax.device_put(rows(0, batch_size), shardings)  # One batched transfer.
  computed = {}

  def piece(name, index):
    lo, hi, _ = index[0].indices(batch_size)
    if (lo, hi) not in computed:
      computed[(lo, hi)] = rows(lo, hi)
    return computed[(lo, hi)][name][(slice(None),) + tuple(index[1:])]

  return {name: jax.make_array_from_callback(shapes[name], sharding,
                                             functools.partial(piece, name))
          for name, sharding in shardings.items()}


def to_global(batch, shardings):
  """A whole host-side batch (every host holds all of it) as global arrays."""
  shapes = {name: value.shape for name, value in batch.items()}
  return assemble(lambda lo, hi: {k: v[lo:hi] for k, v in batch.items()}, shapes, shardings)


def host_ranges(shapes, shardings):
  """The (lo, hi) ranges of the global batch that this process's devices hold: the rows it
  must compute (every field shares the batch axis's sharding), as `assemble` asks for them."""
  name, shape = next(iter(shapes.items()))
  batch_size = shape[0]
  if jax.process_count() == 1:
    return [(0, batch_size)]
  indices = shardings[name].addressable_devices_indices_map(shape).values()
  return sorted({index[0].indices(batch_size)[:2] for index in indices})
