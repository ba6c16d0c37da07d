"""The encoder-decoder through the command line: span-corruption pretraining on the embedded
corpus learns (validation loss below a unigram model of the same targets), its model answers
inputs with research.sample (greedy and beam search), and a bad sampling input is one sentence."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import runs
from research import config as config_lib
from research.data import pipeline as pipeline_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unigram_of_targets(config, train_batches=20):
  """Validation cross entropy of the add-one unigram model of the training rows' decoder
  targets (sentinels and EOS included): what the decoder must beat without reading inputs."""
  pipeline = pipeline_lib.build(config)
  counts = np.ones(config.model.vocab_size)
  for step in range(train_batches):
    rows = pipeline.train_batch(step)
    real = rows['decoder_weights'] > 0
    counts += np.bincount(rows['decoder_targets'][real], minlength=len(counts))
  log_p = np.log(counts / counts.sum())
  total = count = 0
  for index in range(config.train.eval_batches):
    rows = pipeline.eval_batch(index)
    real = rows['decoder_weights'] > 0
    total -= log_p[rows['decoder_targets'][real]].sum()
    count += real.sum()
  return total / count


@pytest.mark.slow
def test_span_corruption_pretraining_learns_and_the_model_answers_inputs(tmp_path):
  workdir, data_dir = tmp_path / 't5', tmp_path / 'tfds'
  steps = 100  # Eval cross entropy 2.6 here against the unigram model's 3.4.
  result = subprocess.run(
      [sys.executable, '-m', 'research.train', '--config', 'configs/encoder_decoder.py:t5_tiny',
       '--workdir', str(workdir), f'--config.data.data_dir={data_dir}',
       f'--config.train.num_steps={steps}', '--config.train.eval_every=100',
       '--config.train.batch_size=16',
       '--config.train.progress_bar=False', '--config.train.sample_tokens=12', '--cpu_devices=1'],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '--- sample (greedy) ---\ndef main(): -> ' in result.stderr
  config = config_lib.load_config_file(os.path.join(REPO, 'configs',
                                                    'encoder_decoder.py:t5_tiny'))
  config.data.data_dir, config.train.batch_size = str(data_dir), 16
  unigram = _unigram_of_targets(config)
  final = [json.loads(line) for line in open(workdir / 'metrics.jsonl')][-1]
  assert final['step'] == steps
  assert final['eval_cross_entropy'] < unigram - 0.5, (final['eval_cross_entropy'], unigram)

  # Greedy decoding is the end-of-run sample above; here beam search, a batch of two inputs.
  sample = runs.in_process('research.sample', '--workdir', str(workdir), '--input',
                           'def f(x):\n    return', '--input', 'import os', '--num_beams', '3',
                           '--max_new_tokens', '12')
  assert sample.returncode == 0, sample.stderr
  answers = sample.stdout.split('\n')
  assert len(answers) == 3 and answers[0] and answers[1] and not answers[2], sample.stdout
  wrong = runs.in_process('research.sample', '--workdir', str(workdir), '--prompt', 'def ')
  runs.assert_error(wrong, 'which answers inputs; pass --input instead of --prompt')
  beams = runs.in_process('research.sample', '--workdir', str(workdir), '--input', 'x',
                          '--num_beams', '2', '--temperature', '0.5')
  runs.assert_error(beams, 'Beam search is deterministic: temperature=0.5, top_k=0 and '
                           'top_p=1.0 have no use with num_beams=2')
