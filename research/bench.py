"""Benchmarks.

  python -m research.bench train --config configs/decoder.py:nanogpt_cpu

`train` times full training steps (host batch creation and transfer, forward, backward, optimizer)
on synthetic full-length token batches after warm-up, and reports the median over several timed
windows of tokens/s, step time and MFU, plus the compile time.
"""

import json
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags

from research import config as config_lib
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import train
from research.data import global_batch
from research.models import decoder

_WARMUP = flags.DEFINE_integer('warmup_steps', 5, 'Untimed steps after compilation.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'Number of timed windows.')
_WINDOW_STEPS = flags.DEFINE_integer('window_steps', 20, 'Training steps per timed window.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')


def synthetic_batch(rng, batch_size, seq_len, vocab_size):
  """Full rows of uniform random tokens in the training batch format (one segment per row)."""
  tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
              weights=np.ones((batch_size, seq_len), np.float32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
              segment_ids=np.ones((batch_size, seq_len), np.int32))


def bench_train(config):
  t = config.train
  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  trainer = train.setup(config, mesh)
  rng = np.random.default_rng(0)

  def next_batch():
    batch = synthetic_batch(rng, t.batch_size, t.seq_len, config.model.vocab_size)
    return global_batch.to_global(batch, trainer.batch_shardings), float(batch['weights'].sum())

  state = trainer.state
  start = time.perf_counter()
  batch, _ = next_batch()
  state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    batch, _ = next_batch()
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
  jax.block_until_ready(state)

  rates = []
  for _ in range(_WINDOWS.value):
    tokens = 0.0
    start = time.perf_counter()
    for _ in range(_WINDOW_STEPS.value):
      batch, count = next_batch()
      state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
      tokens += count
    jax.block_until_ready((state, metrics))
    rates.append(tokens / (time.perf_counter() - start))

  spec = decoder.DecoderSpec.from_config(config.model)
  tokens_per_s = statistics.median(rates)
  flops_per_token = metrics_lib.train_flops_per_token(spec, t.seq_len)
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  results = dict(
      variant=config.variant, devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
      tokens_per_s=tokens_per_s, tokens_per_s_windows=rates,
      step_time_ms=1000 * t.batch_size * t.seq_len / tokens_per_s,
      compile_s=compile_s, model_tflops_per_s=tokens_per_s * flops_per_token / 1e12,
      flops_per_token=flops_per_token, final_loss=float(metrics['loss']))
  if peak:
    results.update(mfu=tokens_per_s * flops_per_token / (peak * jax.device_count()),
                   peak_tflops_per_s=peak * jax.device_count() / 1e12, peak_source=peak_label)
  return results


def main(argv):
  if len(argv) < 2 or argv[1] != 'train':
    print('usage: python -m research.bench train --config configs/decoder.py:VARIANT', file=sys.stderr)
    return 2
  try:
    config = config_lib.parse_flags([argv[0]] + argv[2:])
    results = bench_train(config)
  except config_lib.ConfigError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  for key, value in results.items():
    shown = f'{value:,.4g}' if isinstance(value, float) else value
    print(f'{key:>22}: {shown}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
