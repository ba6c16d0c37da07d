"""A state larger than the devices' memory is refused before it is allocated, and a step that
runs out of memory is one sentence (research/device_memory.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import runs
from research import device_memory
from research import mesh as mesh_lib
from research import models
from research import optim
from research import partitioning
from research import train_state
from research.config import load_config_file

_HUGE_MLP = 4_000_000_000  # The tiny decoder's state is then some 8 TiB.


def test_bytes_on_counts_a_shard_on_every_device_that_holds_it():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ('data',))
  split = NamedSharding(mesh, PartitionSpec('data'))
  replicated = NamedSharding(mesh, PartitionSpec())
  tree = {'split': jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=split),
          'replicated': jax.ShapeDtypeStruct((8, 4), jnp.bfloat16, sharding=replicated)}
  assert device_memory.bytes_on(jax.devices(), tree) == 8 * 4 * 4 + 8 * (8 * 4 * 2)
  assert device_memory.bytes_on(jax.devices()[:2], tree) == 2 * 4 * 4 + 2 * (8 * 4 * 2)


def _tiny_state(mlp_dim=None):
  """(model, optimizer, mesh, init inputs) of the tiny decoder on all 8 devices."""
  config = load_config_file('configs/decoder.py:tiny')
  if mlp_dim:
    config.model.mlp_dim = mlp_dim
  mesh = mesh_lib.make_mesh({'data': 8, 'fsdp': 1, 'sequence': 1, 'tensor': 1})
  family = models.get(config.model.family)
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  return model, tx, mesh, family.init_inputs(config.train.seq_len)


def test_a_state_larger_than_the_host_memory_is_refused_before_it_is_allocated():
  # XLA:CPU would wait forever on the failed allocation of the initialised state.
  with pytest.raises(device_memory.MemoryShortage) as error:
    train_state.create(*_tiny_state(_HUGE_MLP), jax.random.key(0))
  message = str(error.value)
  assert message.startswith('The parameters and optimizer state need ')
  assert " TiB on this host's 8 cpu device(s), more than the " in message
  assert message.endswith('shows what each device holds.')


def test_the_limit_is_what_the_host_has_available(monkeypatch):
  model, tx, mesh, inputs = _tiny_state()
  abstract, _ = train_state.abstract(model, tx, mesh, inputs)
  needed = device_memory.bytes_on(jax.devices(), abstract)
  monkeypatch.setattr(device_memory, '_cpu_bytes_available', lambda: needed - 1)
  with pytest.raises(device_memory.MemoryShortage, match='of host memory available'):
    train_state.create(model, tx, mesh, inputs, jax.random.key(0))
  monkeypatch.setattr(device_memory, '_cpu_bytes_available', lambda: needed)
  state, _ = train_state.create(model, tx, mesh, inputs, jax.random.key(0))
  assert int(state.step) == 0
  monkeypatch.setattr(device_memory, '_cpu_bytes_available', lambda: None)  # Unknown: no check.
  train_state.create(model, tx, mesh, inputs, jax.random.key(0))


def test_an_out_of_memory_error_is_one_sentence_and_other_errors_are_not_taken_for_one():
  with pytest.raises(jax.errors.JaxRuntimeError) as error:
    jax.jit(lambda: jnp.ones((1 << 40,), jnp.float32))().block_until_ready()  # 4 TiB.
  sentence = device_memory.out_of_memory(error.value)
  assert sentence.startswith('A compiled step ran out of cpu memory (Out of memory allocating '
                             '4398046511104 bytes); lower train.batch_size')
  assert sentence.endswith('Checkpoints saved before it are kept.') and '\n' not in sentence
  assert device_memory.out_of_memory(jax.errors.JaxRuntimeError('INVALID_ARGUMENT: x')) is None


def test_a_command_exits_1_with_the_sentence_and_lets_other_runtime_errors_through(capsys):
  oom = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.')
  assert device_memory.exit_status(oom) == 1
  assert capsys.readouterr().err.startswith('error: A compiled step ran out of cpu memory (Out of '
                                            'memory allocating 8 bytes); ')
  other = jax.errors.JaxRuntimeError('INVALID_ARGUMENT: x')
  with pytest.raises(jax.errors.JaxRuntimeError) as raised:
    device_memory.exit_status(other)
  assert raised.value is other


def test_human_bytes():
  assert device_memory.human_bytes(512) == '512 B'
  assert device_memory.human_bytes(119.1 * 2**20) == '119.1 MiB'
  assert device_memory.human_bytes(8.5 * 2**40) == '8.5 TiB'


def test_training_a_state_that_cannot_fit_stops_with_one_sentence_and_makes_no_workdir(
    tmp_path):
  workdir = tmp_path / 'run'
  result = runs.in_process('research.train', '--config', 'configs/decoder.py:tiny', '--workdir',
                           str(workdir), f'--config.model.mlp_dim={_HUGE_MLP}')
  line = runs.error_line(result)
  assert line.startswith('error: The parameters and optimizer state need '), line
  assert not workdir.exists()


def test_a_step_that_cannot_fit_what_the_state_leaves_stops_before_the_workdir_is_written(
    tmp_path, monkeypatch):
  left = iter([1 << 40, 1 << 20])  # The state fits; then 1 MiB is left for the step.
  monkeypatch.setattr(device_memory, '_cpu_bytes_available', lambda: next(left))
  monkeypatch.setattr(device_memory.host_memory, 'heap_free_bytes', lambda: 0)
  workdir = tmp_path / 'run'
  result = runs.in_process('research.train', '--config', 'configs/decoder.py:tiny', '--workdir',
                           str(workdir))
  line = runs.error_line(result)
  assert line.startswith("error: A train step needs "), line
  assert " beyond the state on this host's 8 cpu device(s), more than the 1 MiB of host memory " \
      'left; lower train.batch_size' in line, line
  assert not (workdir / 'config.json').exists()


def _group(folder, files):
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text)


def test_a_control_groups_limit_counts_reclaimable_cache_as_free(tmp_path):
  membership = tmp_path / 'cgroup'
  # v2: the job's own group and the one above it, which sets the tighter limit.
  membership.write_text('0::/job/step\n')
  _group(tmp_path / 'fs' / 'job', {'memory.max': str(10 << 30), 'memory.current': str(9 << 30),
                                   'memory.stat': f'anon 1\ninactive_file {4 << 30}\n'})
  _group(tmp_path / 'fs' / 'job' / 'step', {'memory.max': 'max', 'memory.current': str(1 << 30),
                                            'memory.stat': 'inactive_file 0\n'})
  assert device_memory._cgroup_room(str(membership), str(tmp_path / 'fs')) == 5 << 30
  # v1, and its "no limit" (about 2**63) at the root.
  membership.write_text('4:memory:/docker/abc\n1:cpu:/\n')
  _group(tmp_path / 'fs' / 'memory', {'memory.limit_in_bytes': '9223372036854771712',
                                      'memory.usage_in_bytes': '1', 'memory.stat': ''})
  _group(tmp_path / 'fs' / 'memory' / 'docker' / 'abc', {
      'memory.limit_in_bytes': str(8 << 30), 'memory.usage_in_bytes': str(7 << 30),
      'memory.stat': f'total_inactive_file {2 << 30}\n'})
  assert device_memory._cgroup_room(str(membership), str(tmp_path / 'fs')) == 3 << 30
  (tmp_path / 'fs' / 'memory' / 'docker' / 'abc' / 'memory.stat').unlink()  # Cache unknown: 0.
  assert device_memory._cgroup_room(str(membership), str(tmp_path / 'fs')) == 1 << 30
  membership.write_text('4:memory:/elsewhere\n')  # A namespaced group: the root is its own.
  _group(tmp_path / 'fs' / 'memory', {'memory.limit_in_bytes': str(4 << 30),
                                      'memory.usage_in_bytes': str(1 << 30)})
  assert device_memory._cgroup_room(str(membership), str(tmp_path / 'fs')) == 3 << 30
  membership.write_text('1:cpu:/\n')  # No memory controller: no limit known.
  assert device_memory._cgroup_room(str(membership), str(tmp_path / 'fs')) is None


def test_processes_on_one_machine_add_their_needs_on_cpu_and_not_on_accelerators():
  # Rows: (bytes needed, bytes there or -1 where unknown, host key), one per process.
  two_on_one_host = np.array([[6., 10., 7., 1.], [6., 10., 7., 1.], [6., 10., 7., 2.]],
                             np.float32)  # The third differs in the key's second half.
  assert device_memory._shortage(two_on_one_host, 'host memory available', True) == (
      0, 12.0, 10.0, 'host memory available', 2)
  assert device_memory._shortage(two_on_one_host, 'memory', False) is None  # Own devices each.
  alone = np.array([[6., 10., 7., 1.], [6., 10., 8., 1.]], np.float32)
  assert device_memory._shortage(alone, 'host memory available', True) is None
  unknown_there = np.array([[6., -1., 7., 1.], [6., 10., 7., 1.]], np.float32)  # 1 knows.
  assert device_memory._shortage(unknown_there, 'x', True) == (1, 12.0, 10.0, 'x', 2)
  key = device_memory._host_key()
  assert key == device_memory._host_key() and all(0 <= half < 2**24 for half in key)
