"""Whether a run fits its devices' memory: the state is checked before it is allocated, the
compiled train step before it first runs, and a step that runs out of memory anyway is named in
one sentence.

The checks come first because XLA:CPU does not report every shortage: when the outputs of a
program (the initialised parameters and optimizer state) cannot be allocated, reading them waits
forever instead of raising (jax 0.10), and memory the kernel grants beyond what is there ends the
process at its first touch. A step whose temporaries cannot be allocated at all raises
RESOURCE_EXHAUSTED, on every backend; `out_of_memory` turns that into a sentence.
"""

import math

import jax
import numpy as np

from research import host_memory

_PLAN = 'python -m research.plan with the same flags shows what each device holds'
_STEP_ADVICE = ('lower train.batch_size (optim.grad_accum_steps keeps the batch a step learns '
                f'from), set model.remat=full or shard over more devices; {_PLAN}')


class MemoryShortage(ValueError):
  """The run's state or step cannot fit the memory of the devices that would hold it."""


def _cpu_bytes_available():
  """Host memory this process may still take: the kernel's MemAvailable, lowered to what the
  process's control group leaves (containers, SLURM); None where neither can be read."""
  limits = []
  try:
    with open('/proc/meminfo') as meminfo:
      for line in meminfo:
        if line.startswith('MemAvailable:'):
          limits.append(int(line.split()[1]) * 1024)
  except (OSError, ValueError, IndexError):
    pass
  try:
    with open('/sys/fs/cgroup/memory.max') as maximum, \
        open('/sys/fs/cgroup/memory.current') as current:
      cap = maximum.read().strip()
      if cap != 'max':
        limits.append(int(cap) - int(current.read().strip()))
  except (OSError, ValueError):
    pass
  return min(limits) if limits else None


def capacity(devices):
  """(bytes the local `devices` can hold together, what that is) where it is known; None where
  not. Accelerators report each device's limit; CPU devices share the host's memory."""
  if devices[0].platform == 'cpu':
    available = _cpu_bytes_available()
    return None if available is None else (available, 'host memory available')
  stats = devices[0].memory_stats() or {}
  if 'bytes_limit' not in stats:
    return None
  return stats['bytes_limit'] * len(devices), f'{devices[0].device_kind} memory'


def bytes_on(devices, abstract_tree):
  """Bytes the local `devices` hold together of a tree of ShapeDtypeStructs with shardings."""
  local = set(devices)
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    held = sum(1 for device in leaf.sharding.device_set if device in local)
    total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize * held
  return total


def _first_short(needed, known):
  """(process, bytes needed, bytes there, what that is) of the first process whose devices
  cannot take `needed` bytes, `known` being this process's (bytes there, what), or None where
  they all can (or none knows). Agreed by every process of a job: one that stopped alone would
  leave the others waiting at their first collective."""
  there, kind = known or (math.inf, '')
  if jax.process_count() == 1:
    return (0, needed, there, kind) if needed > there else None
  from jax.experimental import multihost_utils
  mine = np.array([needed, there if known else -1.0], np.float32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), 2)
  for process, (wanted, held) in enumerate(every):
    if held >= 0 and wanted > held:
      return process, float(wanted), float(held), kind or 'the memory there'
  return None


def _where(process, devices):
  host = 'this host' if jax.process_count() == 1 else f'process {process}'
  return f"{host}'s {len(devices)} {devices[0].platform} device(s)"


def check_state(abstract_state, what='The parameters and optimizer state'):
  """One sentence, before anything is allocated, where `abstract_state` (ShapeDtypeStructs with
  shardings) is larger than the memory of the devices that would hold it."""
  devices = jax.local_devices()
  short = _first_short(bytes_on(devices, abstract_state), capacity(devices))
  if short:
    process, needed, limit, kind = short
    raise MemoryShortage(
        f'{what} need {human_bytes(needed)} on {_where(process, devices)}, more than the '
        f'{human_bytes(limit)} of {kind}; shrink the model, shard it over more devices (mesh '
        f'fsdp) or keep the first moment in bfloat16 (optim.mu_dtype); {_PLAN}.')


def _left(devices):
  """(bytes the local `devices` can still take together, what that is), or None where unknown:
  on CPU the host's available memory and the free part of this process's heap (which
  research/host_memory.py keeps for reuse); on accelerators each device's limit less its use."""
  if devices[0].platform == 'cpu':
    available = _cpu_bytes_available()
    if available is None:
      return None
    return available + host_memory.heap_free_bytes(), 'host memory left'
  stats = [device.memory_stats() or {} for device in devices]
  if not all('bytes_limit' in s and 'bytes_in_use' in s for s in stats):
    return None
  return (sum(s['bytes_limit'] - s['bytes_in_use'] for s in stats),
          f'{devices[0].device_kind} memory left')


def check_step(compiled, what='A train step'):
  """One sentence, before the first step, where what the `compiled` step allocates as it runs
  (its temporaries, and outputs that do not overwrite donated arguments) is more than the
  devices have left beside what they already hold. On CPU the alternative is no error at all:
  the kernel grants the memory and its out-of-memory killer (or a container's) ends the process
  when the step touches it."""
  memory = compiled.memory_analysis()
  if memory is None:
    return
  devices = jax.local_devices()
  per_device = (memory.temp_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes)
  short = _first_short(per_device * len(devices), _left(devices))
  if short:
    process, needed, left, kind = short
    raise MemoryShortage(
        f'{what} needs {human_bytes(needed)} beyond the state on {_where(process, devices)}, '
        f'more than the {human_bytes(left)} of {kind}; {_STEP_ADVICE}.')


def out_of_memory(error):
  """The sentence for a jax runtime error that is an out-of-memory one; None for any other."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  detail = text.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0].rstrip('.')
  return (f'A compiled step ran out of {jax.devices()[0].platform} memory ({detail}); '
          f'{_STEP_ADVICE}. Checkpoints saved before it are kept.')


def human_bytes(count):
  """A byte count as a person reads it: 31.88 GiB, 119.1 MiB."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if count < 1024 or unit == 'TiB':
      return f'{count:.4g} {unit}'
    count /= 1024
