"""Text data: TFDS array_record without TensorFlow, byte tokens, packing, host-independent batches."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.data import local_text
from research.data import packed_rows
from research.data import pipeline as pipeline_lib
from research.data import tokenizer as tokenizer_lib
from research.models import decoder
from research.objectives import causal_lm


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


def _read_split(builder, split):
  source = builder.as_data_source(split=split)
  return {source[i]['path'].decode(): source[i]['text'].decode() for i in range(len(source))}


@pytest.mark.parametrize('spec', ['directory', 'glob', 'files'])
def test_tfds_builder_writes_array_record_and_reads_back_without_tensorflow(tmp_path, spec):
  assert importlib.util.find_spec('tensorflow') is None  # The test environment has no TensorFlow.
  texts = _write_corpus(tmp_path / 'corpus')
  root = tmp_path / 'corpus'
  specs = {'directory': [str(root)], 'glob': [str(root / 'part*' / '*.txt')],
           'files': [str(root / name) for name in texts]}[spec]
  files = local_text.resolve_files(specs)
  builder = local_text.prepare(files, str(tmp_path / 'tfds'), 25, 'text',
                               local_text.fingerprint(files))
  written = [f for f in os.listdir(builder.data_dir) if 'array_record' in f]
  assert {f.split('.array_record')[0].split('-')[-1] for f in written} == {'train', 'validation'}
  train, validation = _read_split(builder, 'train'), _read_split(builder, 'validation')
  assert not set(train) & set(validation) and validation
  relative = {name if spec != 'files' else name.split('/')[-1]: text for name, text in texts.items()}
  assert {**train, **validation} == relative
  for name in validation:  # The split is a function of the path alone.
    assert local_text.is_validation(name, 25)


def test_single_file_is_split_by_lines(tmp_path):
  path = tmp_path / 'one.txt'
  path.write_text(''.join(f'{i}\n' for i in range(100)))
  files = local_text.resolve_files([str(path)])
  builder = local_text.prepare(files, str(tmp_path / 'tfds'), 10, 'text',
                               local_text.fingerprint(files))
  assert _read_split(builder, 'validation') == {'one.txt': ''.join(f'{i}\n' for i in range(90, 100))}
  assert _read_split(builder, 'train') == {'one.txt': ''.join(f'{i}\n' for i in range(90))}


def test_missing_text_source_is_one_sentence(tmp_path):
  with pytest.raises(local_text.DataError, match=r'^Text source .* matches no file; fix data.paths'):
    local_text.resolve_files([str(tmp_path / 'nothing*.txt')])


def test_byte_tokenizer_round_trips_utf8():
  tokenizer = tokenizer_lib.ByteTokenizer()
  ids = tokenizer.encode('déf x():\n')
  assert ids.min() >= 3 and tokenizer.vocab_size == 259
  assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == 'déf x():\n'


def _rows(seed=0, shuffle=True, seq_len=16):
  lengths = [3, 40, 17, 1, 16, 33, 8, 2]
  rng = np.random.default_rng(7)
  docs = [rng.integers(3, 259, n) for n in lengths]
  tokens = np.concatenate(docs)
  bounds = np.concatenate([[0], np.cumsum(lengths)])
  return packed_rows.PackedRows(tokens, bounds, seq_len, seed, shuffle, pad_id=0), docs


def test_packing_covers_every_target_once_with_right_segments_and_positions():
  rows, docs = _rows()
  count = rows.rows_per_epoch(0)
  epoch = rows.rows(0, count)
  # Every token but a document's first is a target exactly once per epoch.
  expected = sorted(np.concatenate([d[1:] for d in docs]).tolist())
  assert sorted(epoch['targets'][epoch['weights'] > 0].tolist()) == expected
  for r in range(count):
    segments = epoch['segment_ids'][r]
    real = segments > 0
    assert np.all(epoch['weights'][r] == real)
    assert np.all(np.diff(segments[real]) >= 0) and np.all(segments[~real] == 0)
    for s in np.unique(segments[real]):
      span = np.flatnonzero(segments == s)
      np.testing.assert_array_equal(epoch['positions'][r, span], np.arange(len(span)))
      # Within a segment, each target is the next input.
      np.testing.assert_array_equal(epoch['tokens'][r, span[1:]], epoch['targets'][r, span[:-1]])
  # Epochs differ in order but not in content; rows are pure functions of the index.
  second = rows.rows(count, count + rows.rows_per_epoch(1))
  assert sorted(second['targets'][second['weights'] > 0].tolist()) == expected
  np.testing.assert_array_equal(_rows()[0].rows(3, count)['tokens'], epoch['tokens'][3:])


def test_packed_rows_give_the_per_document_losses_of_separate_documents(decoder_config):
  config = decoder_config('tiny')
  model = decoder.build(config.model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']
  rows, _ = _rows(seq_len=32)
  batch = rows.rows(0, rows.rows_per_epoch(0))
  row = int(np.argmax(batch['segment_ids'].max(axis=1)))  # The row with most documents.
  assert batch['segment_ids'][row].max() >= 2
  take = lambda x: jnp.asarray(x[row:row + 1])
  logits = model.apply({'params': params}, take(batch['tokens']), take(batch['positions']),
                       take(batch['segment_ids']))
  packed = causal_lm.token_losses(logits, take(batch['targets']))[0]
  for s in range(1, batch['segment_ids'][row].max() + 1):
    span = np.flatnonzero(batch['segment_ids'][row] == s)
    alone = model.apply({'params': params}, jnp.asarray(batch['tokens'][row, span][None]))
    separate = causal_lm.token_losses(alone, jnp.asarray(batch['targets'][row, span][None]))[0]
    np.testing.assert_allclose(packed[span], separate, atol=1e-5)


def test_global_batches_do_not_depend_on_the_number_of_hosts(decoder_config, tmp_path):
  _write_corpus(tmp_path / 'corpus', count=30)
  config = decoder_config('tiny')
  config.data.source, config.data.paths = 'text', str(tmp_path / 'corpus')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.train.batch_size, config.train.seq_len = 8, 32
  data = pipeline_lib.build(config)
  for step in range(6):
    whole = data.train_batch(step)
    for hosts in (2, 4):
      share = config.train.batch_size // hosts
      parts = [data.train_batch(step, host * share, (host + 1) * share) for host in range(hosts)]
      for name, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), value)
  # A fresh pipeline (a restarted job) produces the same batches.
  again = pipeline_lib.build(config)
  for name, value in data.train_batch(5).items():
    np.testing.assert_array_equal(again.train_batch(5)[name], value)
  assert data.record['fingerprint'] == again.record['fingerprint']
