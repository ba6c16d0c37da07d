"""Which launch a process is part of, and the launcher's own inputs (no processes started)."""

import dataclasses

import numpy as np
import pytest

from launch import local_multiprocess
from research import mesh as mesh_lib


@pytest.mark.parametrize('env, cluster', [
    ({}, None),
    ({'RESEARCH_COORDINATOR': 'localhost:1234'}, 'local'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, None),  # One task: nothing to join.
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'openmpi'),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'}, 'tpu_pod'),
    ({'TPU_WORKER_HOSTNAMES': 'w-0'}, None),  # A single-host TPU VM.
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'w-0:8080'}, 'tpu_pod'),
    ({'RESEARCH_CLUSTER': 'tpu_pod'}, 'tpu_pod'),
    ({'RESEARCH_CLUSTER': 'none', 'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, None),
])
def test_the_launch_kind_is_read_from_the_environment(env, cluster):
  assert mesh_lib.detect_cluster(env) == cluster


def test_an_unknown_cluster_name_is_one_sentence():
  with pytest.raises(mesh_lib.MeshError, match=r"RESEARCH_CLUSTER='k8s' is not one of "):
    mesh_lib.detect_cluster({'RESEARCH_CLUSTER': 'k8s'})


def test_a_local_launch_without_its_place_in_the_job_is_one_sentence():
  with pytest.raises(mesh_lib.MeshError, match='start it with launch/local_multiprocess.py'):
    mesh_lib.initialize_distributed(env={'RESEARCH_CLUSTER': 'local'})


def test_single_process_runs_do_not_initialize_anything():
  assert mesh_lib.initialize_distributed(env={}) is None


def test_each_launched_process_gets_its_place_and_devices():
  env = local_multiprocess.process_env(
      {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x'}, index=1,
      processes=2, local_devices=4, port=4321)
  assert env['RESEARCH_COORDINATOR'] == 'localhost:4321'
  assert (env['RESEARCH_NUM_PROCESSES'], env['RESEARCH_PROCESS_ID']) == ('2', '1')
  assert env['XLA_FLAGS'] == '--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4'
  assert mesh_lib.detect_cluster(env) == 'local'
  command = local_multiprocess.train_command('python', 1, 'c.py:tiny', '/w', ['--config.seed=1'])
  assert '--config.train.progress_bar=False' in command and command[-1] == '--config.seed=1'
  assert '--config.train.progress_bar=False' not in local_multiprocess.train_command(
      'python', 0, 'c.py:tiny', '/w', [])


@pytest.mark.parametrize('arguments, sentence', [
    (['--proceses=3', 'configs/decoder.py:tiny', '/tmp/run'],
     'Unknown argument --proceses=3 (after the options, CONFIG, WORKDIR and --config.KEY=VALUE '
     'overrides only); see --help.'),
    (['--python=/no/python', 'configs/decoder.py:tiny', '/tmp/run'],
     '--python /no/python is not a Python to run; see --help.'),
    (['--processes=0', 'configs/decoder.py:tiny', '/tmp/run'],
     '--processes and --local_devices must be at least 1; see --help.'),
])
def test_the_launchers_bad_arguments_are_one_sentence(capsys, arguments, sentence):
  assert local_multiprocess.main(arguments) == 2
  assert capsys.readouterr().err == f'error: {sentence}\n'


def test_hybrid_meshes_put_each_process_on_its_own_slice_of_the_dcn_axis(monkeypatch):
  """On one process the granule check refuses two slices; over two processes each slice of the
  DCN axis holds one process's devices, whatever their order."""
  with pytest.raises(mesh_lib.MeshError, match='spans 2 slices'):
    mesh_lib.resolve_shape(dict(data=4, fsdp=2, sequence=1, tensor=1), dict(data=2, fsdp=1),
                           8, num_granules=1)
  sizes = mesh_lib.resolve_shape(dict(data=-1, fsdp=2, sequence=1, tensor=1),
                                 dict(data=2, fsdp=1), 8, num_granules=2)
  assert sizes == dict(data=4, fsdp=2, sequence=1, tensor=1)

  @dataclasses.dataclass(frozen=True)
  class Device:  # What the layout reads of a device.
    id: int
    process_index: int
    platform: str = 'cpu'
    device_kind: str = 'cpu'

  # Two processes whose devices come interleaved, as a plain reshape would leave them.
  devices = [Device(i, i % 2) for i in range(8)]
  monkeypatch.setattr(mesh_lib, 'Mesh', lambda grid, axes: grid)
  grid = mesh_lib.make_mesh(sizes, devices, dict(data=2, fsdp=1))
  processes = np.vectorize(lambda d: d.process_index)(grid).reshape(4, 2)
  # Each half of the data axis (a DCN slice) is one process's devices, fsdp inside it.
  assert processes.tolist() in ([[0, 0], [0, 0], [1, 1], [1, 1]],
                                [[1, 1], [1, 1], [0, 0], [0, 0]])
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_mesh_flags_name_axes_and_sizes():
  assert mesh_lib.parse_sizes('data=16, fsdp=-1') == dict(data=16, fsdp=-1, sequence=1, tensor=1)
  for bad in ('model=2', 'fsdp=two', 'fsdp'):
    with pytest.raises(mesh_lib.MeshError, match=f"--mesh entry '{bad}' is not AXIS=SIZE"):
      mesh_lib.parse_sizes(bad)
