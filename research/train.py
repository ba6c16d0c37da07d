"""Pretraining entry point.

  python -m research.train --config configs/decoder.py:tiny --workdir /tmp/tiny \
      [--config.optim.lr=1e-3 ...]

Sections, in order: devices and mesh -> data -> model and sharded state -> compiled steps ->
loop (metrics, evaluation, profiling).
"""

import contextlib
import math
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import config as config_lib
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import optim
from research import partitioning
from research import train_state
from research import train_step as step_lib
from research.data import global_batch
from research.data import synthetic
from research.models import decoder

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the run record, metrics and logs.')


def _progress_bar(config, start, total):
  if not config.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, file=sys.stderr)


def _evaluate(eval_fn, params, source, config, shardings):
  totals = dict(loss=0.0, tokens=0.0, correct=0.0)
  for index in range(config.train.eval_batches):
    batch = source.batch(index, config.train.batch_size, config.train.seq_len, split='validation')
    sums = jax.device_get(eval_fn(params, global_batch.to_global(batch, shardings)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  loss = totals['loss'] / max(totals['tokens'], 1.0)
  return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50.0)),
              eval_accuracy=totals['correct'] / max(totals['tokens'], 1.0))


class Trainer(NamedTuple):
  mesh: Mesh
  source: synthetic.MarkovSource
  state: train_state.TrainState
  train_step: Callable  # (state, batch, rng) -> (state, metrics), jitted, state donated.
  eval_step: Callable  # (params, batch) -> loss sums, jitted.
  batch_shardings: dict
  dropout_rng: jax.Array


def setup(config, mesh):
  """Data source, model, sharded state and compiled steps for `config` on `mesh`."""
  replicated = NamedSharding(mesh, PartitionSpec())

  # Data.
  t = config.train
  source = synthetic.MarkovSource(config.model.vocab_size, config.data.markov_branching,
                                  config.seed, config.data.min_doc_len)
  batch_shardings = global_batch.batch_shardings(source.batch(0, t.batch_size, t.seq_len), mesh)

  # Model and sharded state.
  model = decoder.build(config.model, partitioning.ActivationSharding(mesh))
  tx, schedule = optim.make_optimizer(config.optim, t.num_steps)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  example = jnp.zeros((1, t.seq_len), jnp.int32)
  state, state_shardings = train_state.create(model, tx, mesh, example, init_rng)

  # Compiled steps: jitted once, explicit shardings, the state donated.
  train_step = jax.jit(
      step_lib.make_train_step(model, tx, schedule, config.optim.grad_accum_steps,
                               dropout=config.model.dropout_rate > 0, mesh=mesh),
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(model),
                      in_shardings=(state_shardings.params, batch_shardings),
                      out_shardings=replicated)
  return Trainer(mesh, source, state, train_step, eval_step, batch_shardings, dropout_rng)


def run(config, workdir):
  """Trains `config` and writes its record into `workdir`; returns the last logged metrics."""
  # Devices and mesh.
  mesh_shape = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(mesh_shape)
  config_lib.record_run(config, workdir)
  trainer = setup(config, mesh)
  state, source, batch_shardings = trainer.state, trainer.source, trainer.batch_shardings
  t = config.train

  # Loop.
  spec = decoder.DecoderSpec.from_config(config.model)
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  throughput = metrics_lib.Throughput(metrics_lib.train_flops_per_token(spec, t.seq_len),
                                      peak * jax.device_count() if peak else None)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard)
  start_step = int(state.step)
  bar = _progress_bar(config, start_step, t.num_steps)
  pending, last = [], {}
  profiling = False
  print(f'mesh {mesh_shape}, MFU relative to the {peak_label}', file=sys.stderr)
  for step in range(start_step, t.num_steps):
    if step == t.profile_start_step:
      jax.profiler.start_trace(f'{workdir}/profile', create_perfetto_trace=True)
      profiling = True
    host_batch = source.batch(step, t.batch_size, t.seq_len)
    with jax.profiler.StepTraceAnnotation('train', step_num=step) if profiling else contextlib.nullcontext():
      state, step_metrics = trainer.train_step(
          state, global_batch.to_global(host_batch, batch_shardings), trainer.dropout_rng)
    pending.append(step_metrics)
    throughput.add(float(np.sum(host_batch['weights'])))
    if profiling and step + 1 >= t.profile_start_step + t.profile_num_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      profiling = False

    done = step + 1
    if done % t.log_every == 0 or done == t.num_steps:
      fetched = jax.device_get(pending)
      pending = []
      last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      last['perplexity'] = math.exp(min(last['loss'], 50.0))
      last.update(throughput.report())
      if done % t.eval_every == 0 or done == t.num_steps:
        last.update(_evaluate(trainer.eval_step, state.params, source, config, batch_shardings))
        throughput.reset()  # Keep evaluation time out of the training throughput.
      writer.write(done, last)
      if bar is not None:
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
    if bar is not None:
      bar.update(1)
  if profiling:
    jax.profiler.stop_trace()
  if bar is not None:
    bar.close()
  writer.close()
  return last


def main(argv):
  try:
    config = config_lib.parse_flags(argv)
    if not _WORKDIR.value:
      raise config_lib.ConfigError('No workdir given; pass --workdir DIR.')
    mesh_lib.configure_cpu_devices()
    mesh_lib.maybe_initialize_distributed()
    final = run(config, _WORKDIR.value)
  except config_lib.ConfigError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print('final ' + ' '.join(f'{k}={v:.4g}' for k, v in final.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
