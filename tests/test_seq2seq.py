"""Sequence-to-sequence fine-tuning (configs/finetune.py:pairs, objective seq2seq): rows of
(input, target) pairs from JSONL and prepared TFDS datasets, one-sentence errors from the command
line, and an encoder-decoder trained from scratch through it to reverse strings."""

import json
import os
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
from research import config as config_lib
from research.data import labeled
from research.data import pipeline as pipeline_lib
from research.data import tokenizer as tokenizer_lib

TOKENIZER = tokenizer_lib.ByteTokenizer()
EOS, PAD = TOKENIZER.eos_id, TOKENIZER.pad_id


def _write_jsonl(path, rows):
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return path


def _reversals(count, seed):
  """Strings of 3 to 8 random lowercase letters, each to be written backwards."""
  rng = random.Random(seed)
  texts = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 8)))
           for _ in range(count)]
  return [dict(input=text, target=text[::-1]) for text in texts]


def _config(spec='pairs', **data):
  config = config_lib.load_config_file(os.path.join(runs.REPO, f'configs/finetune.py:{spec}'))
  config.train.seq_len, config.train.target_len, config.train.batch_size = 8, 6, 4
  config.data.update(data)
  return config


def _ids(text):
  return TOKENIZER.encode(text).tolist()


def test_the_pairs_task_defaults_to_t5_tiny_and_keeps_the_best_sequence_accuracy():
  config = _config()
  assert config.variant == 'pairs,encoder_decoder.t5_tiny'
  assert config.objective.name == 'seq2seq' and config.data.source == 'jsonl'
  assert (config.data.text_field, config.data.target_field) == ('input', 'target')
  assert config.checkpoint.best_metric == 'eval_sequence_accuracy'
  assert config.checkpoint.init_from == ''  # Optional: without it the model trains afresh.
  assert 'label_field' not in config.data and 'num_labels' not in config.model
  full = config_lib.load_config_file(os.path.join(runs.REPO, 'configs/finetune.py:pairs'))
  assert full.train.target_len == 32 and full.data.extra_ids == 122  # t5_tiny's.


def test_rows_end_with_eos_shift_the_targets_right_and_cut_both_streams(tmp_path):
  rows = [dict(input='abc', target='xy'), dict(input='abcdefghij', target='uvwxyz'),
          dict(input='q', target='r')]
  path = str(_write_jsonl(tmp_path / 'pairs.jsonl', rows))
  data = pipeline_lib.build(_config(train_path=path, validation_path=path))
  assert data.record['read'] == dict(train=[path], validation=[path], targets='text',
                                     columns=dict(text_field='input', target_field='target'))
  assert data.eval_batches == 1
  batch = data.eval_batch(0)  # Three examples and a padding row.

  np.testing.assert_array_equal(batch['encoder_tokens'][0], _ids('abc') + [EOS] + [PAD] * 4)
  np.testing.assert_array_equal(batch['decoder_targets'][0], _ids('xy') + [EOS] + [PAD] * 3)
  np.testing.assert_array_equal(batch['decoder_tokens'][0], [PAD] + _ids('xy') + [PAD] * 3)
  np.testing.assert_array_equal(batch['decoder_weights'][0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['decoder_positions'][0], [0, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(batch['encoder_segment_ids'][0], [1] * 4 + [0] * 4)
  # Cut to seq_len - 1 = 7 input and target_len - 1 = 5 target tokens, then EOS.
  np.testing.assert_array_equal(batch['encoder_tokens'][1], _ids('abcdefg') + [EOS])
  np.testing.assert_array_equal(batch['decoder_targets'][1], _ids('uvwxy') + [EOS])
  np.testing.assert_array_equal(batch['decoder_tokens'][1], [PAD] + _ids('uvwxy'))
  np.testing.assert_array_equal(batch['decoder_segment_ids'][1], [1] * 6)
  assert batch['decoder_weights'][2].sum() == 2
  np.testing.assert_array_equal(batch['decoder_weights'].sum(axis=1), [3, 6, 2, 0])
  assert not batch['encoder_segment_ids'][3].any() and not batch['encoder_tokens'][3].any()

  train = data.train_batch(0)  # Training visits the three pairs in a shuffled order.
  assert sorted(train['decoder_weights'].sum(axis=1)[:3].tolist()) == [2, 3, 6]


class _ReversePairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands for a prepared TFDS dataset of text pairs (written as array_record)."""
  name = 'reverse_pairs'
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = {'question': tfds.features.Text(), 'answer': tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 6), 'validation': self._generate_examples(6, 9)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {'question': f'pair {i}', 'answer': f'{i} riap'}


def test_a_prepared_tfds_dataset_of_pairs_is_read_by_name(tmp_path):
  tfds.disable_progress_bar()
  _ReversePairs(data_dir=str(tmp_path / 'tfds'), file_format='array_record').download_and_prepare()
  config = _config(source='tfds', tfds_name='reverse_pairs', data_dir=str(tmp_path / 'tfds'),
                   text_field='question', target_field='answer')
  config.train.target_len = 8
  data = pipeline_lib.build(config)
  assert data.record['read']['validation'] == 'reverse_pairs/1.0.0:validation:3'
  batch = data.eval_batch(0)
  assert batch['decoder_weights'][3].sum() == 0
  pairs = [(TOKENIZER.decode(batch['encoder_tokens'][r]), TOKENIZER.decode(
      batch['decoder_targets'][r])) for r in range(3)]
  assert pairs == [('pair 6', '6 riap'), ('pair 7', '7 riap'), ('pair 8', '8 riap')]

  config.data.tfds_name = ''
  with pytest.raises(labeled.DataError, match=r"^data.source='tfds' needs data.tfds_name \("):
    pipeline_lib.build(config)


def test_a_target_that_is_not_a_text_is_one_sentence(tmp_path):
  path = str(_write_jsonl(tmp_path / 'pairs.jsonl', [dict(input='one', target='1'),
                                                     dict(input='two', target=2)]))
  with pytest.raises(labeled.DataError) as error:
    pipeline_lib.build(_config(train_path=path, validation_path=path))
  assert str(error.value) == (f"The 'target' of row 2 of {path} is 2, not a text; write it as a "
                              'string.')


@pytest.mark.parametrize('lines, overrides, fragment', [
    (['{"input": "abc", "answer": "cba"}'], (), "has no field 'target' (it has ['answer', "
     "'input']); set data.target_field to one of them"),
    (['{"input": "abc", "target": "cba"}', '{"input": "de", "target": ""}'], (),
     "The 'target' of row 2 of"),
    (['{"input": "abc", "target": "cba"}'],
     ('--config.data.validation_path=/nonexistent/dev.jsonl',),
     '/nonexistent/dev.jsonl does not exist; fix data.train_path or data.validation_path'),
    (['input,target', 'abc,cba'], (), 'Line 1 of'),  # A CSV file given as JSON lines.
    (['{"input": "abc", "target": "cba"}'],
     (f'--config.data.validation_path={runs.REPO}/configs',),
     f'{runs.REPO}/configs is a folder, not a jsonl file; point data.train_path and '
     f'data.validation_path at files (a glob such as {runs.REPO}/configs/*.jsonl reads those in '
     'it).'),
])
def test_bad_pairs_stop_the_command_with_one_sentence(tmp_path, lines, overrides, fragment):
  path = tmp_path / 'pairs.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  result = runs.command('research.train', '--config', 'configs/finetune.py:pairs', '--workdir',
                        str(tmp_path / 'run'), f'--config.data.train_path={path}',
                        f'--config.data.validation_path={path}', *overrides)
  runs.assert_error(result, fragment)
  assert not (tmp_path / 'run').exists()


def test_pairs_need_an_encoder_decoder(tmp_path):
  result = runs.in_process('research.train', '--config', 'configs/finetune.py:pairs,decoder.tiny',
                           '--workdir', str(tmp_path / 'run'))
  runs.assert_error(result, "The model of 'pairs,decoder.tiny' has no train.target_len, so it is "
                    'no encoder-decoder')


def test_the_objective_needs_labelled_data_and_its_settings():
  pretraining = config_lib.load_config_file(
      os.path.join(runs.REPO, 'configs/encoder_decoder.py:t5_tiny'))
  pretraining.objective.name = 'seq2seq'
  with pytest.raises(config_lib.ConfigError, match=r'^objective.name=seq2seq reads csv, jsonl, '
                     r"tfds data; set data.source to one of \['csv', 'jsonl', 'tfds'\]"):
    config_lib.validate(pretraining, 8)
  pretraining.data.source = 'jsonl'
  with pytest.raises(config_lib.ConfigError, match=r'needs the data settings of '
                     r'configs/finetune.py \(data.train_path is missing\); start from --config '
                     r'configs/finetune.py:pairs\.$'):
    config_lib.validate(pretraining, 8)


@pytest.mark.slow
def test_t5_tiny_learns_to_reverse_strings_from_scratch_and_answers_inputs(tmp_path):
  train = _write_jsonl(tmp_path / 'train.jsonl', _reversals(4000, seed=0))
  dev = _write_jsonl(tmp_path / 'dev.jsonl', _reversals(200, seed=1))
  run = tmp_path / 'run'
  # Inputs and targets of at most 8 letters and EOS fit 10 positions.
  result = runs.ok(runs.command(
      'research.train', '--config', 'configs/finetune.py:pairs', '--workdir', str(run),
      f'--config.data.train_path={train}', f'--config.data.validation_path={dev}',
      '--config.train.seq_len=10', '--config.train.target_len=10',
      '--config.train.batch_size=64', '--config.train.num_steps=600',
      '--config.train.eval_every=300', '--config.optim.lr=5e-3', '--config.optim.warmup_steps=50',
      '--config.train.progress_bar=false', '--cpu_devices=1'))
  assert 'fresh initialisation' in result.stderr, result.stderr[-4000:]
  final = runs.metrics(run)[-1]
  assert final['step'] == 600 and final['eval_sequence_accuracy'] > 0.95, final
  assert os.listdir(run / 'best')  # The state with the best eval_sequence_accuracy.

  sample = runs.ok(runs.command('research.sample', '--workdir', str(run), '--input', 'abcde'))
  assert sample.stdout.split('\n')[0] == 'edcba', sample.stdout
