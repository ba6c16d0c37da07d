"""Fine-tuning (configs/finetune.py, objective classification): labelled data from CSV, JSONL and
prepared TFDS datasets with one-sentence errors, rows, heads, and the command line: from a
pretraining run of ours (keeping the best state), and from a model imported from Hugging Face to
> 90% accuracy on a task that depends on word order."""

import csv
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import linen as nn

import runs
from research import config as config_lib
from research import objectives
from research.data import labeled
from research.data import pipeline as pipeline_lib
from research.data import tokenizer as tokenizer_lib
from research.models import decoder

TOKENIZER = tokenizer_lib.ByteTokenizer()


def _word_order_rows(count, seed):
  """Eight random letters with 'a' and 'b' inserted: label 1 when 'a' comes first. Both orders
  hold the same bytes, so no bag of embeddings does better than chance."""
  rng = random.Random(seed)
  rows = []
  for _ in range(count):
    chars = [rng.choice('cdefghijklmnopqrstuvwxyz') for _ in range(8)]
    first, second = sorted(rng.sample(range(10), 2))
    label = rng.randrange(2)
    chars.insert(first, 'a' if label else 'b')
    chars.insert(second, 'b' if label else 'a')
    rows.append(dict(text=' '.join(chars), label=label))
  return rows


def _write_csv(path, rows, fields=('text', 'label')):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return path


def _config(source='csv', model='', **data):
  spec = 'configs/finetune.py:' + source + (',' + model if model else '')
  config = config_lib.load_config_file(os.path.join(runs.REPO, spec))
  config.train.seq_len, config.train.batch_size = 32, 8
  config.data.update(data)
  return config


def test_csv_and_jsonl_rows_frame_pairs_and_cover_validation_once(tmp_path):
  rows = [dict(text='one two', text2='three', label=1), dict(text='four', text2='five six',
                                                             label=0)] * 5
  _write_csv(tmp_path / 'train.csv', rows, ('text', 'text2', 'label'))
  with open(tmp_path / 'dev.jsonl', 'w') as f:
    for row in rows[:3]:
      f.write(json.dumps(row) + '\n')
  config = _config('csv', pair_field='text2')
  train_examples = labeled._local_split(str(tmp_path / 'train.csv'), config.data, 2)[0]
  assert train_examples[0] == ('one two', 'three', 1)
  config.data.source = 'jsonl'
  validation = labeled._local_split(str(tmp_path / 'dev.jsonl'), config.data, 2)[0]
  assert validation == [(r['text'], r['text2'], r['label']) for r in rows[:3]]

  transform = objectives.build(config).transform(TOKENIZER)
  row = transform.row((TOKENIZER.encode('one two'), TOKENIZER.encode('three'), 1))
  ids = row['tokens'][0][row['segment_ids'][0] > 0]
  assert TOKENIZER.decode(ids) == 'one twothree' and ids[0] == TOKENIZER.cls_id
  np.testing.assert_array_equal(row['token_types'][0][:len(ids)], [0] * 9 + [1] * 6)
  long = transform.row((np.full(40, 10), np.full(10, 11), 0))  # Cut longest first to 32.
  assert (long['tokens'][0] == 10).sum() == 19 and (long['tokens'][0] == 11).sum() == 10

  rows_source = labeled.LabeledRows(validation, TOKENIZER, 0, False, transform)
  batch = rows_source.rows(0, 8)  # 3 examples and 5 padding rows.
  np.testing.assert_array_equal(batch['label_weight'], [1, 1, 1, 0, 0, 0, 0, 0])


def test_a_prepared_tfds_dataset_is_read_by_name_and_a_missing_one_is_one_sentence(tmp_path):
  class Sst2(tfds.core.GeneratorBasedBuilder):
    """Stands for glue/sst2 as TFDS (with TensorFlow) prepares it: array_record files."""
    VERSION = tfds.core.Version('2.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(0, 20),
              'validation': self._generate_examples(20, 26)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        yield i, {'sentence': f'sentence {i}', 'label': i % 2}

  builder = Sst2(data_dir=str(tmp_path / 'prepare'), file_format='array_record')
  builder.download_and_prepare()
  prepared = tmp_path / 'tfds' / 'glue' / 'sst2'
  prepared.mkdir(parents=True)
  os.rename(builder.data_dir, prepared / '2.0.0')

  config = _config('sst2', data_dir=str(tmp_path / 'tfds'))
  config.train.batch_size = 4
  data = pipeline_lib.build(config)
  assert data.record['train_examples'] == 20 and data.eval_batches == 2
  batches = [data.eval_batch(0), data.eval_batch(1)]
  assert batches[1]['label_weight'].tolist() == [1, 1, 0, 0]
  texts = {TOKENIZER.decode(b['tokens'][r]): int(b['label'][r]) for b in batches
           for r in range(4) if b['label_weight'][r]}
  assert texts == {f'sentence {i}': i % 2 for i in range(20, 26)}  # Each exactly once.

  missing = _config('sst2', data_dir=str(tmp_path / 'nothing'))
  with pytest.raises(labeled.DataError) as error:
    pipeline_lib.build(missing)
  message = str(error.value)
  assert message.startswith('TFDS dataset glue/sst2 is not prepared under') and '\n' not in message
  assert 'tfds build glue/sst2' in message


@pytest.mark.parametrize('rows, fields, overrides, fragment', [
    ([dict(text='x', y=1)], ('text', 'y'), {}, "has no field 'label' (it has ['text', 'y']); set "
     'data.label_field'),
    ([dict(text='x', label=1), dict(text='y', label=5)], ('text', 'label'), {},
     "The 'label' of row 3 of"),
    ([dict(text='x', label='good')], ('text', 'label'), {}, "is 'good', not an integer class id"),
    ([dict(text='x', text2='y', label=1), dict(text='z', text2='', label=0)],
     ('text', 'text2', 'label'), dict(pair_field='text2'), "The 'text2' of row 3 of"),
])
def test_bad_labelled_data_is_one_sentence(tmp_path, rows, fields, overrides, fragment):
  path = str(_write_csv(tmp_path / 'bad.csv', rows, fields))
  config = _config('csv', train_path=path, validation_path=path, **overrides)
  with pytest.raises(labeled.DataError) as error:
    pipeline_lib.build(config)
  message = str(error.value)
  assert fragment in message and '\n' not in message and message.endswith('.'), message


def test_unreadable_files_and_a_small_vocabulary_are_one_sentence(tmp_path):
  path = tmp_path / 'latin1.csv'
  path.write_bytes(b'text,label\ncaf\xe9,1\n')
  config = _config('csv', train_path=str(path), validation_path=str(path))
  with pytest.raises(labeled.DataError, match=r'is not a readable UTF-8 csv file'):
    pipeline_lib.build(config)
  lines = tmp_path / 'lines.jsonl'  # JSON lines given as CSV.
  lines.write_text('{"text": "a, b", "label": 1}\n{"text": "c", "label": 0}\n')
  config = _config('csv', train_path=str(lines), validation_path=str(lines))
  with pytest.raises(labeled.DataError, match=r'lines.jsonl holds JSON objects, not CSV \(its first '
                     r'line starts with "\{"\); set data.source=jsonl for one JSON object per '
                     r'line\.$'):
    pipeline_lib.build(config)
  good = str(_write_csv(tmp_path / 'good.csv', [dict(text='x', label=1)]))
  small = _config('csv', model='decoder.nanogpt_cpu', train_path=good, validation_path=good)
  with pytest.raises(labeled.DataError, match=r'tokens but model.vocab_size=65; raise'):
    pipeline_lib.build(small)


def test_a_model_with_one_token_type_gives_pairs_type_zero():
  config = _config('csv', model='encoder.roberta_base')
  transform = objectives.build(config).transform(TOKENIZER)
  row = transform.row((TOKENIZER.encode('one'), TOKENIZER.encode('two'), 1))
  assert not row['token_types'].any()
  bert = objectives.build(_config('csv')).transform(TOKENIZER)
  assert bert.row((TOKENIZER.encode('one'), TOKENIZER.encode('two'), 1))['token_types'].any()


def test_a_bad_data_file_stops_the_command_with_one_sentence(tmp_path):
  path = _write_csv(tmp_path / 'bad.csv', [dict(text='x', label=2)])
  result = runs.command('research.train', '--config', 'configs/finetune.py:csv', '--workdir',
                        str(tmp_path / 'run'), f'--config.data.train_path={path}',
                        f'--config.data.validation_path={path}')
  runs.assert_error(result, "The 'label' of row 2 of")
  assert not (tmp_path / 'run').exists()


def test_the_decoder_classifies_from_its_last_real_token():
  config = _config('csv', model='decoder.tiny')
  model = decoder.build(config.model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
  segments = jnp.asarray([[1] * 7 + [0] * 5, [1] * 12], jnp.int32)
  params = model.init(jax.random.key(0), tokens, None, segments, method='initialize')['params']
  logits = model.apply({'params': params}, tokens, None, segments,
                       method=lambda m, t, p, s: m.classify(m(t, p, s), s))
  hidden = model.apply({'params': params}, tokens, None, segments)
  kernel = nn.meta.unbox(params)['classifier']['kernel']
  np.testing.assert_allclose(logits[0], hidden[0, 6] @ kernel, atol=1e-5)
  np.testing.assert_allclose(logits[1], hidden[1, 11] @ kernel, atol=1e-5)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretraining_run_and_keeps_the_best_state(tmp_path):
  corpus = runs.write_corpus(tmp_path / 'corpus')
  pretrained = tmp_path / 'pretrained'
  runs.ok(runs.command(
      'research.train', '--config', 'configs/encoder.py:bert_tiny', '--workdir', str(pretrained),
      '--config.data.source=text', f'--config.data.paths={corpus}',
      f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.seq_len=32',
      '--config.train.batch_size=16', '--config.train.num_steps=30', '--config.train.eval_every=30',
      '--config.train.progress_bar=false', '--config.objective.max_predictions=6'))
  train = _write_csv(tmp_path / 'train.csv', _word_order_rows(2000, seed=0))
  dev = _write_csv(tmp_path / 'dev.csv', _word_order_rows(300, seed=1))
  common = ['--config', 'configs/finetune.py:csv', f'--config.checkpoint.init_from={pretrained}',
            f'--config.data.train_path={train}', f'--config.data.validation_path={dev}',
            '--config.train.seq_len=32', '--config.train.progress_bar=false',
            '--config.mesh.data=8']

  # The loaded parameters themselves are compared in tests/test_warm_start.py, and learning the
  # task in the test of a model imported from Hugging Face below.
  run = tmp_path / 'run'
  result = runs.ok(runs.command('research.train', '--workdir', str(run), *common,
                                '--config.train.num_steps=60', '--config.train.eval_every=20',
                                '--config.checkpoint.every_steps=20'))
  assert 'initialised 2 afresh (classifier)' in result.stderr, result.stderr
  records = [r for r in runs.metrics(run) if 'eval_accuracy' in r]
  assert [r['step'] for r in records] == [20, 40, 60]
  assert all(0 <= r['eval_f1'] <= 1 for r in records)
  # The best state is kept apart, and keeping it never removed the latest.
  best = max(records, key=lambda r: r['eval_accuracy'])['step']
  assert os.listdir(run / 'best') == [str(best)], (os.listdir(run / 'best'), records)
  assert '60' in os.listdir(run / 'checkpoints')


def _wordpiece_tokenizer(directory):
  """A WordPiece tokenizer.json over single letters and a few '##' pieces, as BERT's."""
  import tokenizers
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  letters = list('abcdefghijklmnopqrstuvwxyz')
  vocab = {token: i for i, token in enumerate(specials + letters + ['##' + c for c in letters])}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token='[UNK]'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tokenizer.decoder = tokenizers.decoders.WordPiece()
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  return len(vocab)


def test_a_hugging_face_tokenizer_gives_special_ids_and_words(tmp_path):
  _wordpiece_tokenizer(tmp_path)
  tokenizer = tokenizer_lib.get(f'hf:{tmp_path}')
  assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 2, 3, 4)
  ids = tokenizer.encode('ab c')
  assert tokenizer.decode(ids) == 'ab c'
  np.testing.assert_array_equal(tokenizer.word_ids(ids), [0, 0, 1])  # a ##b | c
  with pytest.raises(ValueError, match=r'names no folder with a tokenizer\.json'):
    tokenizer_lib.get(f'hf:{tmp_path / "nothing"}')


@pytest.mark.slow
def test_fine_tuning_a_model_imported_from_hugging_face_learns_word_order(tmp_path):
  import torch
  import transformers
  vocab_size = _wordpiece_tokenizer(tmp_path / 'hf')
  torch.manual_seed(0)
  transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=64)).save_pretrained(tmp_path / 'hf')
  imported = tmp_path / 'imported'
  runs.ok(runs.command('research.convert', 'from_hf', '--model_dir', str(tmp_path / 'hf'),
                       '--workdir', str(imported)))
  train = _write_csv(tmp_path / 'train.csv', _word_order_rows(2000, seed=0))
  dev = _write_csv(tmp_path / 'dev.csv', _word_order_rows(300, seed=1))
  run = tmp_path / 'run'
  result = runs.ok(runs.command(
      'research.train', '--config', f'configs/finetune.py:csv,{imported}', '--workdir', str(run),
      f'--config.checkpoint.init_from={imported}', f'--config.data.train_path={train}',
      f'--config.data.validation_path={dev}', '--config.train.seq_len=32',
      '--config.train.num_steps=300', '--config.optim.lr=1e-3', '--config.model.dropout_rate=0',
      '--config.train.progress_bar=false', '--config.mesh.data=8'))
  assert 'initialised 2 afresh (classifier)' in result.stderr, result.stderr
  config = json.load(open(run / 'config.json'))
  assert config['data']['tokenizer'] == f'hf:{imported / "tokenizer"}'
  final = runs.metrics(run)[-1]
  assert final['eval_accuracy'] > 0.9, final
