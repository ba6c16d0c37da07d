"""Benchmarks.

  python -m research.bench train --config configs/decoder.py:nanogpt_cpu [--peer=torch]
  python -m research.bench decode --config configs/decoder.py:tiny [--decode_batch=8 ...]
  python -m research.bench checkpoint --config configs/decoder.py:gpt2_small [--checkpoint_dir=DIR]
  python -m research.bench data --config configs/decoder.py:tiny [--corpus_mb=100,1000]

`data` times the input pipeline (pretokenization, rows of the objective, prefetching) against
the train step it feeds, and the peak memory of training starts on generated corpora of several
sizes (research/data/benchmark.py).

`train` times full training steps (host batch creation and transfer, forward, backward, optimizer)
on synthetic full-length token batches after warm-up, and reports the median over several timed
windows of tokens/s, step time and MFU, plus the compile time. With --peer=torch it also trains
the same model in PyTorch (the family's TORCH_PEER: research/peers/torch_gpt.py, nanoGPT-
equivalent; research/peers/torch_bert.py, transformers' BERT, RoBERTa and ALBERT), alternating timed
windows between the two so that both see the same machine, and reports the ratio.

`checkpoint` times the per-array content checksums (research/checkpoint.py) against the save and
the restore they protect, on a freshly initialised train state of the config's model.

`decode` times batched KV-cache generation (research/decode.py) with random parameters: the
prefill of the prompts and the per-token decode step separately (fastest of the repeats).
"""

import importlib
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from flax import linen as nn

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import decode
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import models
from research import optim
from research import partitioning
from research import train
from research import train_state
from research.data import benchmark as data_benchmark
from research.data import global_batch

_WARMUP = flags.DEFINE_integer('warmup_steps', 5, 'Untimed steps after compilation.')
_WINDOWS = flags.DEFINE_integer('windows', 7, 'Number of timed windows.')
_WINDOW_STEPS = flags.DEFINE_integer('window_steps', 20, 'Training steps per timed window.')
_PEER = flags.DEFINE_enum('peer', None, ['torch'], 'Also time this peer implementation.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 8, 'decode: prompts per batch.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'decode: prompt length in tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'decode: generated tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'decode, checkpoint: timed repeats (the fastest '
                                'counts).')
_DATA_STEPS = flags.DEFINE_integer('data_steps', 50, 'data: training steps timed per measure.')
_CORPUS_MB = flags.DEFINE_list('corpus_mb', [], 'data: sizes (MB) of generated corpora whose '
                               'tokenization and training start are measured in new processes.')
_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'checkpoint: where to save (default: '
                                      'a temporary folder).')


_NO_DATA = object()


class _JaxTrainer:
  """Our train step on synthetic batches; run_steps(n) returns the tokens it trained on."""

  def __init__(self, config):
    mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
    self.trainer = train.setup(config, mesh, pipeline=_NO_DATA)  # Batches are synthetic.
    self.state = self.trainer.state
    self.rng = np.random.default_rng(0)
    self.config = config
    start = time.perf_counter()
    self.run_steps(1)
    self.compile_s = time.perf_counter() - start

  def run_steps(self, count):
    tokens = 0.0
    for _ in range(count):
      batch = self.trainer.objective.synthetic_batch(self.rng)
      self.state, self.metrics = self.trainer.train_step(
          self.state, global_batch.to_global(batch, self.trainer.batch_shardings),
          self.trainer.dropout_rng)
      tokens += float(self.trainer.objective.tokens(batch))
    jax.block_until_ready((self.state, self.metrics))
    self.tokens_per_step = tokens / count
    return tokens


def _timed_rate(run_steps):
  start = time.perf_counter()
  tokens = run_steps(_WINDOW_STEPS.value)
  return tokens / (time.perf_counter() - start)


def bench_train(config):
  t = config.train
  ours = _JaxTrainer(config)
  runners = {'ours': ours.run_steps}
  if _PEER.value == 'torch':
    peer = importlib.import_module(models.get(config.model.family).TORCH_PEER)
    try:
      runners['torch'] = peer.make_trainer(config, t.batch_size, t.seq_len)
    except ValueError as error:
      raise config_lib.ConfigError(str(error)) from None
  for run_steps in runners.values():
    run_steps(_WARMUP.value)
  rates = {name: [] for name in runners}
  for _ in range(_WINDOWS.value):  # Alternate windows so that all runners see the same machine.
    for name, run_steps in runners.items():
      rates[name].append(_timed_rate(run_steps))

  family = models.get(config.model.family)
  tokens_per_s = statistics.median(rates['ours'])
  flops_per_token = ours.trainer.objective.flops_per_token(
      family, family.spec_from_config(config.model))
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  results = dict(
      variant=config.variant, devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
      tokens_per_s=tokens_per_s, tokens_per_s_windows=rates['ours'],
      step_time_ms=1000 * ours.tokens_per_step / tokens_per_s,
      compile_s=ours.compile_s, model_tflops_per_s=tokens_per_s * flops_per_token / 1e12,
      flops_per_token=flops_per_token, final_loss=float(ours.metrics['loss']))
  if peak:
    results.update(mfu=tokens_per_s * flops_per_token / (peak * jax.device_count()),
                   peak_tflops_per_s=peak * jax.device_count() / 1e12, peak_source=peak_label)
  if 'torch' in rates:
    peer = statistics.median(rates['torch'])
    results.update(torch_tokens_per_s=peer, torch_tokens_per_s_windows=rates['torch'],
                   ratio_to_torch=tokens_per_s / peer)
  return results


def bench_decode(config):
  family = models.get(config.model.family)
  if not getattr(family, 'GENERATES_TEXT', False):
    raise config_lib.ConfigError(f'model.family={config.model.family!r} does not generate text; '
                                 'benchmark decoding with a decoder config.')
  model = family.build(config.model)
  params = jax.jit(lambda key: model.init(key, **family.init_inputs(8), method='initialize'))(
      jax.random.key(0))['params']
  params = nn.meta.unbox(params)
  batch, prompt_len, new = _DECODE_BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  prompts = np.random.default_rng(0).integers(3, config.model.vocab_size, (batch, prompt_len))
  prompts = prompts.tolist()

  def seconds(new_tokens):
    sampling = decode.SamplingConfig(max_new_tokens=new_tokens)
    decode.generate(model, params, prompts, sampling)  # Compile.
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      decode.generate(model, params, prompts, sampling)  # Returns host lists: synchronised.
      times.append(time.perf_counter() - start)
    return min(times)  # The least disturbed run.

  prefill_s = seconds(1)  # Prefill plus one decode step.
  total_s = seconds(new)
  if total_s <= prefill_s:
    raise config_lib.ConfigError('Generating was not measurably slower than prefilling; raise '
                                 '--new_tokens or --repeats.')
  per_token_s = (total_s - prefill_s) / max(new - 1, 1)
  return dict(variant=config.variant, device_kind=jax.devices()[0].device_kind, batch=batch,
              prompt_len=prompt_len, new_tokens=new, prefill_s=prefill_s,
              prefill_tokens_per_s=batch * prompt_len / prefill_s,
              decode_step_ms=1000 * per_token_s, decode_tokens_per_s=batch / per_token_s,
              generate_s=total_s)


def _fastest(run, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def bench_checkpoint(config):
  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  family = models.get(config.model.family)
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  state, shardings = train_state.create(model, tx, mesh, family.init_inputs(8), jax.random.key(0))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  checkpoint_lib.checksums(state)  # Compile.
  checksum_s = _fastest(lambda: checkpoint_lib.checksums(state), _REPEATS.value)
  record = checkpoint_lib.make_record(0, jax.random.key(0), {}, config)
  with tempfile.TemporaryDirectory(dir=_CHECKPOINT_DIR.value) as root:
    saves = iter(range(1000))

    def save():  # Each repeat saves a new step and waits until it is on disk.
      checkpointer.save(next(saves), state, record)
      checkpointer.wait()

    checkpointer = checkpoint_lib.Checkpointer(os.path.join(root, 'checkpoints'), keep=2)
    save_s = _fastest(save, _REPEATS.value)
    settings = checkpoint_lib.settings(config)
    restore_s = _fastest(lambda: jax.block_until_ready(
        checkpointer.restore(state, shardings, settings)[0]), _REPEATS.value)
    checkpointer.close()
  return dict(variant=config.variant, devices=jax.device_count(),
              device_kind=jax.devices()[0].device_kind, state_gb=state_bytes / 1e9,
              checksum_s=checksum_s, checksum_gb_per_s=state_bytes / 1e9 / checksum_s,
              save_s=save_s, restore_s=restore_s, checksum_share_of_save=checksum_s / save_s,
              checksum_share_of_restore=checksum_s / restore_s)


def bench_data(config, argv):
  """The input pipeline against the train step (research/data/benchmark.py)."""
  def trainer_factory(config):
    ours = _JaxTrainer(config)
    ours.run_steps(_WARMUP.value)
    rate = statistics.median(_timed_rate(ours.run_steps) for _ in range(_WINDOWS.value))
    return ours.trainer, ours.state, rate

  try:
    sizes = [int(size) for size in _CORPUS_MB.value]
  except ValueError:
    raise config_lib.ConfigError(f'--corpus_mb={",".join(_CORPUS_MB.value)} must list whole '
                                 'megabytes, e.g. 100,1000.') from None
  overrides = [a for a in argv[2:] if a.startswith('--config.')]
  spec = config_lib.config_spec(argv)
  return data_benchmark.run(config, trainer_factory, _DATA_STEPS.value, config.data.prefetch,
                            sizes, spec, overrides)


def _check_flags():
  """One sentence for a flag value the benchmarks cannot use."""
  counts = dict(windows=_WINDOWS, window_steps=_WINDOW_STEPS, decode_batch=_DECODE_BATCH,
                prompt_len=_PROMPT_LEN, new_tokens=_NEW_TOKENS, repeats=_REPEATS,
                data_steps=_DATA_STEPS)
  for name, flag in counts.items():
    if flag.value < 1:
      raise config_lib.ConfigError(f'--{name}={flag.value} must be at least 1.')
  if _WARMUP.value < 0:
    raise config_lib.ConfigError(f'--warmup_steps={_WARMUP.value} must not be negative.')
  if _CHECKPOINT_DIR.value and not os.path.isdir(_CHECKPOINT_DIR.value):
    raise config_lib.ConfigError(f'--checkpoint_dir {_CHECKPOINT_DIR.value} is not a directory; '
                                 'pass an existing folder (its disk is the one measured).')


def main(argv):
  modes = {'train': bench_train, 'decode': bench_decode, 'checkpoint': bench_checkpoint,
           'data': lambda config: bench_data(config, argv)}
  if len(argv) < 2 or argv[1] not in modes:
    print('usage: python -m research.bench train|decode|checkpoint|data --config '
          'configs/<family>.py:VARIANT', file=sys.stderr)
    return 2
  try:
    config = config_lib.parse_flags([argv[0]] + argv[2:])
    _check_flags()
    mesh_lib.configure_cpu_devices()
    results = modes[argv[1]](config)
  except (config_lib.ConfigError, data_benchmark.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  for key, value in results.items():
    if isinstance(value, list):
      value = '[' + ', '.join(f'{v:,.0f}' for v in value) + ']'
    shown = f'{value:,.4g}' if isinstance(value, float) else value
    print(f'{key:>26}: {shown}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
