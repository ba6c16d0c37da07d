"""Host numpy batches -> global jax.Arrays sharded over the batch axes of the mesh."""

import jax

from research import partitioning


def batch_shardings(batch, mesh):
  return {name: partitioning.logical_sharding(('batch', 'length'), x.shape, mesh)
          for name, x in batch.items()}


def to_global(batch, shardings):
  """Every host holds the same global numpy batch and contributes the slices its devices own."""
  if jax.process_count() == 1:
    return jax.device_put(batch, shardings)  # One batched transfer.
  return {name: jax.make_array_from_callback(x.shape, shardings[name], lambda index, x=x: x[index])
          for name, x in batch.items()}
