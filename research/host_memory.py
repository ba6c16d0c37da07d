"""Host memory for steps computed on the CPU: freed blocks are kept for reuse, not unmapped.

XLA:CPU allocates a step's temporaries as one block (127 MB for bert_tiny) and frees it when
the step ends. glibc serves any block over its mmap threshold (at most 32 MB) with a fresh mmap
and unmaps it on free, so every step faults the whole block in again, page by page: about 30,000
page faults for bert_tiny, a tenth of its step on a 2-core machine. Turning mmap off is not
enough by itself: a block larger than a thread's own arena (64 MB) is mmapped anyway. So all
threads share the main arena, which grows by brk, mmap is off, and the heap is trimmed only past
2 GiB free: the next step finds the freed block in the heap.

The cost is memory: small allocations settle into freed blocks, so the heap grows to a few times
the largest block before it levels off (bert_tiny's peak resident memory goes from 0.77 to
0.98 GB over 150 steps). Threads that allocated before the call keep their own arenas and new
threads may still be handed those, so `reuse_freed_memory()` must run before the first use of a
device (XLA starts its threads then): research.train and research.bench (train, decode) call it
right after parsing their flags, when the process has one arena. Accelerator hosts are left
alone: there the steps' memory is the device's, and many host threads (compilation, transfers)
would contend for one arena.
"""

import ctypes
import importlib.metadata
import importlib.util
import platform

import jax

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_LARGEST = 2**31 - 1  # mallopt takes an int.


def computes_on_cpu():
  """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or no accelerator
  plugin (CUDA, ROCm: `jax_plugins` entry points) or libtpu is installed."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('jax_plugins') is None and importlib.util.find_spec(
      'libtpu') is None


def reuse_freed_memory():
  """Keeps freed host memory for reuse when computing on the CPU with glibc; returns whether the
  policy was applied. Call before the first use of a device."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc' or not computes_on_cpu():
    return False
  libc = ctypes.CDLL('libc.so.6')
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # mallopt returns 1 on success; a value it refuses leaves glibc's default in place.
  applied = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
             libc.mallopt(_M_TRIM_THRESHOLD, _LARGEST)]
  return all(applied)


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]


def heap_free_bytes():
  """Bytes glibc's heap holds free for this process's next allocations: the kernel counts them as
  taken, so they add to what it reports as available. 0 where that cannot be read (another C
  library, a glibc older than 2.33)."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return 0
  libc = ctypes.CDLL('libc.so.6')
  if not hasattr(libc, 'mallinfo2'):
    return 0
  libc.mallinfo2.restype = _MallInfo2
  return int(libc.mallinfo2().fordblks)
