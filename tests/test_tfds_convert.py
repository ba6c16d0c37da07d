"""research.data.tfds_convert: a TFDS dataset in TFRecord files becomes array_record files that
`as_data_source` reads (same examples, same order), in place or into another data dir, without
TensorFlow; damaged or missing inputs stop with one sentence (exit 2)."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
import tfds_fixtures
from research.data import tfds_convert


def _convert(*args):
  return runs.in_process('research.data.tfds_convert', *map(str, args))


SPLITS = {'train': [f'train text {i} ' + 'é' * (i % 5) for i in range(30)],
          'validation': [f'validation text {i}' for i in range(6)]}


def _texts(directory, split):
  source = tfds.builder_from_directory(os.fspath(directory)).as_data_source(split)
  return [example['text'].decode() for example in source]


def _info(directory):
  return json.loads((directory / 'dataset_info.json').read_text())


def _offsets(path):
  """[(offset, data length)] of the records of a TFRecord file."""
  data, offsets, at = path.read_bytes(), [], 0
  while at < len(data):
    length = struct.unpack_from('<Q', data, at)[0]
    offsets.append((at, length))
    at += 16 + length
  return offsets


def _flip(path, at):
  data = bytearray(path.read_bytes())
  data[at] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.fixture
def source(tmp_path):
  """lm_text/en:1.0.0 as TFRecord files, three shards per split."""
  return tfds_fixtures.write_text_dataset(tmp_path / 'data', splits=SPLITS, num_shards=3,
                                          file_format='tfrecord')


def test_crc32c_matches_the_bytewise_reference():
  rng = np.random.default_rng(0)
  records = [b'123456789'] + [rng.integers(0, 256, n, dtype=np.uint8).tobytes()
                              for n in [*range(20), 255, 1000, 4097]]
  assert tfds_fixtures.crc32c(b'123456789') == 0xE3069283  # The published check value.
  assert list(tfds_convert.crc32c(records)) == [tfds_fixtures.crc32c(r) for r in records]
  assert len(tfds_convert.crc32c([])) == 0


def test_reads_a_file_that_tensorflow_wrote(tmp_path):
  """grain ships a TFRecord file written by TensorFlow: our reader checks its CRCs, and the
  fixture's writer reproduces it byte for byte."""
  import grain
  path = os.path.join(os.path.dirname(grain.__file__), '_src', 'python', 'testdata',
                      'morris_sequence_first_5.tfrecord')
  # requirements.txt pins a grain that ships it; a release without it must fail here, not skip.
  assert os.path.isfile(path), f'{path} is gone: ship a TensorFlow-written TFRecord file instead'
  records = [r for batch in tfds_convert.read_tfrecord(path) for r in batch]
  assert records == [b'1', b'1 1', b'2 1', b'1 2 1 1', b'1 1 1 2 2 1']
  tfds_fixtures.write_tfrecord(tmp_path / 'copy', records)
  assert (tmp_path / 'copy').read_bytes() == open(path, 'rb').read()


def test_in_place_keeps_examples_and_order(source):
  result = runs.ok(_convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en:1.0.0',
                            '--workers=1'))
  assert 'wrote' in result.stdout and '6 array_record shards, 36 records' in result.stdout
  for split, texts in SPLITS.items():
    assert _texts(source, split) == texts
  info = _info(source)
  assert info['fileFormat'] == 'array_record' and info['alternativeFileFormats'] == ['tfrecord']
  assert len(tfds_fixtures.record_files(source, 'tfrecord')) == 6  # Kept.
  assert [p.name for p in tfds_fixtures.record_files(source, 'array_record')] == [
      p.name.replace('.tfrecord-', '.array_record-')
      for p in tfds_fixtures.record_files(source, 'tfrecord')]
  again = runs.ok(_convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en'))
  assert 'already in array_record format' in again.stdout
  # Later, the tfrecord copies go too, and dataset_info.json stops listing them.
  runs.ok(_convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en',
                   '--delete_tfrecord'))
  assert not tfds_fixtures.record_files(source, 'tfrecord')
  assert 'alternativeFileFormats' not in _info(source)
  assert _texts(source, 'train') == SPLITS['train']


def test_out_dir_takes_the_newest_version_in_parallel(tmp_path, source):
  newer = {'train': ['newer one', 'newer two', 'newer three'], 'validation': ['v']}
  tfds_fixtures.write_text_dataset(tmp_path / 'data', version='1.1.0', splits=newer,
                                   num_shards=1, file_format='tfrecord')
  out = tmp_path / 'out'
  result = runs.ok(_convert('--data_dir', tmp_path / 'data', '--dataset', 'lm_text/en',
                            '--out_dir', out, '--workers=2'))
  converted = out / 'lm_text' / 'en' / '1.1.0'
  assert f'data_dir={out}' in result.stdout
  assert _texts(converted, 'train') == newer['train']
  assert _texts(converted, 'validation') == newer['validation']
  assert sorted(p.name for p in converted.iterdir()) == [
      'dataset_info.json', 'features.json', 'lm_text-train.array_record-00000-of-00001',
      'lm_text-validation.array_record-00000-of-00001']
  assert 'alternativeFileFormats' not in _info(converted)
  assert _info(source)['fileFormat'] == 'tfrecord'  # The source is left as it was.
  assert 'already holds' in runs.ok(_convert('--data_dir', tmp_path / 'data', '--dataset',
                                             'lm_text/en', '--out_dir', out)).stdout
  runs.ok(_convert('--data_dir', tmp_path / 'data', '--dataset', 'lm_text/en:1.0.0',
                   '--out_dir', out, '--workers=3'))
  assert _texts(out / 'lm_text' / 'en' / '1.0.0', 'train') == SPLITS['train']


def test_dataset_without_config(tmp_path):
  tfds_fixtures.write_text_dataset(tmp_path, name='plain', config=None, version='2.0.0',
                                   splits=SPLITS, file_format='tfrecord', text_feature='text')
  runs.ok(_convert('--data_dir', tmp_path, '--dataset', 'plain:2.0.0', '--workers=1'))
  assert _texts(tmp_path / 'plain' / '2.0.0', 'validation') == SPLITS['validation']


@pytest.mark.parametrize('where, fragment', [
    ('data', 'its CRC32C checksum does not match'),
    ('length', 'its CRC32C checksum does not match'),
    ('length_past_end', 'its CRC32C checksum does not match'),
    ('truncated', 'the file ends inside it')])
def test_a_damaged_record_is_named_and_the_rest_resumes(source, where, fragment):
  shard = tfds_fixtures.record_files(source, 'tfrecord')[1]
  intact = shard.read_bytes()
  offset, length = _offsets(shard)[4]
  if where == 'data':
    _flip(shard, offset + 12 + length // 2)
  elif where == 'length':
    _flip(shard, offset)  # One byte off: the following bytes are read as garbage.
  elif where == 'length_past_end':
    _flip(shard, offset + 3)  # 16 MiB longer: past the end of the file.
  else:
    shard.write_bytes(intact[:offset + 12 + length // 2])
  result = _convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en', '--workers=1')
  runs.assert_error(result, f'{shard} is corrupt at record 4 (byte {offset}): {fragment}')
  assert _info(source)['fileFormat'] == 'tfrecord'
  written = tfds_fixtures.record_files(source, 'array_record')
  assert [p.name for p in written] == ['lm_text-train.array_record-00000-of-00003']
  assert not [p for p in os.listdir(source) if p.endswith('.incomplete')]
  first = written[0].stat().st_mtime_ns
  shard.write_bytes(intact)  # Repaired: the next run keeps the finished shard.
  runs.ok(_convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en', '--workers=1'))
  assert written[0].stat().st_mtime_ns == first
  assert _texts(source, 'train') == SPLITS['train']


def test_corrupt_record_in_a_worker(source):
  shard = tfds_fixtures.record_files(source, 'tfrecord')[4]
  offset, length = _offsets(shard)[0]
  _flip(shard, offset + 12 + length - 1)
  result = _convert('--data_dir', source.parents[2], '--dataset', 'lm_text/en', '--out_dir',
                    source.parents[3] / 'out', '--workers=2')
  runs.assert_error(result, f'{shard} is corrupt at record 0 (byte {offset})')


def test_errors(tmp_path, source):
  data = source.parents[2]
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en:2.0.0'),
                    'No prepared TFDS dataset lm_text/en:2.0.0 under '
                    f'{data} (it holds lm_text/en/1.0.0); prepare it where TensorFlow is '
                    f'installed with `tfds build lm_text/en:2.0.0 --data_dir={data}`')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text'),
                    'it holds lm_text/en/1.0.0')
  runs.assert_error(_convert('--data_dir', tmp_path / 'elsewhere', '--dataset', 'c4/en'),
                    'No prepared TFDS dataset c4/en under')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en:v1'),
                    'is not NAME[/CONFIG][:VERSION]')
  runs.assert_error(_convert('--data_dir', data), 'Pass --data_dir DIR and --dataset')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--datset=x'),
                    'Unknown flag --datset; the flags are --data_dir')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--workers=x'),
                    'flag --workers=x: ')
  assert 'python -m research.data.tfds_convert' in runs.ok(_convert('--help')).stdout
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', 'extra'),
                    "Unexpected argument 'extra'")
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--out_dir',
                             tmp_path / 'out', '--delete_tfrecord'),
                    '--delete_tfrecord applies to conversions in place')
  taken = tmp_path / 'out' / 'lm_text' / 'en' / '1.0.0'
  taken.mkdir(parents=True)
  (taken / 'notes.txt').write_text('mine')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--out_dir',
                             tmp_path / 'out'), f'{taken} is not empty')
  assert os.listdir(taken) == ['notes.txt']
  (tmp_path / 'a_file').write_text('')
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--out_dir',
                             tmp_path / 'a_file'), 'Not a directory')
  info = _info(source)
  info['splits'][0]['shardLengths'][1] = '11'  # Stored as strings, like every int64.
  (source / 'dataset_info.json').write_text(json.dumps(info))
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en', '--workers=1'),
                    'lm_text-train.tfrecord-00001-of-00003 holds 10 records but '
                    'dataset_info.json lists 11 for it')
  (source / 'dataset_info.json').write_text(json.dumps(dict(info, fileFormat='parquet')))
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en'),
                    'is stored as parquet, not tfrecord')
  (source / 'dataset_info.json').write_text(json.dumps(dict(info, fileFormat='tfrecord')))
  tfds_fixtures.record_files(source, 'tfrecord')[2].unlink()
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en'),
                    'lm_text-train.tfrecord-00002-of-00003 is missing (1 of the 6')
  for path in tfds_fixtures.record_files(source, 'tfrecord'):
    path.unlink()
  runs.assert_error(_convert('--data_dir', data, '--dataset', 'lm_text/en'),
                    f'{source} holds no tfrecord files')
  # Only the shard before the miscounted one was finished; nothing half-written is left.
  assert sorted(os.listdir(source)) == ['dataset_info.json', 'features.json',
                                        'lm_text-train.array_record-00000-of-00003']


def test_fixture_writes_what_tfds_reads(tmp_path):
  directory = tfds_fixtures.write_text_dataset(tmp_path, name='other_text', config='de',
                                               version='3.0.0', text_feature='body')
  assert directory == tmp_path / 'other_text' / 'de' / '3.0.0'
  builder = tfds.builder_from_directory(os.fspath(directory))
  assert list(builder.info.features) == ['body']
  assert [x['body'].decode() for x in builder.as_data_source('validation')] == (
      tfds_fixtures.DEFAULT_SPLITS['validation'])
  shutil.rmtree(directory)
