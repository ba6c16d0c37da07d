"""Host numpy rows -> global jax.Arrays sharded over the batch axes of the mesh.

Each host computes only the batch rows that its own devices hold: `assemble` asks `rows(lo, hi)`
for exactly those ranges of the global batch (the batch is a pure function of the step, so any
host can produce any rows).
"""

import functools

import jax

from research import partitioning
from research.data import packing


def batch_shardings(batch_size, seq_len, mesh):
  sharding = partitioning.logical_sharding(('batch', 'length'), (batch_size, seq_len), mesh)
  return {name: sharding for name in packing.FIELDS}


def assemble(rows, shape, shardings):
  """Global [batch, length] arrays from rows(lo, hi) -> dict of [hi - lo, length] numpy arrays."""
  if jax.process_count() == 1:
    return jax.device_put(rows(0, shape[0]), shardings)  # One batched transfer.
  computed = {}

  def piece(name, index):
    lo, hi, _ = index[0].indices(shape[0])
    if (lo, hi) not in computed:
      computed[(lo, hi)] = rows(lo, hi)
    return computed[(lo, hi)][name][:, index[1]]

  return {name: jax.make_array_from_callback(shape, sharding, functools.partial(piece, name))
          for name, sharding in shardings.items()}


def to_global(batch, shardings):
  """A whole host-side batch (every host holds all of it) as global arrays."""
  shape = next(iter(batch.values())).shape
  return assemble(lambda lo, hi: {k: v[lo:hi] for k, v in batch.items()}, shape, shardings)
