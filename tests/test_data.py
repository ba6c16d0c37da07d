"""Data: sources, tokenized array_record shards, windows over them, mixtures, host-independent
batches, and every bad input as one sentence."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
from research.config import load_config_file
from research.data import pipeline as pipeline_lib
from research.data import pretokenize
from research.data import shards
from research.data import sources
from research.data import tokenizer as tokenizer_lib
from research.data import windows
from research.models import decoder
from research.objectives import causal_lm

BYTES = tokenizer_lib.ByteTokenizer()


def _write_corpus(root, count=12):
  texts = {}
  for i in range(count):
    folder = root / f'part{i % 3}'
    folder.mkdir(parents=True, exist_ok=True)
    text = f'# document {i}\n' + ''.join(f'line {j} of doc {i}: {"é" * (j % 3)}\n'
                                         for j in range(5 + 7 * i))
    (folder / f'doc{i}.txt').write_text(text, encoding='utf-8')
    texts[f'part{i % 3}/doc{i}.txt'] = text
  return texts


def _data_settings(tmp_path, **overrides):
  import ml_collections
  settings = dict(source='text', paths='', tfds_name='', train_split='train',
                  validation_split='validation', text_field='text', mixture='',
                  data_dir=str(tmp_path / 'data'), tokens_dir='', tokenized_dir='',
                  validation_percent=25,
                  tokenizer='bytes', extra_ids=0)
  settings.update(overrides)
  return ml_collections.ConfigDict(settings)


def _split_text(source, split):
  """{origin: text} of a split, read back through the source's parts."""
  texts = {}
  for part in source.parts(split):
    for piece, _, origin in source.documents(part):
      piece = piece.decode() if isinstance(piece, bytes) else piece
      texts[origin] = texts.get(origin, '') + piece
  return texts


@pytest.mark.parametrize('spec', ['directory', 'glob', 'files'])
def test_text_files_split_by_path_hash_whatever_the_spec(tmp_path, spec):
  texts = _write_corpus(tmp_path / 'corpus')
  root = tmp_path / 'corpus'
  paths = {'directory': str(root), 'glob': str(root / 'part*' / '*.txt'),
           'files': ','.join(str(root / name) for name in texts)}[spec]
  source = sources.build(f'text:{paths}', _data_settings(tmp_path))
  train, validation = _split_text(source, 'train'), _split_text(source, 'validation')
  assert validation and not set(train) & set(validation)
  assert {os.path.relpath(p, root): t for p, t in {**train, **validation}.items()} == texts
  for path in validation:  # The split is a function of the path (relative to its root) alone.
    root_of = str(root) if spec != 'files' else os.path.dirname(path)
    assert sources.is_validation(os.path.relpath(path, root_of), 25)


def test_a_single_file_validates_on_its_last_bytes_cut_at_a_line(tmp_path):
  path = tmp_path / 'one.txt'
  path.write_text(''.join(f'{i}\n' for i in range(1000)))
  source = sources.build(f'text:{path}', _data_settings(tmp_path, validation_percent=10))
  train, validation = _split_text(source, 'train')[str(path)], _split_text(source, 'validation')
  text = path.read_text()
  assert train + validation[str(path)] == text  # Contiguous, nothing lost.
  assert validation[str(path)].startswith('\n') is False and train.endswith('\n')
  assert abs(len(validation[str(path)]) - len(text) // 10) < 5  # The last tenth of the bytes.


def test_large_files_are_read_in_parts_that_keep_one_document(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'PIECE_BYTES', 300)
  path = tmp_path / 'big.txt'
  path.write_text(''.join(f'line {i} é\n' for i in range(400)))
  (tmp_path / 'small.txt').write_text('tiny\n')
  source = sources.build(f'text:{path},{tmp_path / "small.txt"}',
                         _data_settings(tmp_path, validation_percent=1))
  parts = source.parts('train') + source.parts('validation')
  pieces = [p for part in parts for p in source.documents(part)]
  big = [(piece, ends) for piece, ends, origin in pieces if origin == str(path)]
  assert len(big) > 10 and [ends for _, ends in big] == [False] * (len(big) - 1) + [True]
  assert b''.join(piece for piece, _ in big).decode() == path.read_text()
  assert all(piece.endswith(b'\n') for piece, _ in big)  # Cut after whole lines only.


def test_jsonl_and_parquet_documents_come_from_the_text_field(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  documents = [f'document {i} ' + 'word ' * i for i in range(40)]
  jsonl = tmp_path / 'docs.jsonl'
  jsonl.write_text(''.join(json.dumps({'id': i, 'body': d}) + '\n'
                           for i, d in enumerate(documents)))
  parquet = tmp_path / 'docs.parquet'
  pq.write_table(pa.table({'body': documents, 'id': list(range(40))}), parquet, row_group_size=7)
  for spec in (f'jsonl:{jsonl}', f'parquet:{parquet}'):
    source = sources.build(spec, _data_settings(tmp_path, text_field='body',
                                                validation_percent=10))
    read = {split: [p for part in source.parts(split) for p, _, _ in source.documents(part)]
            for split in ('train', 'validation')}
    # In order; JSON lines: the lines of the last tenth of the bytes; Parquet: the last 10% of rows.
    assert read['train'] + read['validation'] == documents, spec
    assert len(read['validation']) == (2 if spec.startswith('jsonl') else 4), spec


def test_bad_sources_are_one_sentence(tmp_path):
  jsonl = tmp_path / 'docs.jsonl'
  jsonl.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  source = sources.build(f'jsonl:{jsonl}', _data_settings(tmp_path, validation_percent=1))
  with pytest.raises(sources.DataError, match=r"has no 'text' field; set data.text_field"):
    [p for part in source.parts('train') for p in source.documents(part)]
  jsonl.write_text('{"text": "fine"}\nnot json\n')
  with pytest.raises(sources.DataError, match=r'is not JSON .*; write one object per line\.$'):
    [p for part in source.parts('train') for p in source.documents(part)]
  with pytest.raises(sources.DataError, match=r'^Source .* matches no file; fix data.paths'):
    sources.build(f'text:{tmp_path / "nothing*.txt"}', _data_settings(tmp_path))
  with pytest.raises(sources.DataError, match=r"^Data source 'web:x' is not one of"):
    sources.parse_spec('web:x')
  (tmp_path / 'x.parquet').write_bytes(b'not parquet')
  with pytest.raises(sources.DataError, match=r'is not a readable Parquet file .*fix data.paths'):
    sources.build(f'parquet:{tmp_path / "x.parquet"}', _data_settings(tmp_path))
  for mixture, message in (('text:a=0;stdlib=1', r'weights must be positive'),
                           ('text:a=-1', r'weights must be positive'),
                           ('stdlib', r'is not SOURCE=WEIGHT')):
    with pytest.raises(sources.DataError, match=message):
      sources.specs(_data_settings(tmp_path, mixture=mixture))
  # Paths where the source reads none would train on other data without a word.
  for reader, settings in (("data.source='stdlib'", dict(source='stdlib')),
                           ("data.source='tfds'", dict(source='tfds', tfds_name='lm_text/en')),
                           ('data.mixture', dict(mixture='stdlib=1'))):
    with pytest.raises(sources.DataError, match=rf'^data.paths is set, but {reader} reads no '
                       r'paths; set data.source to text, jsonl or parquet'):
      sources.specs(_data_settings(tmp_path, paths=str(tmp_path), **settings))
  for setting in ('data_dir', 'tokens_dir', 'tokenized_dir'):
    remote = _data_settings(tmp_path, **{setting: 'gs://bucket/x'})
    with pytest.raises(sources.DataError, match=rf'^data.{setting}=gs://bucket/x is not a local '
                       r'folder, where tokenized shards are written and read; set '
                       r'data.tokens_dir \(or data.tokenized_dir\) to a local or shared one\.$'):
      pretokenize.directory('stdlib', sources.build('stdlib', remote), remote, BYTES)
  with pytest.raises(sources.DataError, match=r'TFDS dataset lm_text/en:9.9.9 is not prepared '
                     r'under .*; prepare it where TensorFlow is installed'):
    sources.build('tfds:lm_text/en:9.9.9', _data_settings(tmp_path))


def test_tfds_datasets_by_name_are_read_without_tensorflow(decoder_config, tmp_path):
  import importlib.util
  import tfds_fixtures
  assert importlib.util.find_spec('tensorflow') is None  # The test environment has no TensorFlow.
  texts = {'train': [f'train document {i}: ' + 'words ' * (i % 9) for i in range(60)],
           'validation': [f'validation document {i} ' * 3 for i in range(12)]}
  tfds_fixtures.write_text_dataset(tmp_path / 'tfds', 'lm_text', 'en', '1.0.0', texts,
                                   num_shards=2)
  tfds_fixtures.write_text_dataset(tmp_path / 'tfds', 'lm_text', 'en', '0.9.0',
                                   {'train': ['old'] * 8, 'validation': ['old'] * 8})
  config = decoder_config('tiny')
  config.data.update(dict(source='tfds', tfds_name='lm_text/en', data_dir=str(tmp_path / 'tfds')))
  config.train.seq_len = 32
  data = pipeline_lib.build(config)  # Without a version: the newest prepared one.
  for split in ('train', 'validation'):
    store = (data.train if split == 'train' else data.validation).store
    tokens, _ = store.read(0, store.num_tokens)
    expected = np.concatenate([np.append(BYTES.encode(t), BYTES.eos_id) for t in texts[split]])
    np.testing.assert_array_equal(tokens, expected)  # Every document, in order.
  assert data.record['sources'][0]['spec'] == 'tfds:lm_text/en'
  config.data.text_field = 'body'
  with pytest.raises(pipeline_lib.DataError, match=r"^TFDS dataset lm_text/en has no feature "
                     r"'body' \(it has \['text'\]\); set data.text_field\.$"):
    pipeline_lib.build(config)
  config.data.text_field, config.data.validation_split = 'text', 'test'
  with pytest.raises(pipeline_lib.DataError, match=r"has no split 'test' \(it has \['train', "
                     r"'validation'\]\); set data.validation_split\.$"):
    pipeline_lib.build(config)
  config.data.validation_split = 'validation'
  tfds_fixtures.to_tfrecord(tmp_path / 'tfds' / 'lm_text' / 'en' / '1.0.0')
  with pytest.raises(pipeline_lib.DataError, match=r'is stored as tfrecord, which cannot be read '
                     r'by index; convert it once with python -m research.data.tfds_convert'):
    pipeline_lib.build(config)


def _prepare(tmp_path, paths, monkeypatch, chunk=64, part_bytes=2000, **settings):
  """Shards of `paths` with small records and parts, so that reads cross both."""
  monkeypatch.setattr(shards, 'CHUNK', chunk)
  monkeypatch.setattr(sources, 'PART_BYTES', part_bytes)
  monkeypatch.setattr(sources, 'PIECE_BYTES', part_bytes // 3)  # Documents cross shards.
  data = _data_settings(tmp_path, **settings)
  return pretokenize.ensure(f'text:{paths}', data, BYTES)


def _expected_stream(source, split):
  """The split's documents tokenized and concatenated in order, and each token's document."""
  tokens, docs, doc, text = [], [], 0, b''
  for part in source.parts(split):
    for piece, ends, _ in source.documents(part):
      text += piece
      if ends:
        ids = np.append(BYTES.encode(text), BYTES.eos_id)
        if len(ids) > 1:
          tokens.append(ids)
          docs.append(np.full(len(ids), doc))
          doc += 1
        text = b''
  return np.concatenate(tokens), np.concatenate(docs)


def test_shards_read_back_every_token_and_document_by_index(tmp_path, monkeypatch):
  _write_corpus(tmp_path / 'corpus', count=30)
  (tmp_path / 'corpus' / 'empty.txt').write_text('')
  folder, manifest = _prepare(tmp_path, tmp_path / 'corpus', monkeypatch)
  source = sources.build(f'text:{tmp_path / "corpus"}', _data_settings(tmp_path))
  assert any(part.continues for part in source.parts('train'))  # Documents cross shards.
  for split in ('train', 'validation'):
    info = manifest['splits'][split]
    store = shards.TokenStore(folder, manifest, split)
    tokens, docs = _expected_stream(source, split)
    assert store.num_tokens == len(tokens) == info['tokens']
    if split == 'train':
      assert len(info['shards']) > 2  # Several parts, each a shard.
    rng = np.random.default_rng(0)
    for start in list(rng.integers(0, len(tokens) - 300, 30)) + [0, len(tokens) - 300]:
      read, read_docs = store.read(int(start), 300)  # Crosses records and shards.
      np.testing.assert_array_equal(read, tokens[start:start + 300])
      np.testing.assert_array_equal(read_docs, docs[start:start + 300])
    np.testing.assert_array_equal(store.token_counts(),
                                  np.bincount(tokens, minlength=BYTES.vocab_size))
  assert manifest['tokenizer']['fingerprint'] == BYTES.fingerprint
  assert manifest['source']['fingerprint'] == source.fingerprint()


def test_writers_share_the_shards_and_agree_on_the_manifest(tmp_path, monkeypatch):
  import threading
  _write_corpus(tmp_path / 'corpus', count=30)
  monkeypatch.setattr(shards, 'CHUNK', 64)
  monkeypatch.setattr(sources, 'PART_BYTES', 1000)
  monkeypatch.setattr(sources, 'PIECE_BYTES', 400)
  data = _data_settings(tmp_path)
  written, results = [], {}
  original = shards.write_shard
  monkeypatch.setattr(shards, 'write_shard',
                      lambda *a: written.append(os.path.basename(a[3])) or original(*a))

  def writer(index):
    results[index] = pretokenize.ensure(f'text:{tmp_path / "corpus"}', data, BYTES, index, 3)
  threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert len(written) == len(set(written)) > 6  # Every shard written once, by one writer.
  assert results[0] == results[1] == results[2]
  # One writer alone makes the same tokens.
  alone = _data_settings(tmp_path, data_dir=str(tmp_path / 'alone'))
  _, manifest = pretokenize.ensure(f'text:{tmp_path / "corpus"}', alone, BYTES)
  assert manifest['splits'] == results[0][1]['splits']


def test_a_bad_document_stops_tokenizing_with_one_sentence_and_no_partial_shard(tmp_path):
  jsonl = tmp_path / 'docs.jsonl'
  jsonl.write_text('{"text": "fine"}\n' * 50 + '{"text": 3}\n' + '{"text": "fine"}\n' * 50)
  data = _data_settings(tmp_path, validation_percent=10)
  with pytest.raises(sources.DataError, match=r"^The 'text' field of the line at byte 850 of "
                     r".*docs.jsonl is not a string; set data.text_field to a text field\.$"):
    pretokenize.ensure(f'jsonl:{jsonl}', data, BYTES)
  written = [p.name for p in (tmp_path / 'data').rglob('*') if p.is_file()]
  assert written and all(name.endswith('.lock') for name in written), written


class _Store:
  """An in-memory token stream with the TokenStore interface."""

  def __init__(self, documents, split='train'):
    self.tokens = np.concatenate(documents)
    self.docs = np.concatenate([np.full(len(d), i) for i, d in enumerate(documents)])
    self.num_tokens, self.split, self.reads = len(self.tokens), split, 0

  def read(self, start, length):
    self.reads += 1
    return self.tokens[start:start + length], self.docs[start:start + length]


def _documents(lengths=(3, 40, 17, 1, 16, 33, 8, 2, 70, 5), seed=7):
  rng = np.random.default_rng(seed)
  return [np.append(rng.integers(3, 259, n - 1), BYTES.eos_id) for n in lengths]


def _windows(documents=None, seq_len=16, seed=0, shuffle=True, transform=None):
  documents = documents or _documents()
  return windows.Windows(_Store(documents), seq_len, seed, shuffle,
                         transform or causal_lm.Transform()), documents


def test_windows_cover_every_target_once_per_epoch_with_right_segments_and_positions():
  lengths = (3, 40, 17, 1, 16, 33, 8, 2, 70, 5)
  stream = np.arange(3, 3 + sum(lengths))  # Every token distinct: a value is a position.
  docs = np.split(stream, np.cumsum(lengths)[:-1])
  rows, _ = _windows(docs)
  count = len(rows)
  epoch = rows.rows(0, count)
  # Every token but a document's first is a target exactly once per epoch, up to the tail after
  # the last whole window.
  covered = 3 + count * rows.stride
  expected = [t for d in docs for t in d[1:] if t <= covered]
  assert sorted(epoch['targets'][epoch['weights'] > 0].tolist()) == expected
  for r in range(count):
    segments = epoch['segment_ids'][r]
    real = segments > 0
    assert np.all(epoch['weights'][r] == real)
    assert np.all(np.diff(segments[real]) >= 0) and np.all(segments[~real] == 0)
    for s in np.unique(segments[real]):
      span = np.flatnonzero(segments == s)
      np.testing.assert_array_equal(epoch['positions'][r, span], np.arange(len(span)))
      np.testing.assert_array_equal(epoch['tokens'][r, span[1:]], epoch['targets'][r, span[:-1]])
  # Epochs differ in order but not in content.
  second = rows.rows(count, 2 * count)
  assert sorted(second['targets'][second['weights'] > 0].tolist()) == sorted(expected)
  assert not np.array_equal(second['tokens'], epoch['tokens'])


def test_any_row_is_a_pure_function_of_its_index_read_in_constant_work():
  rows, docs = _windows()
  far = 10 ** 12 + 3  # A resume a million epochs in: no earlier epoch is planned.
  reference = rows[far]
  fresh = _windows(docs)[0]
  row = fresh[far]
  assert fresh.store.reads == 1  # Only its own window was read.
  for name in reference:
    np.testing.assert_array_equal(row[name], reference[name])
  np.testing.assert_array_equal(fresh.rows(5, 9)['tokens'], rows.rows(0, 9)['tokens'][5:])
  other_seed = _windows(docs, seed=1)[0]
  assert not np.array_equal(other_seed.rows(0, 6)['tokens'], rows.rows(0, 6)['tokens'])


def test_packed_windows_give_the_per_document_losses_of_separate_documents(decoder_config):
  config = decoder_config('tiny')
  model = decoder.build(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                      method='initialize')['params']
  rows, _ = _windows(_documents((6, 9, 12, 40)), seq_len=32)
  batch = rows.rows(0, len(rows))
  row = int(np.argmax(batch['segment_ids'].max(axis=1)))  # The row with most documents.
  assert batch['segment_ids'][row].max() >= 3
  take = lambda x: jnp.asarray(x[row:row + 1])
  logits = model.apply({'params': params}, take(batch['tokens']), take(batch['positions']),
                       take(batch['segment_ids']), method='language_model')
  packed = causal_lm.token_losses(logits, take(batch['targets']))[0]
  for s in range(1, batch['segment_ids'][row].max() + 1):
    span = np.flatnonzero(batch['segment_ids'][row] == s)
    # The document alone at the start of a row (padded after it: causal attention never looks
    # ahead), so that every apply has the packed row's shape and compiles once.
    alone = {name: np.zeros_like(batch[name][row:row + 1]) for name in ('tokens', 'targets')}
    for name in alone:
      alone[name][0, :len(span)] = batch[name][row, span]
    logits = model.apply({'params': params}, jnp.asarray(alone['tokens']),
                         method='language_model')
    separate = causal_lm.token_losses(logits, jnp.asarray(alone['targets']))[0][:len(span)]
    np.testing.assert_allclose(packed[span], separate, atol=1e-5)


def _text_config(decoder_config, corpus, data_dir, **data):
  config = decoder_config('tiny')
  config.data.source, config.data.paths, config.data.data_dir = 'text', str(corpus), str(data_dir)
  config.data.update(data)
  return config


# Each objective's examples draw their randomness from (seed, index): masking and span
# corruption, not only windows, must give every host its slice of the same global batch.
HOST_CONFIGS = {'causal_lm': 'decoder.py:tiny', 'mlm': 'encoder.py:bert_tiny',
                'span_corruption': 'encoder_decoder.py:t5_tiny'}


@pytest.mark.parametrize('objective', sorted(HOST_CONFIGS))
def test_global_batches_do_not_depend_on_the_number_of_hosts(tmp_path, objective):
  _write_corpus(tmp_path / 'corpus', count=30)
  config = load_config_file(os.path.join(runs.REPO, 'configs', HOST_CONFIGS[objective]))
  config.data.source, config.data.paths = 'text', str(tmp_path / 'corpus')
  config.data.data_dir = str(tmp_path / 'data')
  config.train.batch_size, config.train.seq_len = 8, 32
  if objective == 'span_corruption':
    config.train.target_len = 16
  assert config.objective.name == objective
  data = pipeline_lib.build(config)
  for step in (0, 1, 5, 10 ** 6):
    whole = data.train_batch(step)
    for hosts in (2, 4):
      share = config.train.batch_size // hosts
      parts = [data.train_batch(step, host * share, (host + 1) * share) for host in range(hosts)]
      for name, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), value)
  # A fresh pipeline (a restarted job) produces the same batches from the same shards.
  again = pipeline_lib.build(config)
  for name, value in data.train_batch(5).items():
    np.testing.assert_array_equal(again.train_batch(5)[name], value)
  assert data.record['fingerprint'] == again.record['fingerprint']


def test_mixtures_draw_rows_by_weight_deterministically(decoder_config, tmp_path):
  for name, letter in (('a', 'x'), ('b', 'y')):
    (tmp_path / name).mkdir()
    for i in range(6):
      (tmp_path / name / f'{i}.txt').write_text(f'{letter * 50}\n' * (20 + i))
  config = decoder_config('tiny')  # data.source='markov': the mixture replaces it.
  config.data.update(dict(data_dir=str(tmp_path / 'data'),
                          mixture=f'text:{tmp_path / "a"}=0.7; text:{tmp_path / "b"}=0.3;'))
  config.train.seq_len = 32
  data = pipeline_lib.build(config)
  rows = data.train.rows(0, 1000)
  x = BYTES.encode('x')[0]
  from_a = np.mean([(r == x).any() for r in rows['tokens']])  # Rows are of one source.
  assert abs(from_a - 0.7) < 0.01
  again = pipeline_lib.build(config).train.rows(990, 1000)
  np.testing.assert_array_equal(again['tokens'], rows['tokens'][990:])
  # Past any length: each source goes on into its next epochs, reshuffled.
  later = data.train.rows(10 ** 9, 10 ** 9 + 1000)
  assert abs(np.mean([(r == x).any() for r in later['tokens']]) - 0.7) < 0.01
  assert not np.array_equal(later['tokens'], rows['tokens'])
  assert [s['weight'] for s in data.record['sources']] == [0.7, 0.3]


def test_invalid_utf8_is_counted_and_replaced(decoder_config, tmp_path, caplog):
  corpus = tmp_path / 'corpus'
  _write_corpus(corpus, count=12)
  (corpus / 'latin1.txt').write_bytes('café au lait\n'.encode('latin-1') * 3)  # 3 bad bytes.
  config = _text_config(decoder_config, corpus, tmp_path / 'data', validation_percent=1)
  with caplog.at_level('WARNING'):
    data = pipeline_lib.build(config)
  assert ('3 bytes of the train split of text:' in caplog.text
          and f'are not valid UTF-8 and were replaced by U+FFFD (most in {corpus / "latin1.txt"})'
          in caplog.text), caplog.text
  assert data.record['sources'][0]['train_tokens'] > 0


def test_tokens_beyond_the_model_vocabulary_and_foreign_shards_are_one_sentence(
    decoder_config, tmp_path):
  _write_corpus(tmp_path / 'corpus', count=12)
  config = _text_config(decoder_config, tmp_path / 'corpus', tmp_path / 'data')
  config.model.vocab_size = BYTES.vocab_size - 1  # The tokenizer's ids would not all embed.
  with pytest.raises(pipeline_lib.DataError, match=r"^The 'bytes' tokenizer has 262 tokens but "
                     r'model.vocab_size=261; raise model.vocab_size\.$'):
    pipeline_lib.build(config)
  config.model.vocab_size = BYTES.vocab_size
  folder, manifest = pretokenize.ensure(f'text:{tmp_path / "corpus"}', config.data, BYTES)
  # The same files named another way share the shards (named by the source's fingerprint).
  again, _ = pretokenize.ensure(f'text:{tmp_path / "corpus"}/', config.data, BYTES)
  assert again == folder
  # Shards made elsewhere, read through data.tokenized_dir: checked against this run.
  config = _text_config(decoder_config, tmp_path / 'corpus', tmp_path / 'data',
                        tokenized_dir=folder)
  manifest['tokenizer']['fingerprint'] = 'f' * 64
  with open(os.path.join(folder, shards.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(pipeline_lib.DataError, match=r'was made with the tokenizer bytes but this '
                     r'run uses bytes \(another fingerprint\); set data.tokenizer'):
    pipeline_lib.build(config)
  config.data.paths = str(tmp_path / 'elsewhere')
  manifest['tokenizer']['fingerprint'] = BYTES.fingerprint
  with open(os.path.join(folder, shards.MANIFEST), 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(pipeline_lib.DataError, match=r'was made from text:.* but this run reads '
                     r'text:.*elsewhere; point the run at its own tokenized data'):
    pipeline_lib.build(config)
  # The same source read with other settings would be other documents; the files may not be here.
  config.data.paths = str(tmp_path / 'corpus')
  assert manifest['source']['settings'] == {'data.validation_percent': 5}
  config.data.validation_percent = 10
  with pytest.raises(pipeline_lib.DataError, match=(
      r'^The tokenized data in .* was made with data.validation_percent=5 \(this run: 10\); set '
      r'the same values, or tokenize again into another data.tokenized_dir\.$')):
    pipeline_lib.build(config)
  config.data.validation_percent = 5
  assert pipeline_lib.build(config).record['sources'][0]['train_tokens'] > 0
  # A folder of other files, as a mistyped path would name, is not tokenized into.
  config.data.tokenized_dir = str(tmp_path / 'data')
  with pytest.raises(pipeline_lib.DataError, match=(
      r'^data.tokenized_dir .*data holds files that are not tokenized shards \(tokens\); point it '
      r'at a folder of shards \(with its manifest.json\) or at a new or empty folder to tokenize '
      r'into\.$')):
    pipeline_lib.build(config)


def test_a_shard_folder_that_writers_are_filling_is_not_taken_for_other_data(tmp_path):
  # Every name shards.py writes, as several writers leave them midway, and what a file system or
  # a folder probe adds: none is refused.
  shard = shards.shard_name('train', 3, 12)
  for name in (shard, shard + '.json', shard + '.counts.npy', shard + '.lock',
               shard + '.tmp-host-12-ab12cd34', shard + '.json.tmp-host-12-ab12cd34',
               shards.shard_name('validation', 0, 1) + '.lock', 'train.counts.npy',
               'validation.counts.npy.tmp-host-1-00ff00ff', shards.MANIFEST + '.tmp-h-1-12345678',
               '.nfs000123', 'lost+found', '.writable-x1y2'):
    (tmp_path / name).touch()
  shards.check_shard_folder(str(tmp_path), 'data.tokenized_dir')
  for other in ('train.jsonl', 'validation.txt', 'notes.md'):  # Raw data where shards would go.
    (tmp_path / other).touch()
    with pytest.raises(pipeline_lib.DataError, match=f'holds files that are not tokenized shards '
                       f'\\({other}\\); point it at a folder of shards'):
      shards.check_shard_folder(str(tmp_path), 'data.tokenized_dir')
    (tmp_path / other).unlink()


def test_pretokenize_command_writes_the_shards_training_then_reads(decoder_config, tmp_path):
  _write_corpus(tmp_path / 'corpus', count=12)
  args = ['--config', 'configs/decoder.py:tiny', '--config.data.source=text',
          f'--config.data.paths={tmp_path / "corpus"}', f'--config.data.data_dir={tmp_path}/data']
  result = runs.command('research.data.pretokenize', *args)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  assert 'train:' in out and 'MB/s' in out, out
  config = _text_config(decoder_config, tmp_path / 'corpus', tmp_path / 'data')
  folder = pipeline_lib.build(config).record['sources'][0]['tokenized']
  assert out.strip().splitlines()[-1].startswith(f'text:{tmp_path / "corpus"}: {folder} ')
  again = runs.command('research.data.pretokenize', *args)
  assert again.stdout.strip() == f'text:{tmp_path / "corpus"}: already tokenized in {folder}'
  bad = runs.in_process('research.data.pretokenize', '--config', 'configs/decoder.py:tiny',
                        '--writer=2', '--writers=2')
  assert bad.returncode == 2
  assert bad.stderr.strip() == 'error: --writer=2 must lie in [0, --writers=2).', bad.stderr
  none = runs.in_process('research.data.pretokenize', '--config', 'configs/decoder.py:tiny',
                         '--writers=0')
  assert none.stderr.strip() == 'error: --writers=0 must be at least 1.', none.stderr


def test_a_token_budget_sets_the_number_of_steps(decoder_config):
  from research import config as config_lib
  config = decoder_config('tiny')
  config.train.num_tokens = 10 ** 6
  config_lib.validate(config, 8)
  tokens_per_step = config.train.batch_size * config.train.seq_len
  assert config.train.num_steps == -(-10 ** 6 // tokens_per_step)


_PREPARE = '''
import sys, time
import ml_collections
from absl import logging
from research.data import pretokenize, tokenizer
logging.set_verbosity(logging.INFO)
data = ml_collections.ConfigDict(dict(data_dir=sys.argv[2], tokens_dir='', tokenized_dir='',
                                      mixture='', text_field='text',
                                      validation_percent=5))
while time.time() < float(sys.argv[3]):  # Both processes start preparing at the same moment.
  time.sleep(0.001)
folder, manifest = pretokenize.ensure('text:' + sys.argv[1], data, tokenizer.ByteTokenizer())
print(manifest['splits']['train']['tokens'], manifest['splits']['validation']['tokens'])
'''


@pytest.mark.slow
def test_concurrent_preparations_of_one_dataset_write_each_shard_once(tmp_path):
  _write_corpus(tmp_path / 'corpus', count=60)
  start = time.time() + 8  # Past both interpreters' start-up.
  processes = [subprocess.Popen([sys.executable, '-c', _PREPARE, str(tmp_path / 'corpus'),
                                 str(tmp_path / 'data'), str(start)], cwd=runs.REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (out, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  sizes = [out.strip().splitlines()[-1] for out, _ in outputs]
  assert sizes[0] == sizes[1]
  written = sum(err.count('Tokenized ') for _, err in outputs)
  shard_files = [f for f in os.listdir(next((tmp_path / 'data' / 'tokens').iterdir()))
                 if f.endswith('.array_record')]
  assert written == len(shard_files) >= 2  # Each shard written by exactly one process.


def _train_cli(*args):
  return subprocess.run([sys.executable, '-m', 'research.train', '--config',
                         'configs/decoder.py:tiny', *args], cwd=runs.REPO, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_binary_files_and_empty_sources_are_one_sentence(tmp_path):
  corpus = tmp_path / 'corpus'
  _write_corpus(corpus, count=3)
  (corpus / 'image.png').write_bytes(np.random.default_rng(0).bytes(20000))
  line = runs.error_line(_train_cli('--workdir', str(tmp_path / 'run'),
                                    '--config.data.source=text', f'--config.data.paths={corpus}',
                                    f'--config.data.data_dir={tmp_path / "tfds"}'))
  assert 'bytes of train-00000-of-00001.array_record of text:' in line, line
  assert 'are not valid UTF-8 (the most in ' in line, line
  assert f'{corpus / "image.png"}' in line and line.endswith(
      'convert those files to UTF-8 or remove them from the source.'), line
  empty = tmp_path / 'empty'
  empty.mkdir()
  for i in range(4):
    (empty / f'{i}.txt').write_text('')
  line = runs.error_line(_train_cli('--workdir', str(tmp_path / 'run'),
                                    '--config.data.source=text', f'--config.data.paths={empty}',
                                    f'--config.data.data_dir={tmp_path / "empty_data"}'))
  assert line == (f'error: The train split of data source text:{empty} is empty; add data or '
                  'change data.validation_percent (or the TFDS split).'), line
  assert not (tmp_path / 'run').exists()  # A failed start leaves no workdir behind...
  assert not (tmp_path / 'empty_data').exists()  # ...and tokenizes nothing for an empty source.
  assert not list((tmp_path / 'tfds').rglob(shards.MANIFEST))  # Nor completes a refused one.


def test_resuming_with_another_tokenizer_is_one_sentence(tmp_path):
  from research import train
  import ml_collections
  saved = tmp_path / 'run' / tokenizer_lib.SAVED_DIR
  tokenizer_lib.save(BYTES, str(saved))
  config = ml_collections.ConfigDict(dict(data=dict(source='text', tokenizer='bytes',
                                                    extra_ids=0)))
  train._check_tokenizer(str(tmp_path / 'run'), config)  # The same one: accepted.
  config.data.extra_ids = 100  # The same tokenizer with T5's sentinels is another one.
  with pytest.raises(pipeline_lib.DataError, match=r'^.*run was trained with the tokenizer bytes '
                     r'and 0 sentinel ids, and this run would add 100; resume with '
                     r'--config.data.extra_ids=0, or start a new --workdir\.$'):
    train._check_tokenizer(str(tmp_path / 'run'), config)
  config.data.extra_ids = 0
  config.data.source = 'markov'
  with pytest.raises(pipeline_lib.DataError, match=r'^.*run was trained with the tokenizer bytes '
                     r'and this run would use synthetic tokens \(data.source=markov\); resume '
                     r'with --config.data.tokenizer=bytes, or start a new --workdir\.$'):
    train._check_tokenizer(str(tmp_path / 'run'), config)
  for path in saved.iterdir():  # A damaged copy (an interrupted save) is one sentence too.
    if path.name != 'tokenizer_record.json':
      path.write_text('{')
  (saved / 'tokenizer_record.json').write_text('{')
  with pytest.raises(pipeline_lib.DataError, match=r'^The saved tokenizer in .* is damaged \(.*\); '
                     r'restore the folder from a copy, or delete it to use data.tokenizer again'):
    train._check_tokenizer(str(tmp_path / 'run'), config)
