"""Whether a run fits its devices' memory: the state is checked before it is allocated, the
compiled train step before it first runs, and a step that runs out of memory anyway is named in
one sentence.

The checks come first because XLA:CPU does not report every shortage: when the outputs of a
program (the initialised parameters and optimizer state) cannot be allocated, reading them waits
forever instead of raising (jax 0.10), and memory the kernel grants beyond what is there ends the
process at its first touch. A step whose temporaries cannot be allocated at all raises
RESOURCE_EXHAUSTED, on every backend; `out_of_memory` turns that into a sentence.

CPU devices share the host's memory, so their needs (those of every process on the machine)
add up against what the host has available (and what the process's control group leaves it);
an accelerator's need is its fullest device's against the room of the device with the least.
"""

import hashlib
import math
import os
import socket
import sys

import jax
import numpy as np

from research import host_memory

_PLAN = ('python -m research.plan with the same --config flags (without --workdir) shows what '
         'each device holds')


class MemoryShortage(ValueError):
  """The run's state or step cannot fit the memory of the devices that would hold it."""


def _read_number(path):
  with open(path) as f:
    text = f.read().strip()
  return None if text == 'max' else int(text)


def _inactive_cache(path, key):
  """Page cache a control group's memory.stat counts as inactive (reclaimable); 0 where it
  cannot be read, which only makes the room smaller."""
  try:
    with open(path) as f:
      return int(dict(line.split() for line in f if len(line.split()) == 2).get(key, 0))
  except (OSError, ValueError):
    return 0


def _cgroup_room(membership='/proc/self/cgroup', mount='/sys/fs/cgroup'):
  """Bytes the memory limits of this process's control groups (v1 or v2, its own and those
  above it) still leave it, counting reclaimable page cache as free; None where no limit is
  set or readable. Containers and SLURM jobs hold their limit there, not in /proc/meminfo."""
  rooms = []
  try:
    with open(membership) as f:
      lines = [line.strip().split(':', 2) for line in f if line.count(':') >= 2]
  except OSError:
    return None
  for _, controllers, path in lines:
    if controllers == '':  # v2: memory.max, memory.current, memory.stat's inactive_file.
      root, names = mount, ('memory.max', 'memory.current', 'inactive_file')
    elif 'memory' in controllers.split(','):  # v1.
      root = os.path.join(mount, 'memory')
      names = ('memory.limit_in_bytes', 'memory.usage_in_bytes', 'total_inactive_file')
    else:
      continue
    folder = os.path.normpath(os.path.join(root, path.lstrip('/')))
    if not os.path.isdir(folder):  # A namespaced group sees itself at the root.
      folder = root
    while folder.startswith(root):
      try:
        limit = _read_number(os.path.join(folder, names[0]))
        if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as about 2**63.
          rooms.append(limit - _read_number(os.path.join(folder, names[1]))
                       + _inactive_cache(os.path.join(folder, 'memory.stat'), names[2]))
      except (OSError, ValueError, TypeError):
        pass
      if folder == root:
        break
      folder = os.path.dirname(folder)
  return min(rooms) if rooms else None


def _cpu_bytes_available():
  """Host memory this process may still take: the kernel's MemAvailable, lowered to what the
  process's control groups leave; None where neither can be read."""
  limits = []
  try:
    with open('/proc/meminfo') as meminfo:
      for line in meminfo:
        if line.startswith('MemAvailable:'):
          limits.append(int(line.split()[1]) * 1024)
  except (OSError, ValueError, IndexError):
    pass
  room = _cgroup_room()
  if room is not None:
    limits.append(room)
  return min(limits) if limits else None


def _per_device(devices, abstract_tree):
  """{device: bytes it holds} of a tree of ShapeDtypeStructs with shardings, for the local
  `devices`."""
  held = {device: 0 for device in devices}
  for leaf in jax.tree.leaves(abstract_tree):
    size = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for device in leaf.sharding.device_set:
      if device in held:
        held[device] += size
  return held


def largest_share(devices, abstract_tree):
  """Bytes the fullest of `devices` holds of a tree of ShapeDtypeStructs with shardings."""
  return max(_per_device(devices, abstract_tree).values())


def bytes_on(devices, abstract_tree):
  """Bytes the local `devices` hold together of a tree of ShapeDtypeStructs with shardings."""
  return sum(_per_device(devices, abstract_tree).values())


def _room(devices, in_use):
  """(bytes there, what that is) for needs compared as `_need` makes them, or None where
  unknown: on CPU the host's available memory (and, with `in_use`, the free part of this
  process's heap, which research/host_memory.py keeps for reuse); on accelerators the least room
  of any device: its limit (less its use, with `in_use`)."""
  if devices[0].platform == 'cpu':
    available = _cpu_bytes_available()
    if available is None:
      return None
    if in_use:
      return available + host_memory.heap_free_bytes(), 'host memory left'
    return available, 'host memory available'
  stats = [device.memory_stats() or {} for device in devices]
  keys = ('bytes_limit', 'bytes_in_use') if in_use else ('bytes_limit',)
  if not all(key in s for s in stats for key in keys):
    return None
  room = min(s['bytes_limit'] - (s['bytes_in_use'] if in_use else 0) for s in stats)
  return room, f'{devices[0].device_kind} memory{" left" if in_use else ""} on one device'


def _need(devices, per_device):
  """What `per_device` ({device: bytes}) asks of the memory `_room` measures."""
  if devices[0].platform == 'cpu':
    return sum(per_device.values())
  return max(per_device.values())


def _host_key():
  """Two numbers that processes on one machine share and others, almost surely, do not: from
  the hostname and the kernel's boot id, each below 2**24 so that a float32 carries it exactly
  (48 bits: a thousand hosts collide with odds of about 2e-9)."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
  except OSError:
    boot = ''
  digest = hashlib.sha256(f'{socket.gethostname()} {boot}'.encode()).digest()
  return int.from_bytes(digest[:3], 'little'), int.from_bytes(digest[3:6], 'little')


def _first_short(needed, known, shared_host):
  """(process, bytes needed, bytes there, what that is, processes) of the first process whose
  devices cannot take `needed` bytes, `known` being this process's (bytes there, what), or None
  where they all can (or none knows). With `shared_host` (CPU devices) the processes of one
  machine draw on the same memory, so their needs add up; `processes` counts those. Agreed by
  every process of a job: one that stopped alone would leave the others waiting at their first
  collective."""
  there, kind = known or (math.inf, '')
  if jax.process_count() == 1:
    return (0, needed, there, kind, 1) if needed > there else None
  from jax.experimental import multihost_utils
  mine = np.array([needed, there if known else -1.0, *_host_key()], np.float32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), 4)
  return _shortage(every, kind or 'the memory there', shared_host)


def _shortage(every, kind, shared_host):
  """_first_short's verdict from every process's (bytes needed, bytes there or -1 where
  unknown, host key's two halves)."""
  for process, (_, held, *host) in enumerate(every):
    same = np.all(every[:, 2:] == host, axis=1)
    together = every[same] if shared_host else every[process:process + 1]
    wanted = float(together[:, 0].sum())
    if held >= 0 and wanted > held:
      return process, wanted, float(held), kind, len(together)
  return None


def _where(process, devices, processes):
  host = 'this host' if jax.process_count() == 1 else f'process {process}'
  if devices[0].platform == 'cpu':  # Their needs add up.
    others = processes - 1
    beside = (f' and those of the {others} other process{"es" if others > 1 else ""} on its '
              'machine') if others else ''
    return f"{host}'s {len(devices)} cpu device(s){beside}"
  return f"the fullest of {host}'s {len(devices)} {devices[0].platform} devices"


def _sharding_advice(devices):
  """How sharding lowers what each device (on CPU: the host) holds."""
  if devices[0].platform == 'cpu':  # More CPU devices share the same memory.
    return ('hold fewer copies of it (config.mesh.fsdp rather than config.mesh.data, or fewer '
            '--cpu_devices)')
  return 'shard it over more devices (config.mesh.fsdp)'


def check_state(abstract_state, what='The parameters and optimizer state'):
  """One sentence, before anything is allocated, where `abstract_state` (ShapeDtypeStructs with
  shardings) is larger than the memory of the devices that would hold it."""
  devices = jax.local_devices()
  needed = _need(devices, _per_device(devices, abstract_state))
  short = _first_short(needed, _room(devices, in_use=False), devices[0].platform == 'cpu')
  if short:
    process, needed, limit, kind, processes = short
    raise MemoryShortage(
        f'{what} need {human_bytes(needed)} on {_where(process, devices, processes)}, more '
        f'than the {human_bytes(limit)} of {kind}; shrink the model, or '
        f'{_sharding_advice(devices)}; {_PLAN}.')


def _step_advice(model_config):
  """What lowers a step's memory: recomputation only where the family has it and it is not on."""
  ways = ['lower train.batch_size (optim.grad_accum_steps keeps the batch a step learns from)']
  if model_config is not None and model_config.get('remat') not in (None, 'full'):
    ways.append('set model.remat=full')
  if jax.devices()[0].platform != 'cpu':  # CPU devices share one memory.
    ways.append('shard over more devices')
  ways = f'{", ".join(ways[:-1])} or {ways[-1]}' if len(ways) > 1 else ways[0]
  return f'{ways}; {_PLAN}'



def check_step(compiled, model_config=None, what='A train step'):
  """One sentence, before the first step, where what the `compiled` step allocates as it runs
  (its temporaries, and outputs that do not overwrite donated arguments) is more than the
  devices have left beside what they already hold. On CPU the alternative is no error at all:
  the kernel grants the memory and its out-of-memory killer (or a container's) ends the process
  when the step touches it."""
  memory = compiled.memory_analysis()
  if memory is None:
    return
  devices = jax.local_devices()
  each = (memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes)
  short = _first_short(_need(devices, {device: each for device in devices}),
                       _room(devices, in_use=True), devices[0].platform == 'cpu')
  if short:
    process, needed, left, kind, processes = short
    raise MemoryShortage(
        f'{what} needs {human_bytes(needed)} beyond the state on '
        f'{_where(process, devices, processes)}, more than the {human_bytes(left)} of {kind}; '
        f'{_step_advice(model_config)}.')


def out_of_memory(error, model_config=None):
  """The sentence for a jax runtime error that is an out-of-memory one; None for any other
  (RESOURCE_EXHAUSTED also names other exhausted resources, e.g. a coordination message)."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text or 'memory' not in text.lower():
    return None
  detail = (text.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines() or [''])[0]
  detail = detail.rstrip('.') or 'out of memory'
  return (f'A compiled step ran out of {jax.devices()[0].platform} memory ({detail}); '
          f'{_step_advice(model_config)}. Checkpoints saved before it are kept.')


def exit_status(error, model_config=None):
  """For a command's handler: prints the sentence for an out-of-memory runtime error and returns
  the exit status 1; any other runtime error propagates unchanged."""
  sentence = out_of_memory(error, model_config)
  if sentence is None:
    raise error
  print(f'error: {sentence}', file=sys.stderr)
  return 1


def human_bytes(count):
  """A byte count as a person reads it: 31.88 GiB, 119.1 MiB."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if count < 1024 or unit == 'TiB':
      return f'{count:.4g} {unit}'
    count /= 1024
