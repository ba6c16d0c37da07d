"""The trainer's short path for families fitted by counting (`COUNTED = True`: model.family=ngram).

research.train hands such a config here once it is validated and the workdir is locked. The
family provides Counter(spec) (add(rows) per chunk of training rows, then fit()), the fitted
Model (sums(rows) -> {'loss', 'correct', 'count'}, save, load) and saved_settings(path). The
model sees exactly the rows a neural run of the same config trains on (the training batches of
steps 0 .. train.num_steps - 1, so the token budgets are equal) and is scored on the same
validation batches by the objective's own metrics, so its eval_loss (nats per token) and
eval_bits_per_byte sit in one table with the neural runs'.

<workdir>/ngram/counts.npz keeps the fitted counts with the settings they were counted under; a
rerun with the same settings only evaluates, and one with more steps counts afresh over the rows
of those steps (which hold the saved ones). Fewer steps, other data or other model settings are
refused, as a neural run's resume refuses them: nothing saved is replaced.
metrics.jsonl gets one line at step train.num_steps, as a neural run's final evaluation.
"""

import json
import os
import sys
import time

import jax
import numpy as np

from research import config as config_lib
from research import metrics as metrics_lib
from research import models
from research import objectives
from research.data import pipeline as pipeline_lib

STORE = 'counts.npz'  # In <workdir>/<model.family>/.
CHUNK_TOKENS = 1 << 20  # Row positions reduced at once: np.unique's working set stays small.


def _settings(config, pipeline):
  """What the counts depend on (JSON-normalised, to compare with a saved store's)."""
  t = config.train
  settings = dict(model=config.model.to_dict(), objective=config.objective.to_dict(),
                  data=pipeline.record['fingerprint'], tokenizer=pipeline.record.get('tokenizer'),
                  batch_size=t.batch_size, seq_len=t.seq_len, num_steps=t.num_steps,
                  seed=config.seed)
  return json.loads(json.dumps(settings, sort_keys=True))


def _check_same_model(saved, config, path):
  """A workdir holds one model, as a neural run's checkpoints do: counts made for other model
  settings are refused, so that its metrics never mix two models."""
  if saved is None:
    return
  there, here = saved['model'], json.loads(json.dumps(config.model.to_dict(), sort_keys=True))
  changed = ', '.join(f'model.{key}: {there.get(key)!r} there, {here.get(key)!r} here'
                      for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key))
  if changed:
    raise config_lib.ConfigError(f'The counts in {path} were made for a different model '
                                 f'({changed}); rerun with the settings they were made with, or '
                                 'pass another --workdir.')


# The settings of _settings by the config keys that set them.
_SETTING_KEYS = dict(objective='objective.*', data='the data (data.*)', tokenizer='data.tokenizer',
                     batch_size='train.batch_size', seq_len='train.seq_len', seed='seed')


def _check_same_counts(saved, settings, path):
  """Counts made over the same rows are reused, and over fewer rows of the same stream recounted
  (as a neural run continues to more steps); any other difference is refused in one sentence."""
  if saved is None or saved == settings:
    return
  other = [key for key in sorted(set(saved) | set(settings))
           if key not in ('model', 'num_steps') and saved.get(key) != settings.get(key)]
  if other:
    raise config_lib.ConfigError(
        f'The counts in {path} were made under other settings '
        f'({", ".join(_SETTING_KEYS.get(key, key) for key in other)} differ); rerun with the '
        'settings they were made with, or pass another --workdir.')
  if saved['num_steps'] > settings['num_steps']:
    raise config_lib.ConfigError(
        f'The counts in {path} cover train.num_steps={saved["num_steps"]}, more than the '
        f'{settings["num_steps"]} asked for; rerun with --config.train.num_steps='
        f'{saved["num_steps"]} (or more, to count further), or pass another --workdir.')


def _progress_bar(config, total):
  if not config.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, unit='step', dynamic_ncols=True, file=sys.stderr)


def count(family, spec, pipeline, num_steps, bar=None):
  """The model fitted on the training batches of steps 0 .. num_steps - 1."""
  counter = family.Counter(spec)
  steps = max(1, CHUNK_TOKENS // (pipeline.batch_size * pipeline.seq_len))
  for start in range(0, num_steps, steps):
    batches = [pipeline.train_batch(step) for step in range(start, min(start + steps, num_steps))]
    counter.add({name: np.concatenate([b[name] for b in batches])
                 for name in ('tokens', 'targets', 'weights', 'positions')})
    if bar is not None:
      bar.update(len(batches))
  return counter.fit()


def evaluate(model, pipeline, objective, num_batches):
  """The objective's metrics over the validation batches (all of them when the pipeline knows
  how many cover the set), named eval_* as a neural run's."""
  with_bytes = objective.text_bytes() is not None  # Synthetic tokens spell no text.
  totals = dict(loss=0.0, correct=0.0, count=0.0, bytes=0.0)
  for index in range(pipeline.eval_batches or num_batches):
    batch = pipeline.eval_batch(index)
    for name, value in model.sums(batch).items():
      totals[name] += value
    totals['bytes'] += objective.target_bytes(batch) if with_bytes else 0.0
  if not with_bytes:
    del totals['bytes']
  term = objectives.get(objective.config.objective.name).TERM  # The causal LM's one term.
  return {f'eval_{k}': v for k, v in objective.metrics({term: totals}).items()}


def run(config, workdir):
  """Counts (or reuses the counts of) `config` in `workdir` and evaluates; returns the metrics."""
  if config.objective.name != 'causal_lm':
    raise config_lib.ConfigError(f'model.family={config.model.family} is fitted by counting '
                                 'next-token events; set objective.name=causal_lm.')
  family = models.get(config.model.family)
  spec = family.spec_from_config(config.model)
  path = os.path.join(workdir, config.model.family, STORE)
  saved = family.saved_settings(path)
  _check_same_model(saved, config, path)
  pipeline = pipeline_lib.build(config)
  objective = objectives.build(config)
  settings = _settings(config, pipeline)
  _check_same_counts(saved, settings, path)
  config_lib.record_run(config, workdir, data=pipeline.record)
  if saved == settings:
    model = family.Model.load(path, spec)
    print(f'Reusing the counts in {path}.', file=sys.stderr)
  else:
    if saved is not None:
      print(f'The counts in {path} cover train.num_steps={saved["num_steps"]}; counting afresh '
            f'over {settings["num_steps"]}.', file=sys.stderr)
    start, bar = time.perf_counter(), _progress_bar(config, config.train.num_steps)
    try:
      model = count(family, spec, pipeline, config.train.num_steps, bar)
    finally:
      if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    print(f'Counted {model.events:,} events into {model.num_ngrams:,} n-grams in {seconds:.1f} s '
          f'({model.nbytes() / max(model.num_ngrams, 1):.1f} bytes per n-gram); discounts per '
          f'order: {[tuple(round(d, 4) for d in o.discounts) for o in model.orders]}.',
          file=sys.stderr)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      model.save(path, settings)
  metrics = evaluate(model, pipeline, objective, config.train.eval_batches)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.train.tensorboard)
  try:
    writer.write(config.train.num_steps, metrics)
  finally:
    writer.close()
  return metrics
