"""`python -m research.bench data`: the input pipeline against the train step it feeds.

Measured in one run, on the config's own source, tokenizer and objective:
  pretokenize_mb_per_s    text tokenized into shards (a fresh temporary folder), MB of text/s
  pipeline_tokens_per_s   host rows of consecutive training steps (reading, the objective's
                          transform, packing), one thread, no device work
  train_step_tokens_per_s the train step alone on synthetic batches of the same shape
  fed_tokens_per_s        the train step fed by the pipeline through the prefetching thread, with
                          input_wait_share: the share of that time the loop waited for rows
and, for each size in --corpus_mb, a generated corpus of that many MB tokenized and then trained
on for a few steps in fresh processes, whose peak resident memory (and start-up time) must not
grow with the corpus.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from research.data import global_batch
from research.data import pipeline as pipeline_lib
from research.data import prefetch
from research.data.sources import DataError

_WORDS = 5000
_BLOCK_BYTES = 4 << 20


def _timed_rows(pipeline, objective, steps):
  start, tokens = time.perf_counter(), 0.0
  for step in range(steps):
    tokens += float(objective.tokens(pipeline.train_batch(step)))
  return tokens / (time.perf_counter() - start)


def _fed_rate(trainer, state, pipeline, steps, depth):
  """(tokens/s, share of the time spent waiting for rows) of the train step fed by the
  pipeline's real rows through the prefetcher."""
  ranges = global_batch.host_ranges(trainer.batch_shapes, trainer.batch_shardings)
  state, _ = _feed(trainer, state, pipeline, ranges, 0, 2, depth)  # Warm: compiled already.
  return _feed(trainer, state, pipeline, ranges, 2, steps, depth)[1]


def _feed(trainer, state, pipeline, ranges, first, count, depth):
  prefetcher = prefetch.Prefetcher(pipeline.train_batch, ranges, first, first + count, depth)
  tokens, start, pending = 0.0, time.perf_counter(), None
  try:
    for step in range(first, first + count):
      rows = prefetcher.rows(step)
      batch = global_batch.assemble(rows, trainer.batch_shapes, trainer.batch_shardings)
      tokens += float(trainer.objective.tokens(rows(*ranges[0])))
      state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
      if pending is not None:  # As the training loop: one step in flight, no more.
        jax.block_until_ready(pending)
      pending = metrics['loss']
    jax.block_until_ready(pending)
    elapsed = time.perf_counter() - start
  finally:
    prefetcher.close()
  return state, (tokens / elapsed, prefetcher.wait_s / elapsed)


def _write_corpus(folder, megabytes, seed=0):
  """Text files of Zipf-distributed synthetic words, 64 MB each, `megabytes` in all. A few
  random blocks are reused so that generating a gigabyte takes seconds."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b'abcdefghijklmnopqrstuvwxyz', np.uint8)
  words = [bytes(rng.choice(letters, rng.integers(2, 9))) for _ in range(_WORDS)]
  blocks = []
  for _ in range(8):
    ranks = np.minimum(rng.zipf(1.2, _BLOCK_BYTES // 5), _WORDS) - 1
    text = b' '.join(words[r] for r in ranks)
    blocks.append(text.replace(b'zz', b'\n')[:_BLOCK_BYTES])
  os.makedirs(folder, exist_ok=True)
  remaining, index = megabytes << 20, 0
  while remaining > 0:
    size = min(remaining, 64 << 20)
    with open(os.path.join(folder, f'part{index:04d}.txt'), 'wb') as f:
      for written in range(0, size, _BLOCK_BYTES):
        f.write(blocks[(index + written // _BLOCK_BYTES) % len(blocks)][:size - written])
    remaining, index = remaining - size, index + 1
  return folder


_MEASURE = '''
import resource, subprocess, sys, time
start = time.time()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      time.time() - start)
sys.stderr.write(result.stderr[-2000:])
'''


def _measured(command):
  """(peak resident MB, seconds) of a command run as the only child of a fresh process."""
  result = subprocess.run([sys.executable, '-c', _MEASURE, *command], capture_output=True,
                          text=True)
  code, peak_kb, seconds = result.stdout.split()
  if int(code) != 0:
    lines = result.stderr.strip().splitlines() or ['no output']
    raise DataError(f'{" ".join(command[2:4])} failed during the benchmark: {lines[-1]}')
  return int(peak_kb) / 1024, float(seconds)


def _corpus_runs(config_spec, overrides, sizes, root):
  results = {}
  for megabytes in sizes:
    corpus = _write_corpus(os.path.join(root, f'corpus{megabytes}'), megabytes)
    data = ['--config.data.source=text', f'--config.data.paths={corpus}', '--config.data.mixture=',
            f'--config.data.tokens_dir={root}/tokens{megabytes}', '--config.data.tokenized_dir=',
            '--config.data.validation_percent=1']
    tokenize_mb, tokenize_s = _measured(
        [sys.executable, '-m', 'research.data.pretokenize', '--config', config_spec, *overrides,
         *data])
    train_mb, train_s = _measured(
        [sys.executable, '-m', 'research.train', '--config', config_spec, *overrides, *data,
         f'--workdir={root}/run{megabytes}', '--config.train.num_steps=3',
         '--config.train.eval_every=1000', '--config.train.progress_bar=false',
         '--config.train.sample_tokens=0', '--config.train.tensorboard=false'])
    results[megabytes] = dict(pretokenize_peak_rss_mb=tokenize_mb, pretokenize_s=tokenize_s,
                              train_start_peak_rss_mb=train_mb, train_3_steps_s=train_s)
  return results


def run(config, trainer_factory, steps, depth, corpus_mb, config_spec, overrides):
  """The figures above. trainer_factory(config) -> (train.Trainer, its current state, train
  step tokens/s on synthetic batches); config_spec and overrides start the corpus runs."""
  from research import objectives
  objective = objectives.build(config)
  with tempfile.TemporaryDirectory() as root:
    # A fresh folder for the shards (the source's own data_dir stays: TFDS reads from it).
    config.data.tokens_dir, config.data.tokenized_dir = os.path.join(root, 'tokens'), ''
    start = time.perf_counter()
    pipeline = pipeline_lib.build(config)
    tokenize_s = time.perf_counter() - start
    text_mb = sum(json.load(open(os.path.join(s['tokenized'], 'manifest.json')))['splits'][split]
                  ['bytes'] for s in pipeline.record['sources'] for split in ('train',
                                                                              'validation')) / 1e6
    pipeline_rate = _timed_rows(pipeline, objective, steps)
    trainer, state, step_rate = trainer_factory(config)
    fed_rate, waiting = _fed_rate(trainer, state, pipeline, steps, depth)
    results = dict(variant=config.variant, tokenizer=pipeline.tokenizer.name,
                   vocab_size=pipeline.tokenizer.vocab_size, objective=config.objective.name,
                   pretokenize_mb=text_mb, pretokenize_mb_per_s=text_mb / tokenize_s,
                   pipeline_tokens_per_s=pipeline_rate, train_step_tokens_per_s=step_rate,
                   pipeline_over_train_step=pipeline_rate / step_rate,
                   fed_tokens_per_s=fed_rate, fed_over_train_step=fed_rate / step_rate,
                   input_wait_share=waiting)
    for megabytes, figures in _corpus_runs(config_spec, overrides, corpus_mb, root).items():
      results.update({f'corpus_{megabytes}mb_{k}': v for k, v in figures.items()})
  return results
