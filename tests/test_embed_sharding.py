"""The embedding look-up under (data, fsdp, tensor) sharding: no involuntary full
rematerialization when XLA partitions it, and the same numbers as on one device.

XLA prints the warning to stderr while compiling, so each check compiles in a subprocess (with the
persistent compilation cache off: a cached program is not partitioned again, and would not warn).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = 'Involuntary full rematerialization'
MARK = '@@ '  # Starts the child's lines on stderr that separate its compilations.

_EMBED_CHILD = '''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec
from research import mesh as mesh_lib, partitioning
from research.models import layers

def value_and_grads(mesh, constrained):
  sharding = partitioning.ActivationSharding(mesh)
  embed = layers.Embed(64, 32, sharding=sharding if constrained else None)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)), jnp.int32)
  boxed = embed.init(jax.random.key(0), ids)['params']
  params = jax.device_put(nn.meta.unbox(boxed), partitioning.tree_shardings(boxed, mesh))
  ids = jax.device_put(ids, NamedSharding(mesh, PartitionSpec(mesh_lib.BATCH_AXES)))
  weights = jnp.linspace(-1.0, 1.0, 32)

  def loss(p):
    x = partitioning.constrain(embed.apply({'params': p}, ids), sharding,
                               ('batch', 'length', 'act_embed'))
    return jnp.sum(jnp.tanh(x) * weights)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), np.asarray(grads['embedding']).tolist()

one = mesh_lib.make_mesh({a: 1 for a in mesh_lib.MESH_AXES}, jax.devices()[:1])
sharded = mesh_lib.make_mesh(dict({a: 1 for a in mesh_lib.MESH_AXES}, data=2, fsdp=2, tensor=2))
results = {}
for name, mesh, constrained in [('one', one, True), ('unconstrained', sharded, False),
                                ('sharded', sharded, True)]:
  sys.stderr.write('@@ ' + name + chr(10))
  sys.stderr.flush()
  results[name] = value_and_grads(mesh, constrained)
sys.stderr.write('@@ end' + chr(10))
print(json.dumps(results))
'''

_FAMILIES_CHILD = '''
import sys
import jax
from research import config as config_lib, plan

VARIANTS = {'decoder': 'tiny', 'encoder': 'bert_tiny', 'encoder_decoder': 't5_tiny'}
for family, variant in VARIANTS.items():
  config = config_lib.load_config_file(f'configs/{family}.py:{variant}')
  m, t = config.model, config.train
  m.num_layers, m.num_heads, m.emb_dim, m.mlp_dim = 1, 8, 64, 128
  if m.get('num_kv_heads'):
    m.num_kv_heads = 4
  t.batch_size, t.seq_len = 8, 16
  if 'max_predictions' in config.objective:
    config.objective.max_predictions = 4
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  sys.stderr.write('@@ ' + family + chr(10))
  sys.stderr.flush()
  plan.plan(config, jax.devices())
sys.stderr.write('@@ end' + chr(10))
'''


def _run_child(program):
  """(stdout, {section: its stderr}) of `program` on 8 CPU devices, compiling afresh."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run([sys.executable, '-c', program], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  sections, name = {}, None
  for line in result.stderr.splitlines():
    if line.startswith(MARK):
      name = line[len(MARK):]
      sections[name] = ''
    elif name is not None:
      sections[name] += line + '\n'
  assert 'end' in sections, result.stderr[-3000:]
  return result.stdout, sections


def test_the_sharded_look_up_compiles_without_rematerialization_and_matches_one_device():
  stdout, stderr = _run_child(_EMBED_CHILD)
  results = json.loads(stdout.strip().splitlines()[-1])
  # The check can see the problem: the table left sharded over `embed` makes XLA replicate.
  assert WARNING in stderr['unconstrained']
  assert WARNING not in stderr['sharded'], stderr['sharded']
  (value, grads), (want_value, want_grads) = results['sharded'], results['one']
  assert abs(value - want_value) <= 1e-5 * max(1.0, abs(want_value)), (value, want_value)
  worst = max(abs(a - b) for row, want_row in zip(grads, want_grads)
              for a, b in zip(row, want_row))
  assert worst <= 1e-6, worst
  assert results['unconstrained'][0] == pytest.approx(want_value, rel=1e-5)


@pytest.mark.slow
def test_the_train_steps_of_every_family_compile_without_rematerialization():
  _, stderr = _run_child(_FAMILIES_CHILD)
  for family in ('decoder', 'encoder', 'encoder_decoder'):
    assert WARNING not in stderr[family], (family, stderr[family][-2000:])
