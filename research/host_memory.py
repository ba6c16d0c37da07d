"""Host memory for steps computed on the CPU: freed blocks are kept for reuse, not unmapped.

XLA:CPU allocates a step's temporaries as one block (127 MB for bert_tiny) and frees it when
the step ends. glibc serves a block that large with a fresh mmap in the allocating thread's
arena (a thread's arena cannot hold more than 64 MB) and unmaps it on free, so every step faults
the whole block in again, page by page: about 30,000 page faults, a fifth of bert_tiny's step on
a 2-core machine. With one arena, no mmap and trimming only past 2 GiB, the freed block stays in the heap and
the next step reuses it. The cost is that the process keeps its peak heap for its lifetime, which
a training process reaches in its first step anyway.

The arena limit only applies to threads that have not allocated yet, so `reuse_freed_memory()`
must run before the first use of a device (XLA starts its threads then); the entry points call
it right after parsing their flags. Accelerator hosts are left alone: there the steps' memory is
the device's, and many host threads (compilation, transfers) would contend for one arena.
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
