"""Freed host memory is reused on CPU (research/host_memory.py): a step's large temporary no
longer faults its pages in again on every call.

The policy is process-wide and must be set before the first use of a device, so each check runs
in a process of its own."""

import os
import platform
import subprocess
import sys
import types

import pytest

from research import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults of each of 12 calls of a step with a 41 MB temporary (more than glibc ever
# serves from its heap by default), after 40 warm-up calls (small allocations settle into a freed
# block, so the reused heap grows for a while before it levels off); prints whether the policy
# applied, then the median.
_PROBE = """
import resource, statistics, sys
from research import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == 'reuse' else False
import jax, jax.numpy as jnp

@jax.jit
def step(x):  # The barrier keeps the [3200, 3200] temporary from fusing into the product.
  return jax.lax.optimization_barrier(jnp.sin(jnp.outer(x, x))) @ x

x = jnp.linspace(0.0, 1.0, 3200)
faults = []
for call in range(52):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  if call >= 40:
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults))
"""


def _median_faults(mode):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-c', _PROBE, mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  applied, faults = result.stdout.split()
  return applied == 'True', float(faults)


def test_step_temporaries_are_reused_instead_of_faulted_in_again():
  applied, reused = _median_faults('reuse')
  _, default = _median_faults('system')
  assert applied == (platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc')
  if applied:  # glibc's default maps the block afresh on each call; the policy reuses it.
    assert default > 0 and reused < default / 10, (reused, default)


@pytest.mark.parametrize('platforms, on_cpu', [('cpu', True), ('cuda,cpu', False), ('tpu', False)])
def test_only_cpu_computation_changes_the_policy(platforms, on_cpu):
  program = ('from research import host_memory; '
             'print(host_memory.computes_on_cpu(), host_memory.reuse_freed_memory())')
  env = dict(os.environ, JAX_PLATFORMS=platforms)
  result = subprocess.run([sys.executable, '-c', program], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.split() == [str(on_cpu), str(on_cpu)]


@pytest.mark.parametrize('entry_points, modules, on_cpu', [
    ([], [], True),  # Nothing but jaxlib: the CPU computes.
    (['cuda'], [], False),  # An accelerator plugin registered by entry point (jax-cuda12-plugin).
    ([], ['jax_plugins'], False),  # A plugin installed as a jax_plugins namespace package.
    ([], ['libtpu'], False),  # A TPU VM.
])
def test_without_jax_platforms_an_installed_accelerator_means_no_cpu_computation(
    monkeypatch, entry_points, modules, on_cpu):
  monkeypatch.setattr(host_memory, 'jax', types.SimpleNamespace(
      config=types.SimpleNamespace(jax_platforms='')))
  monkeypatch.setattr(host_memory.importlib.metadata, 'entry_points',
                      lambda group: entry_points if group == 'jax_plugins' else [])
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec',
                      lambda name: object() if name in modules else None)
  assert host_memory.computes_on_cpu() is on_cpu
