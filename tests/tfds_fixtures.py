"""Small real TFDS datasets on disk, written without TensorFlow, in the layout `tfds build` leaves
(DATA_DIR/NAME/CONFIG/VERSION with dataset_info.json, features.json and sharded record files).

    write_text_dataset(tmp_path / 'tfds', splits={'train': [...], 'validation': [...]})

TFDS without TensorFlow writes only array_record; the 'tfrecord' variant is that dataset with
each shard rewritten in TFRecord framing (the same serialized tf.train.Example per record, as
TFDS's TFRecord writer stores them) and dataset_info.json saying fileFormat 'tfrecord'.
"""

import json
import os
import pathlib
import struct
import types

import tensorflow_datasets as tfds
from array_record.python import array_record_module

DEFAULT_SPLITS = {'train': [f'train document {i}: ' + 'words ' * (i % 7) for i in range(40)],
                  'validation': [f'validation document {i}' for i in range(8)]}


def _builder_class(name, config, version, text_feature):
  """A GeneratorBasedBuilder named `name` (unregistered, so any name may be used again)."""
  def body(ns):
    ns.update(name=name, VERSION=tfds.core.Version(version), __module__=__name__,
              BUILDER_CONFIGS=[tfds.core.BuilderConfig(name=config)] if config else [])

    def _info(self):  # Unshuffled: the records keep the order of the given texts.
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
          tfds.features.FeaturesDict({text_feature: tfds.features.Text()})))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(texts) for split, texts in self.texts.items()}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {text_feature: text}
    ns.update(_info=_info, _split_generators=_split_generators,
              _generate_examples=_generate_examples)
  return types.new_class('TextDataset', (tfds.core.GeneratorBasedBuilder,),
                         dict(skip_registration=True), body)


def write_text_dataset(data_dir, name='lm_text', config='en', version='1.0.0', splits=None,
                       file_format='array_record', text_feature='text', num_shards=None):
  """Prepares dataset NAME[/CONFIG]:VERSION with one Text feature under data_dir; returns its
  directory (data_dir/NAME[/CONFIG]/VERSION). `num_shards` (each split needs as many texts) sets
  the shards per split; by default TFDS chooses (one, for small splits)."""
  assert file_format in ('array_record', 'tfrecord'), file_format
  builder = _builder_class(name, config, version, text_feature)(
      data_dir=os.fspath(data_dir), config=config, file_format='array_record')
  builder.texts = DEFAULT_SPLITS if splits is None else splits
  tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
  directory = pathlib.Path(builder.data_dir)
  if file_format == 'tfrecord':
    to_tfrecord(directory)
  return directory


def record_files(directory, file_format):
  """The shard files of one format in a dataset directory, sorted."""
  return sorted(p for p in pathlib.Path(directory).iterdir() if f'.{file_format}-' in p.name)


def to_tfrecord(directory):
  """Rewrites an array_record dataset directory as TFDS's TFRecord variant, in place."""
  for path in record_files(directory, 'array_record'):
    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    records = reader.read_all()
    reader.close()
    write_tfrecord(path.with_name(path.name.replace('.array_record-', '.tfrecord-')), records)
    path.unlink()
  info_path = pathlib.Path(directory) / 'dataset_info.json'
  info = json.loads(info_path.read_text())
  info['fileFormat'] = 'tfrecord'
  info_path.write_text(json.dumps(info, indent=2))


def write_tfrecord(path, records):
  """TFRecord framing: uint64 length, masked CRC32C of it, the data, masked CRC32C of the data."""
  with open(path, 'wb') as f:
    for data in records:
      length = struct.pack('<Q', len(data))
      f.write(length + struct.pack('<I', masked_crc32c(length)) + data +
              struct.pack('<I', masked_crc32c(data)))


def _crc_table():
  table = []
  for n in range(256):
    for _ in range(8):
      n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
    table.append(n)
  return table


_TABLE = _crc_table()


def crc32c(data):
  """Bytewise CRC32C (Castagnoli), a plain reference for the vectorized one under test."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
