"""Tokenized shards: a split as array_record files of fixed-size token chunks, plus a manifest.

Each part of a source (research/data/sources.py) becomes one shard, written by one writer:
its documents are tokenized, each followed by EOS, concatenated, and cut into records of CHUNK
tokens (the last one shorter). A record holds its tokens, the offsets within it where documents
start and how many documents started before it, so any token range of the split, with the
document of every token, is read from one or two records by index. Token i of a split lies in
shard s at offset i - (tokens of shards before s); nothing of size proportional to the corpus is
ever held in memory.

Writers share a split by shard: several processes (or hosts on a shared filesystem) each take
the shards not yet written, under a per-shard lock, and whichever sees every shard finished
writes the manifest: source and tokenizer fingerprints, per-shard token and document counts,
a content hash of the tokens, and the training split's token frequencies.
"""

import fcntl
import functools
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from research.data.sources import DataError

CHUNK = 4096
FORMAT = 1
MANIFEST = 'manifest.json'
# Above this share of invalid UTF-8 bytes a source is taken for binary or wrongly encoded data.
MAX_INVALID_UTF8 = 0.001
_HEADER = 16  # uint32 tokens, uint32 document starts, uint64 documents started before.


def token_dtype(vocab_size):
  return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_record(tokens, starts, docs_before, dtype):
  header = np.asarray([len(tokens), len(starts)], '<u4').tobytes()
  header += np.asarray([docs_before], '<u8').tobytes()
  return (header + np.asarray(tokens, np.dtype(dtype).newbyteorder('<')).tobytes()
          + np.asarray(starts, '<u4').tobytes())


def decode_record(data, dtype):
  """(tokens, document starts within the record, documents started before it)."""
  count, num_starts = np.frombuffer(data, '<u4', 2)
  docs_before = int(np.frombuffer(data, '<u8', 1, 8)[0])
  dtype = np.dtype(dtype).newbyteorder('<')
  tokens = np.frombuffer(data, dtype, count, _HEADER)
  starts = np.frombuffer(data, '<u4', num_starts, _HEADER + count * dtype.itemsize)
  return tokens, starts, docs_before


def shard_name(split, index, count):
  return f'{split}-{index:05d}-of-{count:05d}.array_record'


def _text(piece, origin, stats):
  """A document piece as str; invalid UTF-8 is replaced by U+FFFD and counted (and the file
  with the most of it remembered, for the message if there is too much)."""
  if isinstance(piece, str):
    return piece
  try:
    return piece.decode('utf-8')
  except UnicodeDecodeError:
    invalid = len(piece) - len(piece.decode('utf-8', 'ignore').encode())
    stats['invalid_utf8_bytes'] += invalid
    stats['invalid_by_origin'][origin] = stats['invalid_by_origin'].get(origin, 0) + invalid
    return piece.decode('utf-8', errors='replace')


class _Writer:
  """Cuts a stream of documents into CHUNK-token records."""

  def __init__(self, writer, dtype, vocab_size):
    self.writer, self.dtype = writer, dtype
    self.pending, self.starts = [], []  # Token arrays not yet written; their document starts.
    self.buffered = self.written = self.docs_before = 0
    self.digest = hashlib.sha256()
    self.counts = np.zeros(vocab_size, np.int64)

  def add(self, ids, starts_document):
    if starts_document:
      self.starts.append(self.written + self.buffered)
    self.pending.append(ids)
    self.buffered += len(ids)
    if self.buffered >= CHUNK:  # One concatenation however many chunks a long document fills.
      stream = np.concatenate(self.pending)
      full = len(stream) // CHUNK * CHUNK
      for begin in range(0, full, CHUNK):
        self._write(stream[begin:begin + CHUNK])
      self.pending, self.buffered = [stream[full:]], len(stream) - full

  def _write(self, chunk):
    end = self.written + len(chunk)
    starts = [s - self.written for s in self.starts if s < end]
    record = encode_record(chunk, starts, self.docs_before, self.dtype)
    self.writer.write(record)
    self.digest.update(record)
    self.counts += np.bincount(chunk, minlength=len(self.counts))
    self.docs_before += len(starts)
    self.starts = self.starts[len(starts):]
    self.written = end

  def close(self):
    if self.buffered:
      self._write(np.concatenate(self.pending))
    self.writer.close()


def write_shard(source, part, tokenizer, path):
  """Tokenizes `part` into the array_record file `path`; returns its statistics."""
  from array_record.python import array_record_module  # Imported on use: a native module.
  dtype = token_dtype(tokenizer.vocab_size)
  stats = dict(tokens=0, documents=0, empty_documents=0, invalid_utf8_bytes=0, bytes=0,
               invalid_by_origin={})
  temporary = f'{path}.tmp-{os.getpid()}'
  writer = _Writer(array_record_module.ArrayRecordWriter(temporary, 'group_size:1'), dtype,
                   tokenizer.vocab_size)
  try:
    _tokenize(source, part, tokenizer, writer, stats)
  except BaseException:  # A bad document (or a stop) leaves no partial shard behind.
    writer.close()
    os.remove(temporary)
    raise
  os.replace(temporary, path)
  invalid = stats.pop('invalid_by_origin')
  stats.update(tokens=writer.written, records=-(-writer.written // CHUNK),
               sha256=writer.digest.hexdigest(),
               most_invalid=max(invalid.items(), key=lambda item: item[1]) if invalid else None)
  np.save(path + '.counts.npy', writer.counts)
  return stats


def _tokenize(source, part, tokenizer, writer, stats):
  dtype = writer.dtype
  open_document = part.continues  # Its first tokens belong to the last shard's last document.
  for piece, ends, origin in source.documents(part):
    stats['bytes'] += len(piece)
    ids = np.asarray(tokenizer.encode(_text(piece, origin, stats)))
    if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
      raise DataError(f'The tokenizer {tokenizer.name} produced id {int(ids.max())} outside its '
                      f'vocabulary of {tokenizer.vocab_size}; the tokenizer file is inconsistent.')
    if ends and tokenizer.eos_id is not None:  # (A BERT WordPiece vocabulary has no EOS.)
      ids = np.append(ids, tokenizer.eos_id)
    if not open_document and len(ids) <= int(ends and tokenizer.eos_id is not None):
      # Nothing but EOS: skipped and counted.
      stats['empty_documents'] += int(ends)
      continue
    writer.add(ids.astype(dtype), starts_document=not open_document)
    stats['documents'] += int(not open_document)
    open_document = not ends
  writer.close()


def _write_json(path, value):
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(temporary, path)


def read_manifest(directory):
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def prepare(source, spec, tokenizer, directory, writer=0, writers=1):
  """Writes the shards of `source` under `directory` and returns the manifest.

  A writer takes its share first, then every other shard: one that another writer holds is
  waited for (its lock) and then found written, so all are done when the loop ends, and the
  manifest is written by whichever writer gets there first.
  """
  manifest = read_manifest(directory)
  if manifest is not None:
    return manifest
  parts = {split: source.parts(split) for split in ('train', 'validation')}
  for split, split_parts in parts.items():
    if not split_parts:
      raise DataError(f'The {split} split of data source {spec} is empty; add data or change '
                      'data.validation_percent (or the TFDS split).')
  os.makedirs(directory, exist_ok=True)
  jobs = [(split, part) for split in parts for part in parts[split]]
  jobs = jobs[writer::writers] + [j for i, j in enumerate(jobs) if i % writers != writer]
  for split, part in jobs:
    path = os.path.join(directory, shard_name(split, part.index, len(parts[split])))
    if os.path.exists(path + '.json'):
      continue
    with open(path + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # Another writer holding it is writing this shard.
      if os.path.exists(path + '.json'):
        continue
      started = time.time()
      stats = write_shard(source, part, tokenizer, path)
      _write_json(path + '.json', stats)
      logging.info('Tokenized %s: %d documents, %d tokens in %.1f s.', os.path.basename(path),
                   stats['documents'], stats['tokens'], time.time() - started)
  _manifest(directory, source, spec, tokenizer, parts)
  return read_manifest(directory)


def _manifest(directory, source, spec, tokenizer, parts):
  splits = {}
  for split, split_parts in parts.items():
    shards, counts = [], np.zeros(tokenizer.vocab_size, np.int64)
    for part in split_parts:
      name = shard_name(split, part.index, len(split_parts))
      with open(os.path.join(directory, name + '.json')) as f:
        shards.append(dict(file=name, **json.load(f)))
      counts += np.load(os.path.join(directory, name + '.counts.npy'))
    total = {key: sum(s[key] for s in shards)
             for key in ('tokens', 'documents', 'empty_documents', 'invalid_utf8_bytes', 'bytes')}
    if total['invalid_utf8_bytes'] > MAX_INVALID_UTF8 * max(total['bytes'], 1):
      worst = max((s['most_invalid'] for s in shards if s['most_invalid']), key=lambda w: w[1])
      raise DataError(f"{total['invalid_utf8_bytes']} of the {total['bytes']} bytes of the "
                      f'{split} split of {spec} are not valid UTF-8 (the most in {worst[0]}: '
                      f'{worst[1]}); convert those files to UTF-8 or remove them from the '
                      'source.')
    if total['documents'] == 0:
      raise DataError(f'The {split} split of data source {spec} holds only empty documents; add '
                      'text or change data.validation_percent.')
    if total['invalid_utf8_bytes']:
      worst = max((s['most_invalid'] for s in shards if s['most_invalid']), key=lambda w: w[1])
      logging.warning('%d bytes of the %s split of %s are not valid UTF-8 and were replaced by '
                      'U+FFFD (most in %s).', total['invalid_utf8_bytes'], split, spec, worst[0])
    if total['empty_documents']:
      logging.info('Skipped %d empty documents in the %s split of %s.',
                   total['empty_documents'], split, spec)
    np.save(os.path.join(directory, f'{split}.counts.npy'), counts)
    digest = hashlib.sha256(''.join(s['sha256'] for s in shards).encode()).hexdigest()
    splits[split] = dict(total, shards=shards, fingerprint=digest)
  manifest = dict(
      format=FORMAT, chunk=CHUNK, dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name,
      source=dict(spec=spec, name=source.name, fingerprint=source.fingerprint()),
      tokenizer=dict(name=tokenizer.name, fingerprint=tokenizer.fingerprint,
                     vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
      splits=splits, created=time.time())
  temporary = os.path.join(directory, f'{MANIFEST}.tmp-{os.getpid()}-{id(manifest)}')
  with open(temporary, 'w') as f:
    json.dump(manifest, f, indent=1)
  try:  # The first writer's manifest stands; the others read it.
    os.link(temporary, os.path.join(directory, MANIFEST))
  except FileExistsError:
    pass
  os.remove(temporary)


def check_manifest(manifest, directory, spec, tokenizer):
  """One sentence when the shards in `directory` were made from another source or tokenizer."""
  if manifest.get('format') != FORMAT or manifest.get('chunk') != CHUNK:
    raise DataError(f'The tokenized data in {directory} has another format; tokenize again '
                    'with python -m research.data.pretokenize.')
  made = manifest['tokenizer']
  if made['fingerprint'] != tokenizer.fingerprint:
    raise DataError(f"The tokenized data in {directory} was made with the tokenizer "
                    f"{made['name']} but this run uses {tokenizer.name} (another fingerprint); "
                    'set data.tokenizer to the same one, or tokenize again.')
  if manifest['source']['spec'] != spec:
    raise DataError(f"The tokenized data in {directory} was made from {manifest['source']['spec']}"
                    f' but this run reads {spec}; point the run at its own tokenized data.')


class TokenStore:
  """Random access to a tokenized split: read(start, length) -> (tokens, document ids)."""

  def __init__(self, directory, manifest, split):
    import grain  # Imported on use, like every reader of array_record.
    self.directory, self.split = directory, split
    info = manifest['splits'][split]
    self.dtype = np.dtype(manifest['dtype'])
    self.fingerprint = info['fingerprint']
    self.num_tokens = info['tokens']
    self.num_documents = info['documents']
    shards = info['shards']
    self._token_offsets = np.cumsum([0] + [s['tokens'] for s in shards])
    self._record_offsets = np.cumsum([0] + [s['records'] for s in shards])
    self._doc_offsets = np.cumsum([0] + [s['documents'] for s in shards])
    paths = [os.path.join(directory, s['file']) for s in shards]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise DataError(f'{missing[0]} is missing from the tokenized data in {directory}; copy the '
                      'whole folder, or delete it to tokenize again.')
    self._source = grain.sources.ArrayRecordDataSource(paths)

  @functools.lru_cache(maxsize=64)
  def _record(self, shard, index):
    """(tokens, per-token document ids) of record `index` of `shard`."""
    data = self._source[int(self._record_offsets[shard] + index)]
    tokens, starts, docs_before = decode_record(data, self.dtype)
    starts_before = np.searchsorted(starts, np.arange(len(tokens)), side='right')
    docs = self._doc_offsets[shard] + docs_before + starts_before - 1
    return tokens, docs

  def read(self, start, length):
    """Tokens [start, start + length) of the split and the document of each."""
    tokens, docs = [], []
    position, end = start, start + length
    while position < end:
      shard = int(np.searchsorted(self._token_offsets, position, side='right')) - 1
      offset = position - self._token_offsets[shard]
      index, within = divmod(int(offset), CHUNK)
      record_tokens, record_docs = self._record(shard, index)
      take = min(end - position, len(record_tokens) - within)
      tokens.append(record_tokens[within:within + take])
      docs.append(record_docs[within:within + take])
      position += take
    return np.concatenate(tokens), np.concatenate(docs)

  def token_counts(self):
    return np.load(os.path.join(self.directory, f'{self.split}.counts.npy'))
