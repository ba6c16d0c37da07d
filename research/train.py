"""Pretraining entry point.

  python -m research.train --config configs/decoder.py:tiny --workdir /tmp/tiny \
      [--config.optim.lr=1e-3 ...]

Sections, in order: devices and mesh -> data -> model and sharded state -> compiled steps ->
start-up (resume / warm start / fresh) -> loop (metrics, evaluation, checkpoints, profiling).

Start-up precedence: resume from the newest checkpoint in <workdir>/checkpoints; else, when
`checkpoint.init_from` names another run's workdir, take its parameters (warm start, fresh
optimizer, step 0); else initialise afresh.
"""

import contextlib
import functools
import math
import os
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import decode
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import optim
from research import partitioning
from research import train_state
from research import train_step as step_lib
from research.data import global_batch
from research.data import pipeline as pipeline_lib
from research.models import decoder



class Trainer(NamedTuple):
  mesh: Mesh
  pipeline: pipeline_lib.Pipeline
  model: decoder.Decoder
  state: train_state.TrainState
  state_shardings: train_state.TrainState
  train_step: Callable  # (state, batch, rng) -> (state, metrics), jitted, state donated.
  eval_step: Callable  # (params, batch) -> loss sums, jitted.
  batch_shardings: dict
  dropout_rng: jax.Array


def setup(config, mesh, pipeline=None):
  """Data pipeline, model, sharded state and compiled steps for `config` on `mesh`."""
  replicated = NamedSharding(mesh, PartitionSpec())
  t = config.train

  # Data.
  pipeline = pipeline or pipeline_lib.build(config)
  batch_shardings = global_batch.batch_shardings(t.batch_size, t.seq_len, mesh)

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
  return Trainer(mesh, pipeline, model, state, state_shardings, train_step, eval_step,
                 batch_shardings, dropout_rng)


def _progress_bar(config, start, total):
  if not config.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, file=sys.stderr)


def _evaluate(trainer, params, num_batches):
  totals = dict(loss=0.0, tokens=0.0, correct=0.0)
  data = trainer.pipeline
  for index in range(num_batches):
    batch = global_batch.assemble(functools.partial(data.eval_batch, index),
                                  (data.batch_size, data.seq_len), trainer.batch_shardings)
    sums = jax.device_get(trainer.eval_step(params, batch))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  loss = totals['loss'] / max(totals['tokens'], 1.0)
  return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 50.0)),
              eval_accuracy=totals['correct'] / max(totals['tokens'], 1.0))


def _start_up(config, trainer, checkpointer):
  """Applies the start-up precedence; returns (state, dropout_rng, description)."""
  if checkpointer.latest_step() is not None:
    state, record = checkpointer.restore(trainer.state, trainer.state_shardings)
    rng = checkpoint_lib.rng_from_record(record['dropout_rng'])
    return state, rng, f'resumed from step {int(state.step)} in {checkpointer.directory}'
  if config.checkpoint.init_from:
    state, step = checkpoint_lib.restore_params(config.checkpoint.init_from, trainer.state,
                                                trainer.state_shardings)
    return state, trainer.dropout_rng, (f'warm start from the parameters of step {step} of '
                                        f'{config.checkpoint.init_from}')
  return trainer.state, trainer.dropout_rng, 'fresh initialisation'


def _checkpoint_record(state, rng, batch_size):
  step = int(state.step)
  return dict(step=step, dropout_rng=checkpoint_lib.rng_to_record(rng),
              data=dict(next_step=step, rows_consumed=step * batch_size),
              param_shapes=checkpoint_lib.param_shapes(state.params))


def _sample(trainer, params, config):
  tokenizer = trainer.pipeline.tokenizer
  if config.train.sample_tokens <= 0 or not hasattr(tokenizer, 'decode'):
    return None
  prompt = tokenizer.encode(config.train.sample_prompt)
  sampling = decode.SamplingConfig(max_new_tokens=config.train.sample_tokens,
                                   stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  model = decoder.build(config.model)  # Without the training mesh's activation constraints.
  ids = decode.generate(model, params, [prompt.tolist()], sampling)[0]
  return config.train.sample_prompt + tokenizer.decode(ids)


def run(config, workdir):
  """Trains `config` in `workdir` (resuming what is there); returns the last logged metrics."""
  # Devices and mesh.
  mesh_shape = config_lib.validate(config, jax.device_count())
  mesh = mesh_lib.make_mesh(mesh_shape)
  t = config.train

  # Data, model, state, steps.
  pipeline = pipeline_lib.build(config)
  config_lib.record_run(config, workdir, data=pipeline.record)
  trainer = setup(config, mesh, pipeline)

  # Start-up: resume, warm start or fresh.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             config.checkpoint.every_steps, config.checkpoint.keep)
  state, dropout_rng, origin = _start_up(config, trainer, checkpointer)
  start_step = int(state.step)
  stop_step = t.num_steps if t.stop_at_step < 0 else min(t.stop_at_step, t.num_steps)
  print(f'{origin}; mesh {mesh_shape}', file=sys.stderr)
  if start_step >= stop_step:
    print(f'The run in {workdir} is already at step {start_step}; raise --config.train.num_steps '
          'to continue it, or pass a new --workdir to start afresh.', file=sys.stderr)
    checkpointer.close()
    return {}

  # Loop.
  spec = decoder.DecoderSpec.from_config(config.model)
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  throughput = metrics_lib.Throughput(metrics_lib.train_flops_per_token(spec, t.seq_len),
                                      peak * jax.device_count() if peak else None)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard)
  bar = _progress_bar(config, start_step, stop_step)
  pending, last = [], {}
  profiling = False
  print(f'MFU is relative to the {peak_label}', file=sys.stderr)
  for step in range(start_step, stop_step):
    if step == t.profile_start_step:
      jax.profiler.start_trace(f'{workdir}/profile', create_perfetto_trace=True)
      profiling = True
    batch = global_batch.assemble(functools.partial(pipeline.train_batch, step),
                                  (t.batch_size, t.seq_len), trainer.batch_shardings)
    with jax.profiler.StepTraceAnnotation('train', step_num=step) if profiling else contextlib.nullcontext():
      state, step_metrics = trainer.train_step(state, batch, dropout_rng)
    pending.append(step_metrics)
    if profiling and step + 1 >= t.profile_start_step + t.profile_num_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      profiling = False

    done = step + 1
    if done % t.log_every == 0 or done == stop_step:
      fetched = jax.device_get(pending)
      pending = []
      last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
      last['perplexity'] = math.exp(min(last['loss'], 50.0))
      last.update(throughput.report(steps=len(fetched), tokens=sum(m['tokens'] for m in fetched)))
      if done % t.eval_every == 0 or done == stop_step:
        last.update(_evaluate(trainer, state.params, t.eval_batches))
        throughput.reset()  # Keep evaluation time out of the training throughput.
      writer.write(done, last)
      if bar is not None:
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
    checkpointer.maybe_save(done, state, lambda: _checkpoint_record(state, dropout_rng, t.batch_size),
                            final=done == stop_step)
    if bar is not None:
      bar.update(1)
  if profiling:
    jax.profiler.stop_trace()
  if bar is not None:
    bar.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  sample = _sample(trainer, state.params, config)
  if sample is not None and jax.process_index() == 0:
    print(f'--- sample (greedy) ---\n{sample}\n---', file=sys.stderr)
  return last


def main(argv):
  try:
    config = config_lib.parse_flags(argv)
    if not config_lib.WORKDIR.value:
      raise config_lib.ConfigError('No workdir given; pass --workdir DIR.')
    mesh_lib.configure_cpu_devices()
    mesh_lib.maybe_initialize_distributed()
    final = run(config, config_lib.WORKDIR.value)
  except (config_lib.ConfigError, pipeline_lib.DataError, checkpoint_lib.CheckpointError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if jax.process_index() == 0 and final:
    print('final ' + ' '.join(f'{k}={v:.4g}' for k, v in final.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
