"""Multi-host start-up and the device mesh (data, fsdp, tensor)."""

import os

import jax
import numpy as np
from absl import flags
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ('data', 'fsdp', 'tensor')

_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'On a CPU-only host, split the CPU into this many JAX devices (e.g. one '
    'per core) so that the mesh can shard over them; 0 keeps JAX\'s default of one device.')


def configure_cpu_devices():
  """Applies --cpu_devices; call after flag parsing and before the first use of a device."""
  if _CPU_DEVICES.value > 0:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)


def maybe_initialize_distributed():
  """Joins a multi-process job when the launcher says there is one.

  SLURM and TPU pods are detected by `jax.distributed.initialize()` itself; a plain multi-process
  launch (launch/local.sh) sets RESEARCH_COORDINATOR, RESEARCH_NUM_PROCESSES, RESEARCH_PROCESS_ID.
  """
  coordinator = os.environ.get('RESEARCH_COORDINATOR')
  if coordinator:
    jax.distributed.initialize(coordinator, int(os.environ['RESEARCH_NUM_PROCESSES']),
                               int(os.environ['RESEARCH_PROCESS_ID']))
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()


def make_mesh(shape, devices=None):
  """Builds a Mesh from the resolved {'data', 'fsdp', 'tensor'} sizes (see config.validate)."""
  devices = jax.devices() if devices is None else devices
  dims = tuple(shape[axis] for axis in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(dims)  # Topology-unaware fallback (e.g. CPU subsets).
  return Mesh(grid, MESH_AXES)
