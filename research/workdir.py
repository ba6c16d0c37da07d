"""Reading a run back from its workdir: its resolved config and its checkpointed parameters."""

import json
import os

import jax
import ml_collections

from research import checkpoint as checkpoint_lib
from research.models import decoder


def load_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise checkpoint_lib.CheckpointError(f'{workdir} holds no config.json; pass the --workdir of '
                                         'a training run or of research.convert from_hf.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


def load_params(workdir, config=None):
  """(config, params, step) of the newest checkpoint in `workdir`, on the default device."""
  config = config or load_config(workdir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          decoder.abstract_params(config.model))
  params, step = checkpoint_lib.read_params(os.path.join(workdir, 'checkpoints'), abstract)
  return config, params, step
