"""`research.train` with configs/encoder.py as a user runs it: bert_tiny pretraining on a text
corpus learns well beyond always predicting the most frequent token."""

import collections
import os

import numpy as np
import pytest

import runs
from research import config as config_lib
from research.data import pipeline as pipeline_lib


@pytest.mark.slow
def test_bert_tiny_pretraining_beats_the_most_frequent_token(tmp_path):
  corpus = runs.write_corpus(tmp_path / 'corpus')
  overrides = ['--config.data.source=text', f'--config.data.paths={corpus}',
               f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.seq_len=64',
               '--config.train.batch_size=32', '--config.objective.max_predictions=12',
               '--config.objective.pair=none', '--config.model.pair_head=none',
               '--config.objective.dynamic_masking=true', '--config.optim.lr=1e-3',
               '--config.optim.warmup_steps=20', '--config.optim.decay=constant']
  workdir = tmp_path / 'run'
  runs.ok(runs.command('research.train', '--config', 'configs/encoder.py:bert_tiny',
                       '--workdir', str(workdir), '--config.train.num_steps=400',
                       '--config.train.eval_every=200', '--config.checkpoint.every_steps=400',
                       '--config.train.progress_bar=false', '--config.mesh.data=8', *overrides))
  final = runs.metrics(workdir)[-1]
  assert final['step'] == 400

  # The baseline: always predict the most frequent token among the validation predictions.
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'encoder.py:bert_tiny'))
  for override in overrides:
    key, value = override[len('--config.'):].split('=')
    section, name = key.split('.')
    config[section][name] = type(config[section][name])(
        value == 'true' if isinstance(config[section][name], bool) else value)
  data = pipeline_lib.build(config)
  targets = collections.Counter()
  for index in range(config.train.eval_batches):
    batch = data.eval_batch(index)
    targets.update(batch['mlm_targets'][batch['mlm_weights'] > 0].tolist())
  baseline = max(targets.values()) / sum(targets.values())
  assert baseline < 0.35, baseline
  assert final['eval_mlm_accuracy'] > baseline + 0.2, (final, baseline)
  assert final['mlm_accuracy'] > baseline + 0.2, (final, baseline)
  assert np.isfinite(final['mfu']) and final['tokens_per_s'] > 0
