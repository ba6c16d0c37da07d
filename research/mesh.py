"""Multi-host start-up and the device mesh; the one place where mesh axis names are spelt.

Mesh axes: `data` (batch; may span slices over DCN), `fsdp` (batch and parameters; may span
slices), `sequence` (activations along the sequence; attention gathers keys and values) and
`tensor` (heads, MLP and vocabulary). `expert` and `stage` are reserved for mixture-of-experts and
pipeline layers: the rules table (research/partitioning.py) already names them, and a mesh
without them leaves their logical axes replicated.
"""

import math
import os

import jax
import numpy as np
from absl import flags
from jax.experimental import mesh_utils
from jax.sharding import Mesh

DATA, FSDP, SEQUENCE, TENSOR = 'data', 'fsdp', 'sequence', 'tensor'
EXPERT, STAGE = 'expert', 'stage'  # Reserved: not in the mesh yet.
MESH_AXES = (DATA, FSDP, SEQUENCE, TENSOR)
BATCH_AXES = (DATA, FSDP)  # A global batch is split over these, data-major.
DCN_AXES = (DATA, FSDP)  # Axes that may span slices (config.mesh.dcn_<axis>).

_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'On a CPU-only host, split the CPU into this many JAX devices (e.g. one '
    'per core) so that the mesh can shard over them; 0 keeps JAX\'s default of one device.')
MESH_FLAG = flags.DEFINE_string(
    'mesh', '', 'Mesh sizes for research.sample and research.plan, e.g. fsdp=-1, fsdp=4,tensor=2 '
    'or data=16,fsdp=16 (axes left out are 1); research.train reads config.mesh instead.')


class MeshError(ValueError):
  """The mesh does not fit the devices or the processes; one sentence says what to change."""


def configure_cpu_devices():
  """Applies --cpu_devices; call after flag parsing and before the first use of a device."""
  if _CPU_DEVICES.value < 0:
    raise MeshError(f'--cpu_devices={_CPU_DEVICES.value} must not be negative (0 keeps one CPU '
                    'device).')
  if _CPU_DEVICES.value > 0:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)


# What each launcher sets, and how the process learns its place in the job.
CLUSTERS = ('local', 'slurm', 'openmpi', 'tpu_pod')


def detect_cluster(env):
  """The kind of multi-process launch `env` describes (one of CLUSTERS), or None for one process.

  RESEARCH_CLUSTER (set by the launch/ scripts) names it outright; otherwise the scheduler's own
  variables are read: RESEARCH_COORDINATOR (launch/local_multiprocess.py), SLURM with more than
  one task, Open MPI with more than one rank, a TPU VM slice with more than one worker (GKE sets
  TPU_WORKER_HOSTNAMES; multislice sets MEGASCALE_COORDINATOR_ADDRESS).
  """
  named = env.get('RESEARCH_CLUSTER', '')
  if named:
    if named == 'none':
      return None
    if named not in CLUSTERS:
      raise MeshError(f'RESEARCH_CLUSTER={named!r} is not one of {list(CLUSTERS) + ["none"]}.')
    return named
  if env.get('RESEARCH_COORDINATOR'):
    return 'local'
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'openmpi'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu_pod'
  return None


def initialize_distributed(heartbeat_timeout_s=100, env=None):
  """Joins the multi-process job the environment describes (see detect_cluster); returns its
  kind, or None when this is a single-process run.

  A peer that stops answering for `heartbeat_timeout_s` makes the runtime end every other process
  with an error naming it ("Task N heartbeat timeout"), so a lost host never hangs the job.
  """
  env = os.environ if env is None else env
  cluster = detect_cluster(env)
  if cluster is None:
    return None
  options = dict(heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  if cluster == 'local':
    try:
      coordinator = env['RESEARCH_COORDINATOR']
      count, index = int(env['RESEARCH_NUM_PROCESSES']), int(env['RESEARCH_PROCESS_ID'])
    except (KeyError, ValueError):
      raise MeshError('A local multi-process launch needs RESEARCH_COORDINATOR, '
                      'RESEARCH_NUM_PROCESSES and RESEARCH_PROCESS_ID; start it with '
                      'launch/local_multiprocess.py.') from None
    jax.distributed.initialize(coordinator, count, index, **options)
  else:  # SLURM, Open MPI and TPU VMs are read by JAX's own cluster detection.
    jax.distributed.initialize(**options)
  return cluster


def resolve_shape(sizes, dcn_sizes, num_devices, num_granules):
  """Checks {axis: size} (one may be -1) and {axis: slices} against the devices; returns the
  resolved sizes. `num_granules`: slices on TPU, processes elsewhere."""
  sizes = dict(sizes)
  auto = [name for name, size in sizes.items() if size == -1]
  if len(auto) > 1:
    raise MeshError(f'Only one mesh axis may be -1, got {auto}; set the others to explicit sizes.')
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise MeshError(f'Mesh axis sizes must be positive or -1, got {sizes}.')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if auto:
    if num_devices % fixed:
      raise MeshError(f'The mesh axes {sizes} leave no whole size for {auto[0]!r} on '
                      f'{num_devices} devices; make the fixed axes multiply to a divisor of '
                      f'{num_devices}.')
    sizes[auto[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f'The mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} '
                    f'are available; make {"*".join(MESH_AXES)} equal {num_devices} or set one '
                    'axis to -1.')
  for axis, slices in dcn_sizes.items():
    if slices < 1 or sizes[axis] % slices:
      raise MeshError(f'mesh.dcn_{axis}={slices} must be a positive divisor of mesh.{axis}='
                      f'{sizes[axis]}.')
  slices = math.prod(dcn_sizes.values())
  if slices > 1 and slices != num_granules:
    raise MeshError(f'The mesh spans {slices} slices (dcn_* sizes {dcn_sizes}) but the job has '
                    f'{num_granules}; make the dcn_* sizes multiply to {num_granules}.')
  return sizes


def make_mesh(shape, devices=None, dcn_shape=None):
  """A Mesh over MESH_AXES from the resolved sizes (see config.validate; an axis left out has
  size 1).

  `dcn_shape` ({axis: slices}, product > 1) lays the mesh over several slices: those axes are
  split between slices (data-centre network) and the rest stays inside one (ICI). Slices are TPU
  slices where the devices span several, processes elsewhere (GPU hosts, CPU rehearsals).
  """
  devices = jax.devices() if devices is None else devices
  dims = tuple(shape.get(axis, 1) for axis in MESH_AXES)
  dcn = tuple((dcn_shape or {}).get(axis, 1) for axis in MESH_AXES)
  if math.prod(dcn) > 1:
    ici = tuple(size // slices for size, slices in zip(dims, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=len(_slices(devices)) <= 1,
        allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(dims)  # Topology-unaware fallback (e.g. CPU subsets).
  return Mesh(grid, MESH_AXES)


def parse_sizes(text):
  """'data=16,fsdp=16' -> {'data': 16, 'fsdp': 16, 'sequence': 1, 'tensor': 1} (one size may be
  -1: whatever the devices leave); a bad entry is one MeshError sentence."""
  sizes, given = dict.fromkeys(MESH_AXES, 1), set()
  for item in filter(None, text.replace(' ', '').split(',')):
    axis, _, size = item.partition('=')
    if axis not in MESH_AXES or not size.lstrip('-').isdigit():
      raise MeshError(f'--mesh entry {item!r} is not AXIS=SIZE with AXIS one of '
                      f'{list(MESH_AXES)} (e.g. --mesh=data=2,fsdp=4).')
    if axis in given:  # Which size was meant is the user's to say: neither one wins.
      raise MeshError(f'--mesh {text} sizes the axis {axis!r} twice; give each axis once '
                      '(e.g. --mesh=data=2,fsdp=4).')
    given.add(axis)
    sizes[axis] = int(size)
  return sizes


def _slices(devices):
  return {getattr(d, 'slice_index', 0) for d in devices}


def num_granules(devices=None):
  """Slices on multi-slice TPU, processes elsewhere (where every device reports slice 0): what
  the dcn_* sizes must multiply to."""
  devices = jax.devices() if devices is None else devices
  slices = _slices(devices)
  return len(slices) if len(slices) > 1 else len({d.process_index for d in devices})
