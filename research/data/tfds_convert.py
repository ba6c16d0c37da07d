"""Converts a TFDS dataset prepared as TFRecord files (what `tfds build` writes where TensorFlow is
installed) into array_record files, which this project reads without TensorFlow.

  python -m research.data.tfds_convert --data_dir DIR --dataset c4/en[:3.1.0] [--out_dir OUT]
      [--delete_tfrecord] [--workers N]

Both formats hold the same serialized tf.train.Example per record, so each shard
`NAME-SPLIT.tfrecord-XXXXX-of-YYYYY` is copied record by record, in order, into
`NAME-SPLIT.array_record-XXXXX-of-YYYYY` and dataset_info.json then names array_record as the file
format; neither step needs TensorFlow. Every record's CRC32C checksums are verified on the way.
Without a version the newest prepared one is converted. In place (the default) the tfrecord
files stay, listed as an alternative format, unless --delete_tfrecord; --out_dir is another data
dir (the dataset lands in OUT/NAME/CONFIG/VERSION, metadata files copied). Shards are written
under a temporary name and renamed when complete, so an interrupted run resumes where it stopped.
"""

import concurrent.futures
import glob
import json
import multiprocessing
import os
import re
import shutil
import struct
import sys

import numpy as np
from absl import flags
from array_record.python import array_record_module

from research.data import sources

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir holding the dataset.')
_DATASET = flags.DEFINE_string('dataset', None, 'NAME[/CONFIG][:VERSION], e.g. c4/en:3.1.0 '
                               '(without a version: the newest prepared one).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Another data dir to write the converted dataset '
                               'to (default: next to the tfrecord files).')
_DELETE = flags.DEFINE_boolean('delete_tfrecord', False, 'In place: delete the tfrecord files '
                               'once the array_record files are complete.')
_WORKERS = flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Shards converted in parallel.')
_FLAGS = ('data_dir', 'dataset', 'out_dir', 'delete_tfrecord', 'workers')

# Written by TFDS's own array_record writer too: one record per chunk, for fast random access.
_WRITER_OPTIONS = 'group_size:1'
_BATCH_BYTES = 64 << 20  # Records checked (vectorized) and written per step.


class ConvertError(ValueError):
  """A problem with the inputs, described in one sentence that says what to do."""


# CRC32C (Castagnoli), the checksum of TFRecord framing. No implementation ships with our
# dependencies, so it is computed with numpy for all records of a batch at once, a 32-bit word per
# step through two 16-bit tables (slicing-by-4 folded in pairs): about 100 MB/s per process.
def _crc_tables():
  base = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    base = np.where(base & 1, (base >> 1) ^ np.uint32(0x82F63B78), base >> 1).astype(np.uint32)
  t = [base]  # t[i][b]: byte b followed by i zero bytes.
  for _ in range(3):
    t.append((t[-1] >> 8) ^ base[t[-1] & 0xFF])
  v = np.arange(1 << 16, dtype=np.uint32)
  low, high = t[3][v & 0xFF] ^ t[2][v >> 8], t[1][v & 0xFF] ^ t[0][v >> 8]
  # Records are padded at the front to whole words; a zero byte is an invertible step of the
  # register, so starting p bytes early from starts[p] reaches the standard start 0xFFFFFFFF.
  byte_of_top = {int(x) >> 24: i for i, x in enumerate(base)}
  starts = [0xFFFFFFFF]
  for _ in range(3):
    i = byte_of_top[starts[-1] >> 24]
    starts.append((((starts[-1] ^ int(base[i])) << 8) & 0xFFFFFFFF) | i)
  return low, high, np.array(starts, np.uint32)


_LOW, _HIGH, _STARTS = _crc_tables()


def crc32c(records):
  """The CRC32C of each bytes object in `records`, as a uint32 array."""
  lengths = np.fromiter(map(len, records), np.int64, len(records))
  pads = -lengths % 4
  # Longest first: the records still running at word w are then a prefix of the batch.
  order = np.argsort(-(lengths + pads), kind='stable')
  words_each = (lengths + pads)[order] // 4
  words = np.frombuffer(b''.join(bytes(int(pads[i])) + records[i] for i in order), '<u4')
  offsets = np.cumsum(words_each) - words_each
  crc = _STARTS[pads[order]]
  running = np.searchsorted(-words_each, -np.arange(words_each[0] if len(records) else 0))
  for w, k in enumerate(running.tolist()):
    x = crc[:k] ^ words[offsets[:k] + w]
    crc[:k] = _LOW[x & 0xFFFF] ^ _HIGH[x >> 16]
  out = np.empty(len(records), np.uint32)
  out[order] = crc ^ np.uint32(0xFFFFFFFF)
  return out


def _masked(crc):
  return ((crc >> 15) | (crc << 17)) + np.uint32(0xA282EAD8)


def _corrupt(path, index, offset, why):
  return ConvertError(f'{path} is corrupt at record {index} (byte {offset}): {why}; rebuild the '
                      'dataset with `tfds build` or copy that file again.')


def read_tfrecord(path):
  """Yields the records of a TFRecord file in lists of about _BATCH_BYTES, each list verified.

  Framing per record: uint64 length, uint32 masked CRC32C of the length bytes, the data, uint32
  masked CRC32C of the data. A damaged length can send parsing astray, so a batch is checked
  before it is yielded and the first record that fails names the damage.
  """
  size = os.path.getsize(path)
  index = 0
  with open(path, 'rb') as f:
    while f.tell() < size:
      offsets, heads, head_crcs, records, crcs, cut = [], [], [], [], [], False
      batch_bytes = 0
      while f.tell() < size and batch_bytes < _BATCH_BYTES:
        offsets.append(f.tell())
        head = f.read(12)
        if len(head) < 12:
          cut = True
          break
        length, head_crc = struct.unpack('<QI', head)
        heads.append(head[:8])
        head_crcs.append(head_crc)
        if length + 4 > size - f.tell():
          cut = True  # Truncated, or a damaged length: the length's checksum tells which.
          break
        records.append(f.read(length))
        crcs.append(struct.unpack('<I', f.read(4))[0])
        batch_bytes += length
      bad = _masked(crc32c(heads)) != np.array(head_crcs, np.uint32)
      bad[:len(records)] |= _masked(crc32c(records)) != np.array(crcs, np.uint32)
      if bad.any():
        first = int(np.argmax(bad))
        raise _corrupt(path, index + first, offsets[first], 'its CRC32C checksum does not match')
      if cut:
        raise _corrupt(path, index + len(records), offsets[-1], 'the file ends inside it')
      index += len(records)
      yield records


def convert_shard(source, target, expected):
  """Copies the records of TFRecord file `source` into array_record file `target`; returns their
  count. A complete `target` (from an interrupted earlier run) is kept."""
  if os.path.exists(target):
    reader = array_record_module.ArrayRecordReader(target)
    complete = reader.ok() and reader.num_records() == expected  # Else it is written again.
    reader.close()
    if complete:
      return expected
  temporary = os.path.join(os.path.dirname(target), f'.{os.path.basename(target)}.incomplete')
  writer = array_record_module.ArrayRecordWriter(temporary, _WRITER_OPTIONS)
  count = 0
  try:
    try:
      for records in read_tfrecord(source):
        for record in records:
          writer.write(record)
        count += len(records)
    finally:
      writer.close()
    if count != expected:
      raise ConvertError(f'{source} holds {count} records but dataset_info.json lists {expected} '
                         'for it; the dataset is incomplete, so rebuild it with `tfds build`.')
  except BaseException as error:
    if os.path.exists(temporary):
      os.remove(temporary)
    if isinstance(error, RuntimeError):  # The writer's: an unwritable folder, a full disk.
      reason = str(error).splitlines()[0].rstrip('.')
      raise ConvertError(f'Could not write {target} ({reason}); make its folder writable or free '
                         'disk space.') from None
    raise
  os.replace(temporary, target)
  return count


def find_dataset(data_dir, spec):
  """(dataset directory, NAME[/CONFIG]) for --dataset `spec` under data_dir."""
  match = re.fullmatch(r'([\w-]+(?:/[\w.-]+)?)(?::(\d+\.\d+\.\d+))?', spec)
  if not match:
    raise ConvertError(f'--dataset {spec} is not NAME[/CONFIG][:VERSION]; pass e.g. --dataset '
                       'c4/en:3.1.0.')
  name = match.group(1)
  top = os.path.expanduser(data_dir)
  root = os.path.join(top, name)
  directory = sources.tfds_directory(data_dir, spec)  # The reader's own lookup.
  if directory is None:
    # What is there (other versions, or configs when none was given) says what to pass instead.
    found = sorted(os.path.relpath(os.path.dirname(p), top) for p in
                   glob.glob(os.path.join(glob.escape(root), '**', 'dataset_info.json'),
                             recursive=True))
    listed = ', '.join(found[:8]) + (', ...' if len(found) > 8 else '')
    there = f' (it holds {listed})' if found else ''
    raise ConvertError(f'No prepared TFDS dataset {spec} under {data_dir}{there}; prepare it '
                       f'where TensorFlow is installed with `tfds build {spec} --data_dir='
                       f'{data_dir}`, or pass the --data_dir that holds it.')
  return directory, name


def _shards(info, out_dir):
  """[(tfrecord path, array_record path, records)] of every split, by dataset_info.json."""
  from etils import epath
  shards = []
  for split in info.splits.values():
    template = split.filename_template.replace(filetype_suffix='tfrecord')
    target = template.replace(data_dir=epath.Path(out_dir), filetype_suffix='array_record')
    shards += zip(map(os.fspath, template.sharded_filepaths(split.num_shards)),
                  map(os.fspath, target.sharded_filepaths(split.num_shards)), split.shard_lengths)
  return shards


def _files(directory):
  """The relative paths of the files under `directory` (hidden ones aside)."""
  return {os.path.relpath(p, directory) for p in glob.glob(
      os.path.join(glob.escape(directory), '**', '*'), recursive=True) if os.path.isfile(p)}


def _check_out_dir(out_dir, metadata, shards):
  """Refuses a destination holding anything but a partial conversion of this same dataset."""
  ours = set(metadata)
  for _, target, _ in shards:
    name = os.path.relpath(target, out_dir)
    ours |= {name, os.path.join(os.path.dirname(name), f'.{os.path.basename(name)}.incomplete')}
  other = sorted(_files(out_dir) - ours) if os.path.isdir(out_dir) else []
  if other:
    raise ConvertError(f'{out_dir} is not empty (it holds {other[0]}); pass an --out_dir that '
                       'does not hold this dataset yet, or drop --out_dir to convert in place.')


def _convert_all(shards, workers):
  """Converts the shards, `workers` at a time; prints one line per shard."""
  def report(i, count):
    print(f'[{i + 1}/{len(shards)}] {os.path.basename(shards[i][1])}: {count} records',
          flush=True)
  workers = max(1, min(workers, len(shards)))
  if workers == 1:
    for i, shard in enumerate(shards):
      report(i, convert_shard(*shard))
    return
  # Fresh interpreters: forking a process that has loaded TFDS (and its threads) is unsafe.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    futures = [pool.submit(convert_shard, *shard) for shard in shards]
    try:
      for i, future in enumerate(futures):
        report(i, future.result())
    except BaseException:
      pool.shutdown(cancel_futures=True)
      raise


def _write_info(path, info_json, formats):
  """dataset_info.json with array_record as file format, `formats` as alternatives; atomic."""
  info_json = dict(info_json, fileFormat='array_record')
  info_json.pop('alternativeFileFormats', None)
  if formats:
    info_json['alternativeFileFormats'] = sorted(formats)
  with open(path + '.incomplete', 'w') as f:
    json.dump(info_json, f, indent=2)
  os.replace(path + '.incomplete', path)


def convert(data_dir, spec, out_dir=None, delete_tfrecord=False, workers=1):
  """Converts dataset `spec` under data_dir; returns a line saying what was done."""
  import tensorflow_datasets as tfds  # Imported on use: workers need only this module's code.
  source_dir, name = find_dataset(data_dir, spec)
  version = os.path.basename(source_dir)
  destination = source_dir
  if out_dir:
    if delete_tfrecord:
      raise ConvertError('--delete_tfrecord applies to conversions in place; drop it or '
                         '--out_dir.')
    destination = os.path.join(os.path.expanduser(out_dir), name, version)
    if os.path.realpath(destination) == os.path.realpath(source_dir):
      destination = source_dir  # --out_dir is --data_dir: in place.
  with open(os.path.join(source_dir, 'dataset_info.json')) as f:
    info_json = json.load(f)
  formats = {info_json.get('fileFormat') or 'tfrecord'}  # Unset in old TFDS: tfrecord.
  formats.update(info_json.get('alternativeFileFormats', ()))
  info = tfds.builder_from_directory(source_dir).info
  shards = _shards(info, destination)
  in_place = destination == source_dir
  if 'array_record' in formats:
    tfrecords = [s for s, _, _ in shards if os.path.exists(s)] if in_place else []
    if delete_tfrecord and tfrecords:
      for path in tfrecords:
        os.remove(path)
      _write_info(os.path.join(source_dir, 'dataset_info.json'), info_json,
                  formats - {'array_record', 'tfrecord'})
      return f'{source_dir} was already converted to array_record; deleted its tfrecord files'
    return (f'{source_dir} is already in array_record format (what this project reads); nothing '
            'to convert')
  if 'tfrecord' not in formats:
    raise ConvertError(f'{source_dir} is stored as {", ".join(sorted(formats))}, not tfrecord; '
                       'only tfrecord datasets are converted.')
  missing = [s for s, _, _ in shards if not os.path.isfile(s)]
  if len(missing) == len(shards):
    raise ConvertError(f'{source_dir} holds no tfrecord files (its dataset_info.json lists '
                       f'{len(shards)}); prepare the dataset again with `tfds build`, or copy '
                       'its files there.')
  if missing:
    raise ConvertError(f'{missing[0]} is missing ({len(missing)} of the {len(shards)} tfrecord '
                       'files are); copy the whole dataset directory again.')
  # Metadata: dataset_info.json, features.json, label files, ... (no record files).
  metadata = _files(source_dir) - {os.path.relpath(p, d) for s, t, _ in shards
                                   for p, d in ((s, source_dir), (t, destination))}
  if not in_place:
    if os.path.isfile(os.path.join(destination, 'dataset_info.json')):
      with open(os.path.join(destination, 'dataset_info.json')) as f:
        if json.load(f).get('fileFormat') == 'array_record':
          return f'{destination} already holds {spec} in array_record format; nothing to convert'
    _check_out_dir(destination, metadata, shards)
  for _, target, _ in shards:
    os.makedirs(os.path.dirname(target), exist_ok=True)
  _convert_all(shards, workers)
  if not in_place:  # dataset_info.json last: it marks the copy complete.
    for relative in sorted(metadata - {'dataset_info.json'}):
      os.makedirs(os.path.dirname(os.path.join(destination, relative)), exist_ok=True)
      shutil.copy2(os.path.join(source_dir, relative), os.path.join(destination, relative))
  keep = {'tfrecord'} if in_place and not delete_tfrecord else set()
  _write_info(os.path.join(destination, 'dataset_info.json'), info_json,
              (formats - {'array_record', 'tfrecord'}) | keep)
  if in_place and delete_tfrecord:
    for source, _, _ in shards:
      os.remove(source)
  records = sum(n for _, _, n in shards)
  return (f'wrote {destination}: {len(shards)} array_record shards, {records} records; read it '
          f'with data_dir={data_dir if in_place else out_dir}')


def main(argv):
  try:
    if any(arg in ('-h', '--help', '-help') for arg in argv[1:]):
      print(__doc__.strip())
      return 0
    try:
      rest = flags.FLAGS(argv)
    except flags.UnrecognizedFlagError as error:
      raise ConvertError(f'Unknown flag --{error.flagname}; the flags are --'
                         + ', --'.join(_FLAGS) + '.') from None
    except flags.Error as error:
      raise ConvertError(f'{str(error).splitlines()[0].rstrip(".")}; correct that flag.') from None
    if len(rest) > 1:
      raise ConvertError(f'Unexpected argument {rest[1]!r}; every input is a flag '
                         '(--name=value).')
    if not (_DATA_DIR.value and _DATASET.value):
      raise ConvertError('Pass --data_dir DIR and --dataset NAME[/CONFIG][:VERSION], e.g. '
                         '--dataset c4/en:3.1.0.')
    print(convert(_DATA_DIR.value, _DATASET.value, _OUT_DIR.value, _DELETE.value,
                  _WORKERS.value) + '.')
  except ConvertError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except OSError as error:  # Permissions, a full disk: the file and the reason.
    print(f'error: {error.filename or "a file"}: {error.strerror or error}; fix that and run '
          'again (finished shards are kept).', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
