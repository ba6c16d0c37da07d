r"""Ahead-of-time planner: compiles the train step for a target mesh without running it, and says
what each device would hold.

  python -m research.plan --config configs/decoder.py:llama2_7b --mesh data=16,fsdp=16 \
      [--config.model.remat=full --config.train.batch_size=256 ...] [--plan_json PATH]
  python -m research.plan --config configs/bench.py:llama_1b_2048 --topology h100-80gb:1
  python -m research.plan --config configs/papers.py:llama_1b --topology v5p-16 \
      --config.data.tokenizer=bytes

--topology names an accelerator slice (its forms are under flags below): config.mesh is resolved
over its devices, and the plan says whether the state, activations and batch fit each device's
memory. A paper preset's tokenizer files are not in the repository: plan it with
--config.data.tokenizer=bytes, as above (the compiled program is the same).

Where this machine has fewer devices than the mesh (a laptop planning a TPU pod), the step
compiles for as many simulated CPU devices. Parameter and optimizer-state bytes per device are
then exact (they follow the shardings); activation (temporary) memory and the compiler's FLOPs are
XLA:CPU's estimate, which tracks but does not equal a TPU's or GPU's (and XLA counts the body of a
loop once, whatever its trip count, so compare the model FLOPs, 6N plus attention, where the step
loops: scanned layers, recurrent steps, micro-batches; the printed plan says so).
Every family and objective plans the same way: nothing here names one.
"""

import json
import math
import re
import sys
import time

import jax
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from research import cli
from research import config as config_lib
from research import device_memory
from research import mesh as mesh_lib
from research import models
from research import objectives
from research import optim
from research import partitioning
from research import train_state
from research import train_step as step_lib
from research.data import global_batch
from research.data import sources

_GIB = 1 << 30
# Accelerator slices: the pattern of a name, what its count is divided by to give JAX devices,
# and the memory of one device. A TPU v4 or v5p chip holds two TensorCores that JAX sees as one
# device (megacore), and those slice names count TensorCores (v5p-32 is 16 chips); v5e names count
# chips. Memory is the capacity vendors state per chip or GPU (v5p 95 GB, H200 141 GB) taken
# as GiB: an upper bound, since the runtime keeps a little of it for itself.
TOPOLOGIES = (
    (r'v4-(\d+)', 2, 32 * _GIB),
    (r'v5p-(\d+)', 2, 95 * _GIB),
    (r'v5(?:e|litepod)-(\d+)', 1, 16 * _GIB),
    (r'h100-80gb:(\d+)', 1, 80 * _GIB),
    (r'h200:(\d+)', 1, 141 * _GIB),
)
_FORMS = ('v4-N or v5p-N (N TensorCores, an even number: N/2 chips), v5e-N or v5litepod-N '
          '(N chips), h100-80gb:N or h200:N (N GPUs)')

_JSON = flags.DEFINE_string('plan_json', '', 'Also write the plan as JSON to this file.')
# The help lists the forms that topology() accepts, from the same text as its error.
_TOPOLOGY = flags.DEFINE_string('topology', '', f'An accelerator slice, one of {_FORMS}, whose '
                                'devices config.mesh is resolved over; the plan then says whether '
                                'each device\'s memory holds the step.')


def _compiler_flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def topology(name):
  """(devices, HBM bytes per device) of the accelerator slice `name`."""
  for pattern, per_device, hbm in TOPOLOGIES:
    match = re.fullmatch(pattern, name)
    count = int(match.group(1)) if match else 0
    if count and count % per_device == 0:
      return count // per_device, hbm
  raise mesh_lib.MeshError(f'--topology {name} is not a known accelerator slice; use {_FORMS}.')


def fit(report, hbm_bytes):
  """The report with each device's whole footprint (parameters, optimizer state, activations and
  batch) against `hbm_bytes`, the memory of one device."""
  total = sum(report[f'{key}_bytes_per_device']
              for key in ('params', 'optimizer', 'activations', 'batch'))
  return dict(report, hbm_bytes_per_device=hbm_bytes, total_bytes_per_device=total,
              fits=total <= hbm_bytes)


def plan(config, devices, hbm_bytes=0, for_accelerators=False):
  """Compiles config's train step on `devices` (a mesh of config.mesh's sizes); returns the
  per-device figures as a dict, with fit()'s when `hbm_bytes` (one device's memory) is given.
  `for_accelerators`: the run is for GPUs or TPUs, whatever `devices` are (model.remat=offload
  compiles on CPU devices too)."""
  mesh_shape = config_lib.validate(config, len(devices), for_accelerators)
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  t = config.train
  family = models.get(config.model.family)
  objective = objectives.build(config)
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, schedule = optim.make_optimizer(config.optim, t.num_steps)
  # An objective may add parameters of its own and read frozen arrays (research/train.py setup).
  state, state_shardings = train_state.abstract(objectives.init_model(objective, model), tx, mesh,
                                                family.init_inputs(t.seq_len))
  frozen, frozen_shardings = objectives.frozen(objective, mesh, abstract=True)
  frozen_args, frozen_in = ((), ()) if frozen is None else ((frozen,), (frozen_shardings,))
  fields = objective.fields(t.seq_len)
  shardings = global_batch.batch_shardings(fields, t.batch_size, mesh)
  batch = global_batch.abstract(fields, t.batch_size, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=replicated)
  step = jax.jit(
      step_lib.make_train_step(model, objective, tx, schedule, config.optim.grad_accum_steps,
                               dropout=config.model.dropout_rate > 0, mesh=mesh),
      in_shardings=(state_shardings, shardings, replicated) + frozen_in,
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  started = time.perf_counter()
  compiled = step.lower(state, batch, rng, *frozen_args).compile()
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  spec = family.spec_from_config(config.model)
  tokens = t.batch_size * t.seq_len
  report = dict(
      variant=config.variant, family=config.model.family, objective=config.objective.name,
      devices=len(devices), platform=devices[0].platform, mesh=mesh_shape,
      # Families without layer stacks (the recurrent ones) have neither setting.
      remat=config.model.get('remat'), scan_layers=config.model.get('scan_layers'),
      batch_size=t.batch_size, seq_len=t.seq_len,
      params=models.size(state.params),
      params_bytes_per_device=device_memory.largest_share(devices, state.params),
      optimizer_bytes_per_device=device_memory.largest_share(devices, state.opt_state),
      batch_bytes_per_device=device_memory.largest_share(devices, batch),
      activations_bytes_per_device=int(memory.temp_size_in_bytes),
      model_tflops_per_step_per_device=(objective.flops_per_token(family, spec) * tokens
                                        / len(devices) / 1e12),
      compiler_tflops_per_step_per_device=_compiler_flops(compiled) / 1e12,
      # XLA's cost analysis counts a loop's body once, whatever its trip count (scanned layers,
      # recurrent steps, micro-batches): the compiler's figure is then a fraction of the step's.
      compiler_counts_loops_once=' while(' in compiled.as_text(),
      compile_s=compile_s)
  return fit(report, hbm_bytes) if hbm_bytes else report


def _devices(count):
  """`count` devices of this machine's accelerators, or simulated CPU devices when it has fewer
  (jax_num_cpu_devices is set before the first use of a device, in main)."""
  accelerators = [d for d in jax.devices() if d.platform != 'cpu']
  if len(accelerators) >= count:
    return accelerators[:count]
  return jax.devices('cpu')[:count]


def _print(report):
  size = lambda key: device_memory.human_bytes(report[f'{key}_bytes_per_device'])
  layout = ''.join(f', {key}={report[key]}' for key in ('remat', 'scan_layers')
                   if report[key] is not None)
  rows = [
      ('model', f"{report['variant']} ({report['family']}, {report['params']:,} parameters), "
                f"objective {report['objective']}{layout}"),
      ('mesh', f"{report['mesh']} on {report['devices']} {report['platform']} device"
               + ('s' if report['devices'] != 1 else '')
               + (f" standing in for {report['topology']}" if report.get('topology') else '')),
      ('batch', f"{report['batch_size']} x {report['seq_len']} tokens per step"),
      ('parameters / device', size('params')),
      ('optimizer state / device', size('optimizer')),
      ('activations (temporary) / device', size('activations') + (
          " (as remat=dots: CPU devices hold 'offloaded' activations in the same memory, so "
          'this is an upper bound)' if report['remat'] == 'offload'
          and report['platform'] == 'cpu' else '')),
      ('batch / device', size('batch')),
      ('model TFLOPs / step / device', f"{report['model_tflops_per_step_per_device']:.4g}"),
      ('compiler TFLOPs / step / device', f"{report['compiler_tflops_per_step_per_device']:.4g}"
       + (' (loop bodies counted once)' if report['compiler_counts_loops_once'] else '')),
      ('compile time', f"{report['compile_s']:.1f} s"),
  ]
  if 'fits' in report:
    verdict = 'fits' if report['fits'] else 'does NOT fit'
    rows.append(('total / device', f"{size('total')} of {size('hbm')} HBM: {verdict}"))
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f'{name:<{width}}  {value}')


def main(argv):
  try:
    config = config_lib.parse_flags(argv, __doc__, ('mesh', 'topology', 'plan_json',
                                                    'cpu_devices'))
    target, hbm = mesh_lib.MESH_FLAG.value, 0
    if target and _TOPOLOGY.value:
      raise mesh_lib.MeshError('Pass --mesh or --topology, not both: a topology resolves '
                               'config.mesh over its own devices.')
    if (target or _TOPOLOGY.value) and flags.FLAGS['cpu_devices'].present:
      raise mesh_lib.MeshError('--cpu_devices does not apply with --mesh or --topology, which '
                               'set the device count; drop it.')
    config_lib.check_output('plan_json')
    if _TOPOLOGY.value:
      count, hbm = topology(_TOPOLOGY.value)
      jax.config.update('jax_num_cpu_devices', count)  # Before any device is touched.
      for axis in mesh_lib.DCN_AXES:
        config.mesh[f'dcn_{axis}'] = 1  # One slice: a plan compiles on one process.
    elif target:
      sizes = mesh_lib.parse_sizes(target)
      if any(size < 1 for size in sizes.values()):
        raise mesh_lib.MeshError(f'--mesh {target} needs explicit positive sizes: a plan is for '
                                 'a given topology.')
      count = math.prod(sizes.values())
      jax.config.update('jax_num_cpu_devices', count)  # Before any device is touched.
      for axis, size in sizes.items():
        config.mesh[axis] = size
      for axis in mesh_lib.DCN_AXES:
        config.mesh[f'dcn_{axis}'] = 1  # One slice: a plan compiles on one process.
    if target or _TOPOLOGY.value:
      # Checked before the devices exist: simulating many takes long, and a config that cannot
      # run on them would be refused only after it.
      config_lib.validate(config, count, for_accelerators=True)
      devices = _devices(count)
    else:
      mesh_lib.configure_cpu_devices()
      devices = jax.devices()
    report = plan(config, devices, hbm, for_accelerators=bool(target or _TOPOLOGY.value))
    if _TOPOLOGY.value and report['platform'] == 'cpu':  # Simulated devices, not the slice's.
      report['topology'] = _TOPOLOGY.value
    _print(report)
    if _JSON.value:
      config_lib.write_output('plan_json', json.dumps(report, indent=2))
  except (config_lib.ConfigError, mesh_lib.MeshError, sources.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  cli.exit_on_interrupt('Interrupted; nothing was written.')
  sys.exit(main(sys.argv))
