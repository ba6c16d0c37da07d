"""Text data: TFDS array_record without TensorFlow, byte tokens, packing, host-independent batches."""

import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
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
                               local_text.scan(files)[0])
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
                               local_text.scan(files)[0])
  assert _read_split(builder, 'validation') == {'one.txt': ''.join(f'{i}\n' for i in range(90, 100))}
  assert _read_split(builder, 'train') == {'one.txt': ''.join(f'{i}\n' for i in range(90))}


def test_missing_text_source_is_one_sentence(tmp_path):
  with pytest.raises(local_text.DataError, match=r'^Text source .* matches no file; fix data.paths'):
    local_text.resolve_files([str(tmp_path / 'nothing*.txt')])


def test_byte_tokenizer_round_trips_utf8():
  tokenizer = tokenizer_lib.ByteTokenizer()
  ids = tokenizer.encode('déf x():\n')
  assert ids.min() >= 3 and tokenizer.vocab_size == 262
  assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == 'déf x():\n'


def _rows(seed=0, shuffle=True, seq_len=16):
  lengths = [3, 40, 17, 1, 16, 33, 8, 2]
  rng = np.random.default_rng(7)
  docs = [rng.integers(3, 259, n) for n in lengths]
  tokens = np.concatenate(docs)
  bounds = np.concatenate([[0], np.cumsum(lengths)])
  return packed_rows.PackedRows(tokens, bounds, seq_len, seed, shuffle, causal_lm.Transform()), docs


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
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), method='initialize')['params']
  rows, _ = _rows(seq_len=32)
  batch = rows.rows(0, rows.rows_per_epoch(0))
  row = int(np.argmax(batch['segment_ids'].max(axis=1)))  # The row with most documents.
  assert batch['segment_ids'][row].max() >= 2
  take = lambda x: jnp.asarray(x[row:row + 1])
  logits = model.apply({'params': params}, take(batch['tokens']), take(batch['positions']),
                       take(batch['segment_ids']), method='language_model')
  packed = causal_lm.token_losses(logits, take(batch['targets']))[0]
  for s in range(1, batch['segment_ids'][row].max() + 1):
    span = np.flatnonzero(batch['segment_ids'][row] == s)
    alone = model.apply({'params': params}, jnp.asarray(batch['tokens'][row, span][None]),
                        method='language_model')
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


_PREPARE = '''
import sys, time
from research.data import local_text
files = local_text.resolve_files([sys.argv[1]])
while time.time() < float(sys.argv[3]):  # Both processes start preparing at the same moment.
  time.sleep(0.001)
builder = local_text.prepare(files, sys.argv[2], 5, 'text', local_text.scan(files)[0])
print(len(builder.as_data_source('train')), len(builder.as_data_source('validation')))
'''


@pytest.mark.slow
def test_concurrent_preparations_of_one_dataset_write_it_once(tmp_path):
  _write_corpus(tmp_path / 'corpus', count=60)
  start = time.time() + 8  # Past both interpreters' start-up.
  processes = [subprocess.Popen([sys.executable, '-c', _PREPARE, str(tmp_path / 'corpus'),
                                 str(tmp_path / 'tfds'), str(start)], cwd=runs.REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for process, (out, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  sizes = [out.strip().splitlines()[-1] for out, _ in outputs]
  assert sizes[0] == sizes[1] and sum(map(int, sizes[0].split())) == 60
  assert sum(out.count('Downloading and preparing') for out, _ in outputs) == 1  # Written once.


def _text_config(decoder_config, corpus, data_dir):
  config = decoder_config('tiny')
  config.data.source, config.data.paths, config.data.data_dir = 'text', str(corpus), str(data_dir)
  return config


def test_invalid_utf8_is_counted_and_replaced(decoder_config, tmp_path, caplog):
  corpus = tmp_path / 'corpus'
  _write_corpus(corpus, count=12)
  (corpus / 'latin1.txt').write_bytes('café au lait\n'.encode('latin-1') * 3)  # 3 bad bytes.
  with caplog.at_level('WARNING'):
    data = pipeline_lib.build(_text_config(decoder_config, corpus, tmp_path / 'tfds'))
  assert ('3 bytes in 1 files of the text source are not valid UTF-8 and are replaced by U+FFFD '
          f'(most in {corpus / "latin1.txt"})') in caplog.text
  assert data.record['files'] == 13


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
  assert 'bytes in data.paths are not valid UTF-8 (the most in ' in line, line
  assert f'{corpus / "image.png"}' in line and line.endswith(
      'convert those files to UTF-8 or remove them from data.paths.'), line
  empty = tmp_path / 'empty'
  empty.mkdir()
  for i in range(4):
    (empty / f'{i}.txt').write_text('')
  line = runs.error_line(_train_cli('--workdir', str(tmp_path / 'run'),
                                    '--config.data.source=text', f'--config.data.paths={empty}',
                                    f'--config.data.data_dir={tmp_path / "tfds"}'))
  assert line == ('error: The 4 files of data.paths are all empty; point data.paths at files '
                  'with text.'), line
  assert not (tmp_path / 'run').exists()  # A failed start leaves no workdir behind...
  assert not (tmp_path / 'tfds').exists()  # ...and prepares no dataset for a refused source.
