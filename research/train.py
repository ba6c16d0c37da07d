"""Training entry point: pretraining and fine-tuning, for every family and objective.

  python -m research.train --config configs/decoder.py:tiny --workdir /tmp/tiny \
      [--config.optim.lr=1e-3 ...]

Sections, in order: devices and mesh -> data -> model and sharded state -> compiled steps ->
start-up (resume / warm start / fresh) -> loop (metrics, evaluation, checkpoints, profiling).

Start-up precedence: resume from the newest readable checkpoint in <workdir>/checkpoints; else,
when `checkpoint.init_from` names another run's workdir, take its parameters (warm start, fresh
optimizer, step 0); else initialise afresh.
"""

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import checkpoint as checkpoint_lib
from research import cli
from research import config as config_lib
from research import counting
from research import decode
from research import device_memory
from research import host_memory
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import models
from research import objectives
from research import optim
from research import partitioning
from research import preemption
from research import profiling
from research import train_state
from research import train_step as step_lib
from research import watchdog as watchdog_lib
from research import workdir as workdir_lib
from research.data import global_batch
from research.data import prefetch
from research.data import pipeline as pipeline_lib
from research.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  mesh: Mesh
  pipeline: pipeline_lib.Pipeline
  family: object  # The model family's module (research/models).
  objective: object  # The configured objective (research/objectives).
  model: object  # The family's linen module.
  abstract_state: train_state.TrainState  # ShapeDtypeStructs with their shardings.
  state_shardings: train_state.TrainState
  initialise: Callable  # rng -> the fresh state (see `state`).
  init_rng: jax.Array
  train_step: Callable  # (state, batch, rng) -> (state, metrics), jitted, state donated.
  eval_step: Callable  # (params, batch) -> the objective's totals, jitted.
  batch_shapes: dict
  batch_shardings: dict
  dropout_rng: jax.Array
  frozen: object = None  # Arrays the objective reads but never trains (bound into the steps).

  @functools.cached_property
  def state(self):
    """The freshly initialised state, made on first use: a resumed run restores into
    `abstract_state` instead, and never compiles or runs the initialisation."""
    return self.initialise(self.init_rng)


def setup(config, mesh, pipeline=None):
  """Data pipeline, model, sharded state and compiled steps for `config` on `mesh`."""
  replicated = NamedSharding(mesh, PartitionSpec())
  t = config.train
  family = models.get(config.model.family)
  objective = objectives.build(config)

  # Data: the objective's batch spec gives every field's shape and sharding.
  pipeline = pipeline or pipeline_lib.build(config)
  fields = objective.fields(t.seq_len)
  batch_shapes = global_batch.batch_shapes(fields, t.batch_size)
  batch_shardings = global_batch.batch_shardings(fields, t.batch_size, mesh)

  # Model and sharded state.
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, schedule = optim.make_optimizer(config.optim, t.num_steps)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  initialise, abstract_state, state_shardings = train_state.initializer(
      objectives.init_model(objective, model), tx, mesh, family.init_inputs(t.seq_len))
  frozen, frozen_shardings = objectives.frozen(objective, mesh)
  frozen_in = () if frozen is None else (frozen_shardings,)

  # Compiled steps: jitted once, explicit shardings, the state donated.
  train_step = jax.jit(
      step_lib.make_train_step(model, objective, tx, schedule, config.optim.grad_accum_steps,
                               dropout=config.model.dropout_rate > 0, mesh=mesh),
      in_shardings=(state_shardings, batch_shardings, replicated) + frozen_in,
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(model, objective),
                      in_shardings=(state_shardings.params, batch_shardings) + frozen_in,
                      out_shardings=replicated)
  return Trainer(mesh, pipeline, family, objective, model, abstract_state, state_shardings,
                 initialise, init_rng,
                 _bind(train_step, frozen), _bind(eval_step, frozen), batch_shapes,
                 batch_shardings, dropout_rng, frozen)


def _bind(step, frozen):
  """`step` with its last argument, the frozen arrays, supplied: they still enter the compiled
  step as an argument, not as constants."""
  if frozen is None:
    return step
  bound = lambda *args: step(*args, frozen)
  bound.lower = lambda *args: step.lower(*args, frozen)  # For XLA's analyses of the program.
  return bound


def _profile_dir(workdir):
  """This process's folder for its trace and profile.md. jax.profiler names a trace after the
  host, so processes that share one (one per GPU, or the local launcher's) would overwrite each
  other's traces in a common folder: each of several processes has its own."""
  if jax.process_count() == 1:
    return f'{workdir}/profile'
  return f'{workdir}/profile/process_{jax.process_index()}'


def _start_trace(directory):
  """Starts a trace; False, after one printed sentence, where the profiler cannot start (another
  trace already running in this process)."""
  try:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
  except RuntimeError as error:
    print(f'No profile: the profiler could not start in {directory} ({error}); training goes on '
          '(stop the other trace to profile this run).', file=sys.stderr)
    return False
  return True


def _stop_trace(directory):
  """Ends the trace; False, after one printed sentence, where jax could not write it out (a
  folder it cannot write, a full disk, a trace file left truncated): the run goes on, since a
  profile is never worth the training run. jax then still holds the failed session, so a later
  trace in the same process cannot start."""
  try:
    jax.profiler.stop_trace()
  except profiling.FAILURES as error:
    print(f'The profiler trace in {directory} could not be written out ({error}); training goes '
          'on without it (check that the folder is writable and has room).', file=sys.stderr)
    return False
  return True


def _summarize_profile(directory, hlo_text, first_step, steps, wall_ms):
  """profile.md beside this process's trace, of its own devices (research/profiling.py; the
  compiled step comes from jit's cache). A summary that fails is one sentence: the run goes on,
  its trace is there."""
  try:
    title = profiling.heading(
        'python -m research.train ' + ' '.join(sys.argv[1:]),
        f' (steps {first_step}-{first_step + steps - 1}, process {jax.process_index()} of '
        f'{jax.process_count()})')
    path = profiling.write_summary(directory, hlo_text, steps, wall_ms, title)
  except profiling.FAILURES as error:
    print(f'The profile in {directory} was not summarised ({error}); its trace is there.',
          file=sys.stderr)
  else:
    print(f'Profile of {steps} steps from step {first_step}: {path}', file=sys.stderr)


def _progress_bar(config, start, total):
  if not config.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, file=sys.stderr)


def _add(totals, more):
  return more if totals is None else jax.tree.map(lambda a, b: a + b, totals, more)


def _evaluate(trainer, params, num_batches):
  """The objective's metrics over `num_batches` validation batches (or the whole validation set
  when the pipeline knows how many batches cover it), named eval_*."""
  totals = None
  for index in range(trainer.pipeline.eval_batches or num_batches):
    batch = global_batch.assemble(functools.partial(trainer.pipeline.eval_batch, index),
                                  trainer.batch_shapes, trainer.batch_shardings)
    totals = _add(totals, objectives.host_totals(trainer.eval_step(params, batch)))
  return {f'eval_{k}': v for k, v in trainer.objective.metrics(totals).items()}


def _free_replaced(fresh, state):
  """Frees the arrays of the fresh state that a warm start replaced: the trainer keeps its fresh
  state for the whole run, and with them it would hold the loaded parameters twice."""
  kept = {id(x) for x in jax.tree.leaves(state)}
  for x in jax.tree.leaves(fresh):
    if id(x) not in kept:
      x.delete()


# Data settings that say where data is kept or how it is fetched, not what it is.
_PLACES = ('data_dir', 'tokens_dir', 'tokenized_dir', 'prefetch')


def _changed_data_settings(checkpoints, config):
  """'data.KEY: A there, B here, ...' of the settings of what the data is that differ from those
  the run's config.json (beside its checkpoints) recorded (of those it recorded: an earlier
  version's has fewer); '' where it cannot be read."""
  try:
    with open(os.path.join(os.path.dirname(checkpoints), 'config.json')) as f:
      recorded = json.load(f)['data']
    current = json.loads(config.data.to_json_best_effort())  # As config.json holds it.
    return ', '.join(f'data.{k}: {recorded[k]!r} there, {current.get(k)!r} here'
                     for k in sorted(recorded)
                     if k not in _PLACES and recorded[k] != current.get(k))
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return ''


def _start_up(config, trainer, checkpointer):
  """Applies the start-up precedence; returns (state, dropout_rng, description).

  A resumed run continues the data from the row its checkpoint recorded.
  """
  if checkpointer.latest_step() is not None:
    state, record = checkpointer.restore(trainer.abstract_state, trainer.state_shardings,
                                         checkpoint_lib.settings(config))
    trainer.pipeline.check_position(record['data'],
                                    _changed_data_settings(checkpointer.directory, config))
    trainer.pipeline.resume_at(record['data']['next_step'], record['data']['rows_consumed'])
    rng = checkpoint_lib.rng_from_record(record)
    # A warm start begins a run; its own checkpoints take precedence after (the docstring above).
    ignored = (f' (checkpoint.init_from={config.checkpoint.init_from} is not read: a run that '
               'has checkpoints resumes from them)' if config.checkpoint.init_from else '')
    return state, rng, f'resumed from step {int(state.step)} in {checkpointer.directory}{ignored}'
  if config.checkpoint.init_from:
    state, _, description = checkpoint_lib.restore_params(
        config.checkpoint.init_from, trainer.state, trainer.state_shardings,
        checkpoint_lib.settings(config))
    _free_replaced(trainer.state, state)
    return state, trainer.dropout_rng, description
  return trainer.state, trainer.dropout_rng, 'fresh initialisation'


def _summary(objective, step_metrics, throughput):
  """The objective's metrics over the steps since the last log (from their summed totals),
  the means of the other step metrics, and the throughput over those steps."""
  totals = None
  for m in step_metrics:
    totals = _add(totals, objectives.host_totals(m['totals']))
  summary = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]
             if k not in ('totals', 'loss')}
  summary.update(objective.metrics(totals))
  summary.update(throughput.report(steps=len(step_metrics),
                                   tokens=sum(m['tokens'] for m in step_metrics)))
  return summary


class NonFiniteError(RuntimeError):
  """The loss or gradient norm of a step is NaN or infinite."""


def _fetch_checked(pending, first_step):
  """Host copies of the metrics of steps first_step, first_step + 1, ...; raises NonFiniteError
  naming the first step whose loss or gradient norm is not finite."""
  fetched = jax.device_get(pending)
  for offset, metrics in enumerate(fetched):
    if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
      raise NonFiniteError(f'step {first_step + offset} has loss={float(metrics["loss"])} and '
                           f'grad_norm={float(metrics["grad_norm"])}')
  return fetched


def _sample(trainer, params, config):
  """A greedy sample of the trained model: the continuation of train.sample_prompt (decoders),
  or the answer to it as an input (encoder-decoders)."""
  tokenizer = trainer.pipeline.tokenizer
  if (config.train.sample_tokens <= 0 or not hasattr(tokenizer, 'decode')
      or not getattr(trainer.family, 'GENERATES_TEXT', False)):
    return None
  answers = getattr(trainer.family, 'IS_ENCODER_DECODER', False)
  prompt = tokenizer.encode(config.train.sample_prompt)
  stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
  sampling = decode.SamplingConfig(max_new_tokens=config.train.sample_tokens, stop_tokens=stops,
                                   pad_id=tokenizer_lib.filler_id(tokenizer))
  # Every process takes part (the parameters are sharded over the whole mesh); process 0 prints.
  model = trainer.family.build(config.model)
  inputs = prompt.tolist() + (list(stops) if answers else [])
  ids = decode.generate(model, params, [inputs], sampling, mesh=trainer.mesh)[0]
  if answers:
    return f'{config.train.sample_prompt} -> {tokenizer.decode(ids)}'
  return config.train.sample_prompt + tokenizer_lib.continuation_text(tokenizer, prompt, ids)


def _check_tokenizer(workdir, config):
  """A run's token ids mean nothing under another tokenizer: resuming with one is refused
  before any data is read (tokenizing a corpus can take hours)."""
  try:
    saved = workdir_lib.saved_tokenizer(workdir)
    if saved is None:
      return
    if config.data.source == 'markov':
      name, fingerprint = 'synthetic tokens (data.source=markov)', None
    else:
      tokenizer = tokenizer_lib.get(config.data.tokenizer, extra_ids=config.data.extra_ids)
      name, fingerprint = tokenizer.name, tokenizer.fingerprint
  except ValueError as error:  # A damaged saved copy, or a configured one that cannot load.
    raise pipeline_lib.DataError(str(error)) from None
  if saved.fingerprint == fingerprint:
    return
  kept = len(saved.sentinel_ids)
  try:
    same_vocabulary = fingerprint is not None and tokenizer_lib.get(
        config.data.tokenizer, extra_ids=kept).fingerprint == saved.fingerprint
  except ValueError:
    same_vocabulary = False
  if same_vocabulary:
    raise pipeline_lib.DataError(  # The same vocabulary with another number of sentinels.
        f'{workdir} was trained with the tokenizer {name} and {kept} sentinel ids, and this run '
        f'would add {config.data.extra_ids}; resume with --config.data.extra_ids={kept}, or start '
        'a new --workdir.')
  raise pipeline_lib.DataError(
      f'{workdir} was trained with the tokenizer {saved.name} and this run would use {name}; '
      f'resume with --config.data.tokenizer={saved.name}, or start a new --workdir.')


def run(config, workdir):
  """Trains `config` in `workdir` (resuming what is there); returns the last logged metrics."""
  mesh_shape = config_lib.validate(config, jax.device_count())
  if getattr(models.get(config.model.family), 'COUNTED', False):  # Fitted by counting, no steps.
    with workdir_lib.lock(workdir):
      return counting.run(config, workdir)
  mesh = mesh_lib.make_mesh(mesh_shape, dcn_shape=config_lib.dcn_sizes(config))
  with workdir_lib.lock(workdir), preemption.StopRequest() as stop:
    return _train(config, workdir, mesh, stop)


def _train(config, workdir, mesh, stop):
  t = config.train
  # Data, model, state, steps.
  _check_tokenizer(workdir, config)
  pipeline = pipeline_lib.build(config)
  trainer = setup(config, mesh, pipeline)

  # Start-up: resume, warm start or fresh. Nothing is written to the workdir before it succeeds.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             config.checkpoint.keep)
  resumed = checkpointer.latest_step() is not None
  state, dropout_rng, origin = _start_up(config, trainer, checkpointer)
  start_step = int(state.step)
  stop_step = t.num_steps if t.stop_at_step < 0 else min(t.stop_at_step, t.num_steps)
  if start_step >= stop_step:
    limit = ('raise or drop --config.train.stop_at_step' if stop_step < t.num_steps
             else 'raise --config.train.num_steps')
    print(f'The run in {workdir} is already at step {start_step}; {limit} to continue it, or '
          'delete that folder or pass another --workdir to start afresh.', file=sys.stderr)
    checkpointer.close()
    return {}
  print(f'{origin}; mesh {dict(mesh.shape)}', file=sys.stderr)
  notes = objectives.notes(config)
  if config.optim.warmup_steps >= t.num_steps:
    notes.insert(0, f'optim.warmup_steps={config.optim.warmup_steps} is not shorter than '
                    f'train.num_steps={t.num_steps}, so the learning rate never reaches optim.lr='
                    f'{config.optim.lr:g}; shorten the warm-up for a run this short.')
  if jax.process_index() == 0:
    for note in notes:
      print(f'Note: {note}', file=sys.stderr)
  # Compiled now rather than at the first step (which then finds it in jit's cache), so that a
  # step that cannot fit stops before anything is written to the workdir.
  device_memory.check_step(trainer.train_step.lower(
      state, global_batch.abstract(trainer.objective.fields(t.seq_len), t.batch_size, mesh),
      dropout_rng).compile(), config.model)
  if stop.stopped_before_start() is not None:
    print(f'Stopped on {stop.signal} before training started; nothing new to save.',
          file=sys.stderr)
    checkpointer.close()
    return {}
  config_lib.record_run(config, workdir, data=pipeline.record, resumed=resumed)
  if jax.process_index() == 0 and hasattr(pipeline.tokenizer, 'fingerprint'):
    folder = os.path.join(workdir, tokenizer_lib.SAVED_DIR)
    if not os.path.exists(folder):
      tokenizer_lib.save(pipeline.tokenizer, folder)

  # Loop.
  spec = trainer.family.spec_from_config(config.model)
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  throughput = metrics_lib.Throughput(
      trainer.objective.flops_per_token(trainer.family, spec),
      peak * jax.device_count() if peak else None)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=t.tensorboard)
  best = None
  if config.checkpoint.best_metric:
    best = checkpoint_lib.BestKeeper(os.path.join(workdir, 'best'),
                                     config.checkpoint.best_metric, config.checkpoint.best_mode)
  print(f'MFU is relative to the {peak_label}'
        + (f' ({peak / 1e9:,.0f} GFLOP/s per device)' if peak else ''), file=sys.stderr)
  bar = _progress_bar(config, start_step, stop_step)
  pending, unlogged, last = [], [], {}
  tracing = profiling = False  # A trace running; the traced steps under way (however it went).
  profile_dir = _profile_dir(workdir)
  if 0 <= t.profile_start_step < start_step and not os.path.exists(
      os.path.join(profile_dir, 'profile.md')):  # None is made, and none from an earlier start.
    print(f'No profile: this run resumes at step {start_step}, past train.profile_start_step='
          f'{t.profile_start_step}; set a later step to trace this run.', file=sys.stderr)
  w = config.watchdog
  prefetcher = prefetch.Prefetcher(
      pipeline.train_batch, global_batch.host_ranges(trainer.batch_shapes,
                                                     trainer.batch_shardings),
      start_step, stop_step, config.data.prefetch)
  watchdog = watchdog_lib.Watchdog(w.slow_factor, w.slow_min_s, w.exit_after_s).start()
  try:
    for step in range(start_step, stop_step):
      if step == t.profile_start_step:
        profiling, trace_start = True, time.perf_counter()
        tracing = _start_trace(profile_dir)
      batch = global_batch.assemble(prefetcher.rows(step), trainer.batch_shapes,
                                    trainer.batch_shardings)
      with (jax.profiler.StepTraceAnnotation('train', step_num=step) if tracing
            else contextlib.nullcontext()):
        state, step_metrics = trainer.train_step(state, batch, dropout_rng)
      pending.append(step_metrics)
      if len(pending) > 1:  # The step before has finished: keeps one step in flight, no more.
        jax.block_until_ready(pending[-2]['loss'])
        watchdog.beat(step - 1)
      if profiling and step + 1 >= t.profile_start_step + t.profile_num_steps:
        profiling = False
        jax.block_until_ready(state)
        traced_steps = step + 1 - t.profile_start_step
        wall_ms = (time.perf_counter() - trace_start) * 1000 / traced_steps
        # Every process writes out and summarises its own trace at this step, with its timers
        # paused, and they leave together: none waits at the next collective for another's
        # summary (or for one whose profiler failed) while its watchdog counts.
        with throughput.paused(), watchdog.paused():
          if tracing:
            tracing = False
            if _stop_trace(profile_dir):
              hlo_text = trainer.train_step.lower(state, batch, dropout_rng).compile().as_text()
              _summarize_profile(profile_dir, hlo_text, t.profile_start_step, traced_steps,
                                 wall_ms)
          if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'profile_{step}')
      checkpointer.check()  # A failed asynchronous save stops the run here.
      if best is not None:
        best.check()

      done = step + 1
      stopping = stop.should_stop(done)  # Asked once per step, by every process.
      last_step = done == stop_step or stopping
      log = done % t.log_every == 0 or last_step
      evaluate = (done % t.eval_every == 0 or done == stop_step) and not stopping  # Stop fast.
      save = done % config.checkpoint.every_steps == 0 or last_step
      if log or evaluate or save:  # Every step's loss is checked before anything is saved.
        unlogged += _fetch_checked(pending, done - len(pending) + 1)
        pending = []
        watchdog.beat(done - 1)
      scalars = {}
      if log:
        last = _summary(trainer.objective, unlogged, throughput)
        scalars, unlogged = dict(last), []
      if evaluate:
        with throughput.paused(), watchdog.paused():
          evaluation = _evaluate(trainer, state.params, t.eval_batches)
        last.update(evaluation)
        scalars.update(evaluation)
        if best is not None:
          with throughput.paused(), watchdog.paused():
            best.offer(done, state, checkpoint_lib.make_record(
                done, dropout_rng, pipeline.position(done), config), evaluation)
      if scalars:
        writer.write(done, scalars)
        if bar is not None:
          shown = dict(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
          if 'eval_loss' in last:
            shown['eval_loss'] = f"{last['eval_loss']:.3f}"
          bar.set_postfix(shown)
      if save:
        with throughput.paused(), watchdog.paused():
          checkpointer.save(done, state, checkpoint_lib.make_record(
              done, dropout_rng, pipeline.position(done), config))
      if bar is not None:
        bar.update(1)
      if stopping:
        break
  except NonFiniteError as error:
    checkpointer.wait()
    last = checkpointer.latest_step()
    kept, rerun = ((f'nothing after step {last} was saved', 'resume from the last checkpoint')
                   if last is not None else ('no checkpoint had been saved', 'start afresh'))
    raise NonFiniteError(f'Training diverged: {error}, so {kept}; lower optim.lr or raise '
                         'optim.warmup_steps (or enable optim.clip_norm), then rerun to '
                         f'{rerun}.') from None
  finally:
    watchdog.stop()
    prefetcher.close()
    if bar is not None:
      bar.close()
    writer.close()
    try:
      checkpointer.wait()  # Earlier good saves still finish when the loop fails.
      if best is not None:
        best.wait()
    finally:
      checkpointer.close()
      if best is not None:
        best.close()
      if tracing and _stop_trace(profile_dir):  # Stopped inside the traced steps; after the saves.
        print(f'The run stopped inside the traced steps, so its trace in {profile_dir} has no '
              'profile.md.', file=sys.stderr)
  if stopping:
    print(f'Stopped at step {done} on {stop.signal} with its checkpoint saved; rerun the same '
          'command to continue.', file=sys.stderr)
    return last
  if stop_step < t.num_steps:
    print(f'Stopped at step {stop_step} (train.stop_at_step) with its checkpoint saved; rerun '
          f'without train.stop_at_step, or with a later one, to continue to train.num_steps='
          f'{t.num_steps}.', file=sys.stderr)
    return last
  sample = _sample(trainer, state.params, config)
  if sample is not None and jax.process_index() == 0:
    print(f'--- sample (greedy) ---\n{sample}\n---', file=sys.stderr)
  return last


def main(argv):
  config = None
  try:
    config = config_lib.parse_flags(argv, __doc__, ('workdir', 'cpu_devices'))
    if not config_lib.WORKDIR.value:
      raise config_lib.ConfigError('No workdir given; pass --workdir DIR.')
    try:  # In every process, before they wait on each other: not only process 0 writes there.
      cli.check_folder(config_lib.WORKDIR.value, '--workdir')
    except ValueError as error:
      raise workdir_lib.WorkdirError(str(error)) from None
    mesh_lib.configure_cpu_devices()
    host_memory.reuse_freed_memory()
    mesh_lib.initialize_distributed(config.watchdog.peer_timeout_s)
    final = run(config, config_lib.WORKDIR.value)
  except (config_lib.ConfigError, pipeline_lib.DataError, checkpoint_lib.CheckpointError,
          workdir_lib.WorkdirError, mesh_lib.MeshError, device_memory.MemoryShortage) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1 if isinstance(error, checkpoint_lib.SaveError) else 2
  except NonFiniteError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  except jax.errors.JaxRuntimeError as error:
    return device_memory.exit_status(error, config and config.model)
  except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save.
    print('Interrupted before training started; nothing was saved.', file=sys.stderr)
    return 130
  if jax.process_index() == 0 and final:
    print('final ' + ' '.join(f'{k}={v:.4g}' for k, v in final.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
