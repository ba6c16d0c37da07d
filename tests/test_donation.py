"""The train step donates its state: the compiled step writes the new state into the old one's
buffers, so that training holds one copy of the parameters and optimizer state."""

import math

import jax

from research import config as config_lib
from research import mesh as mesh_lib
from research import train
from research.data import global_batch


def _bytes_per_device(tree):
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_the_compiled_train_step_aliases_the_whole_state_and_deletes_the_old_one(decoder_config):
  config = decoder_config('tiny')
  config.model.num_layers = 1
  shape = dict(data=2, fsdp=2, tensor=1)
  for axis in mesh_lib.MESH_AXES:
    config.mesh[axis] = shape.get(axis, 1)
  devices = jax.devices()[:math.prod(shape.values())]
  trainer = train.setup(config, mesh_lib.make_mesh(config_lib.validate(config, len(devices)),
                                                   devices))
  batch = global_batch.to_global(trainer.pipeline.train_batch(0), trainer.batch_shardings)
  compiled = trainer.train_step.lower(trainer.state, batch, trainer.dropout_rng).compile()
  memory = compiled.memory_analysis()
  state_bytes = _bytes_per_device(trainer.state)
  # Every output buffer of the new state is one of the old state's (per device).
  assert memory.alias_size_in_bytes >= state_bytes > 0, (memory, state_bytes)

  old = trainer.state
  new, metrics = compiled(old, batch, trainer.dropout_rng)
  assert float(metrics['loss']) > 0
  assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))
  assert int(new.step) == 1
