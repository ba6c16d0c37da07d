"""Whether a run fits its devices' memory: the state is checked before it is allocated, and a
step that runs out of memory is named in one sentence.

The check comes first because XLA:CPU does not report every failed allocation: when the
outputs of a program (the initialised parameters and optimizer state) cannot be allocated, reading
them waits forever instead of raising (jax 0.10). A step whose temporaries do not fit raises
RESOURCE_EXHAUSTED, on every backend; `out_of_memory` turns that into a sentence.
"""

import math

import jax

_PLAN = 'python -m research.plan with the same flags shows what each device holds'


class MemoryShortage(ValueError):
  """The run's state cannot fit the memory of the devices that would hold it."""


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


def check_state(abstract_state, what='The parameters and optimizer state'):
  """One sentence, before anything is allocated, where `abstract_state` (ShapeDtypeStructs with
  shardings) is larger than the memory of this process's devices that would hold it."""
  devices = jax.local_devices()
  known = capacity(devices)
  if known is None:
    return
  limit, kind = known
  needed = bytes_on(devices, abstract_state)
  if needed > limit:
    raise MemoryShortage(
        f'{what} need {human_bytes(needed)} on this host\'s {len(devices)} {devices[0].platform} '
        f'device(s), more than the {human_bytes(limit)} of {kind}; shrink the model, shard it over more '
        f'devices (mesh fsdp) or keep the first moment in bfloat16 (optim.mu_dtype); {_PLAN}.')


def out_of_memory(error):
  """The sentence for a jax runtime error that is an out-of-memory one; None for any other."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  detail = text.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0].rstrip('.')
  return (f'A compiled step ran out of {jax.devices()[0].platform} memory ({detail}); lower '
          'train.batch_size (optim.grad_accum_steps keeps the batch a step learns from), set '
          f'model.remat=full or shard over more devices; {_PLAN}. Checkpoints saved before it '
          'are kept.')



def human_bytes(count):
  """A byte count as a person reads it: 31.88 GiB, 119.1 MiB."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if count < 1024 or unit == 'TiB':
      return f'{count:.4g} {unit}'
    count /= 1024
