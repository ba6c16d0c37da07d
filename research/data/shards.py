"""Tokenized shards: a split as array_record files of fixed-size token chunks, plus a manifest.

Each part of a source (research/data/sources.py) becomes one shard, written by one writer:
its documents are tokenized, each followed by EOS, concatenated, and cut into records of CHUNK
tokens (the last one shorter). A record holds its tokens, the offsets within it where documents
start and how many documents started before it, so any token range of the split, with the
document of every token, is read from one or two records by index. Token i of a split lies in
shard s at offset i - (tokens of shards before s); nothing of size proportional to the corpus is
ever held in memory.

Writers share a split by shard: several processes (or hosts on a shared filesystem with working
`flock`) each take their share first and then every shard not yet written, under a per-shard
lock, and the first to finish writes the manifest: source and tokenizer fingerprints, per-shard
token and document counts, a content hash of the tokens, and each split's token frequencies.
Every file appears complete or not at all (written under a unique temporary name, then renamed).
"""

import collections
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
import uuid

import numpy as np
from absl import logging

from research import cli
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


# Every name the writers make in a shard folder: shards with their stats, counts and locks,
# each split's counts, the manifest, and the temporaries of all of them (_temporary).
_WRITTEN = re.compile(r'((train|validation)(-\d{5,}-of-\d{5,}\.array_record'
                      r'(\.json|\.counts\.npy|\.lock)?|\.counts\.npy)|' + re.escape(MANIFEST)
                      + r')(\.tmp-.+)?')


def check_shard_folder(directory, setting):
  """One sentence where `directory` (the folder of `setting`), without a manifest yet, holds
  something the writers did not make (a mistyped path to a folder of other data), which
  tokenizing there would mix in with the shards. Hidden names and lost+found are passed over."""
  if not os.path.isdir(directory):
    return
  strangers = sorted(name for name in os.listdir(directory)
                     if not (_WRITTEN.fullmatch(name) or name.startswith('.')
                             or name == 'lost+found'))
  if strangers:
    raise DataError(
        f'{setting} {directory} holds files that are not tokenized shards ({strangers[0]}'
        f'{", ..." if len(strangers) > 1 else ""}); point it at a folder of shards (with its '
        f'{MANIFEST}) or at a new or empty folder to tokenize into.')


def _temporary(path):
  """A name no other process (on this host or another with the same pid) writes."""
  return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def _write_atomically(path, data):
  temporary = _temporary(path)
  with open(temporary, 'wb') as f:
    f.write(data)
  os.replace(temporary, path)


def _npy_bytes(array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _text(piece, origin, stats):
  """A document piece as str; invalid UTF-8 is replaced by U+FFFD and counted (and the file
  with the most of it remembered, for the message if there is too much)."""
  if isinstance(piece, str):
    stats['bytes'] += len(piece.encode('utf-8', errors='replace'))
    return piece
  stats['bytes'] += len(piece)
  try:
    return piece.decode('utf-8')
  except UnicodeDecodeError:
    invalid = len(piece) - len(piece.decode('utf-8', 'ignore').encode())
    stats['invalid_utf8_bytes'] += invalid
    stats['invalid_by_origin'][origin] = stats['invalid_by_origin'].get(origin, 0) + invalid
    return piece.decode('utf-8', errors='replace')


def _check_utf8(stats, where):
  """One sentence when more than MAX_INVALID_UTF8 of the bytes are not UTF-8 (a binary file or
  a wrongly encoded corpus), naming the file with the most."""
  if stats['invalid_utf8_bytes'] > MAX_INVALID_UTF8 * max(stats['bytes'], 1):
    origin, count = stats['most_invalid']
    raise DataError(f"{stats['invalid_utf8_bytes']} of the {stats['bytes']} bytes of {where} are "
                    f'not valid UTF-8 (the most in {origin}: {count}); convert those files to '
                    'UTF-8 or remove them from the source.')


class _Writer:
  """Cuts a stream of documents into CHUNK-token records."""

  def __init__(self, writer, dtype):
    self.writer, self.dtype = writer, dtype
    self.pending, self.starts = [], []  # Token arrays not yet written; their document starts.
    self.buffered = self.written = self.docs_before = 0
    self.digest = hashlib.sha256()

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
  stats = dict(tokens=0, documents=0, empty_documents=0, invalid_utf8_bytes=0, bytes=0,
               invalid_by_origin={})
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  temporary = _temporary(path)
  writer = _Writer(array_record_module.ArrayRecordWriter(temporary, 'group_size:1'),
                   token_dtype(tokenizer.vocab_size))
  try:
    _tokenize(source, part, tokenizer, writer, stats, counts)
    invalid = stats.pop('invalid_by_origin')
    stats['most_invalid'] = max(invalid.items(), key=lambda item: item[1]) if invalid else None
    _check_utf8(stats, f'{os.path.basename(path)} of {source.name}')  # Early, per shard.
    writer.close()
  except BaseException:  # A bad document (or a stop) leaves no partial shard behind.
    try:
      writer.writer.close()
    finally:
      os.remove(temporary)
    raise
  os.replace(temporary, path)
  stats.update(tokens=writer.written, records=-(-writer.written // CHUNK),
               sha256=writer.digest.hexdigest())
  _write_atomically(path + '.counts.npy', _npy_bytes(counts))
  return stats


def _tokenize(source, part, tokenizer, writer, stats, counts):
  eos = tokenizer.eos_id  # None for a vocabulary without one (BERT's WordPiece).
  open_document = part.continues  # Its first tokens belong to the last shard's last document.
  for piece, ends, origin in source.documents(part):
    ids = np.asarray(tokenizer.encode(_text(piece, origin, stats)))
    if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
      raise DataError(f'The tokenizer {tokenizer.name} produced id {int(ids.max())} outside its '
                      f'vocabulary of {tokenizer.vocab_size}; the tokenizer file is inconsistent.')
    if not open_document and ends and len(ids) == 0:  # An empty document: skipped, counted.
      stats['empty_documents'] += 1
      continue
    if ends and eos is not None:
      ids = np.append(ids, eos)
    writer.add(ids.astype(writer.dtype), starts_document=not open_document)
    counts += np.bincount(ids, minlength=len(counts))
    stats['documents'] += int(not open_document)
    open_document = not ends


def read_manifest(directory):
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def prepare(source, spec, tokenizer, directory, writer=0, writers=1, setting='data.tokens_dir',
            settings=None):
  """Writes the shards of `source` under `directory` and returns the manifest, which records
  `settings` (sources.reading_settings: those that shaped its documents) beside the source.

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
  try:
    cli.check_folder(directory, f"{setting}'s shard folder")
  except ValueError as error:
    raise DataError(str(error)) from None
  os.makedirs(directory, exist_ok=True)
  jobs = [(split, part) for split in parts for part in parts[split]]
  jobs = jobs[writer::writers] + [j for i, j in enumerate(jobs) if i % writers != writer]
  for split, part in jobs:
    path = os.path.join(directory, shard_name(split, part.index, len(parts[split])))
    if os.path.exists(path + '.json'):
      continue
    with open(path + '.lock', 'w') as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Another writer holding it is writing this shard.
      except OSError as error:
        raise DataError(f'{directory} does not support file locks ({error.strerror}); set '
                        f'{setting} to a local folder or a shared one with flock.') from None
      if os.path.exists(path + '.json'):
        continue
      started = time.time()
      stats = write_shard(source, part, tokenizer, path)
      _write_atomically(path + '.json', json.dumps(stats, indent=1).encode())
      logging.info('Tokenized %s: %d documents, %d tokens in %.1f s.', os.path.basename(path),
                   stats['documents'], stats['tokens'], time.time() - started)
  if read_manifest(directory) is None:
    _manifest(directory, source, spec, tokenizer, parts, settings or {})
  return read_manifest(directory)


def _manifest(directory, source, spec, tokenizer, parts, settings):
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
    worst = [s['most_invalid'] for s in shards if s['most_invalid']]
    total['most_invalid'] = max(worst, key=lambda w: w[1]) if worst else None
    _check_utf8(total, f'the {split} split of {spec}')
    if total['documents'] == 0:
      raise DataError(f'The {split} split of data source {spec} holds only empty documents; add '
                      'text or change data.validation_percent.')
    if total['invalid_utf8_bytes']:
      logging.warning('%d bytes of the %s split of %s are not valid UTF-8 and were replaced by '
                      'U+FFFD (most in %s).', total['invalid_utf8_bytes'], split, spec,
                      total['most_invalid'][0])
    if total['empty_documents']:
      logging.info('Skipped %d empty documents in the %s split of %s.',
                   total['empty_documents'], split, spec)
    _write_atomically(os.path.join(directory, f'{split}.counts.npy'), _npy_bytes(counts))
    digest = hashlib.sha256(''.join(s['sha256'] for s in shards).encode()).hexdigest()
    splits[split] = dict(total, shards=shards, fingerprint=digest)
  manifest = dict(
      format=FORMAT, chunk=CHUNK, dtype=np.dtype(token_dtype(tokenizer.vocab_size)).name,
      source=dict(spec=spec, name=source.name, fingerprint=source.fingerprint(),
                  settings=settings),
      tokenizer=dict(name=tokenizer.name, fingerprint=tokenizer.fingerprint,
                     vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id),
      splits=splits, created=time.time())
  path = os.path.join(directory, MANIFEST)
  temporary = _temporary(path)
  with open(temporary, 'w') as f:
    json.dump(manifest, f, indent=1)
  try:  # The first writer's manifest stands; the others read it.
    os.link(temporary, path)
  except FileExistsError:
    pass
  except OSError:  # No hard links here: every writer's manifest holds the same shards.
    os.replace(temporary, path)
    return
  os.remove(temporary)


def check_manifest(manifest, directory, tokenizer, spec=None, source_fingerprint=None,
                   settings=None):
  """One sentence when the shards in `directory` were made with another tokenizer, or from
  another source: its spec and reading `settings` (shards made elsewhere) or its fingerprint."""
  if manifest.get('format') != FORMAT or manifest.get('chunk') != CHUNK:
    raise DataError(f'The tokenized data in {directory} has another format; tokenize again '
                    'with python -m research.data.pretokenize.')
  made = manifest['tokenizer']
  if made['fingerprint'] != tokenizer.fingerprint:
    raise DataError(f"The tokenized data in {directory} was made with the tokenizer "
                    f"{made['name']} but this run uses {tokenizer.name} (another fingerprint); "
                    'set data.tokenizer to the same one, or tokenize again.')
  source = manifest['source']
  if (spec is not None and source['spec'] != spec
      or source_fingerprint is not None and source['fingerprint'] != source_fingerprint):
    raise DataError(f"The tokenized data in {directory} was made from {source['spec']} but this "
                    f'run reads {spec or "another version of it"}; point the run at its own '
                    'tokenized data.')
  # Manifests written before the settings were recorded hold none, and are read as before.
  made_with = source.get('settings') or {}
  changed = {key: (made_with[key], value) for key, value in (settings or {}).items()
             if key in made_with and made_with[key] != value}
  if changed:
    differences = ', '.join(f'{key}={old!r} (this run: {new!r})'
                            for key, (old, new) in changed.items())
    raise DataError(f'The tokenized data in {directory} was made with {differences}; set the same '
                    'values, or tokenize again into another data.tokenized_dir.')


class _Readers:
  """Open array_record readers of a split's shards, at most `limit` at a time (a corpus may
  have thousands of shards), each checked against the manifest when opened."""

  def __init__(self, paths, records, limit=64):
    self.paths, self.records, self.limit = paths, records, limit
    self._open = collections.OrderedDict()
    self._lock = threading.Lock()  # The prefetching thread and evaluation read concurrently.

  def read(self, shard, index):
    from array_record.python import array_record_module
    with self._lock:
      reader = self._open.pop(shard, None)
      if reader is None:
        if not os.path.exists(self.paths[shard]):
          raise DataError(f'{self.paths[shard]} is missing from the tokenized data; copy the '
                          'whole folder, or delete it to tokenize again.')
        # Random access: no read-ahead, small buffers (as grain's ArrayRecordDataSource).
        reader = array_record_module.ArrayRecordReader(
            self.paths[shard], options='readahead_buffer_size:0', file_reader_buffer_size=32768)
        if reader.num_records() != self.records[shard]:
          raise DataError(f'{self.paths[shard]} holds {reader.num_records()} records but its '
                          f'manifest says {self.records[shard]}; copy it again, or delete the '
                          'folder to tokenize again.')
        if len(self._open) >= self.limit:
          self._open.popitem(last=False)[1].close()
      self._open[shard] = reader
      return reader.read([index])[0]


class TokenStore:
  """Random access to a tokenized split: read(start, length) -> (tokens, document ids).

  Opening one costs the same for any corpus: shard sizes come from the manifest, and a shard's
  file is opened on its first read."""

  def __init__(self, directory, manifest, split):
    self.directory, self.split = directory, split
    info = manifest['splits'][split]
    self.dtype = np.dtype(manifest['dtype'])
    self.fingerprint = info['fingerprint']
    self.num_tokens = info['tokens']
    self.num_documents = info['documents']
    shards = info['shards']
    self._token_offsets = np.cumsum([0] + [s['tokens'] for s in shards])
    self._doc_offsets = np.cumsum([0] + [s['documents'] for s in shards])
    self._readers = _Readers([os.path.join(directory, s['file']) for s in shards],
                             [s['records'] for s in shards])
    self._record = functools.lru_cache(maxsize=64)(self._read_record)  # Per store.

  def _read_record(self, shard, index):
    """(tokens, per-token document ids) of record `index` of `shard`."""
    tokens, starts, docs_before = decode_record(self._readers.read(shard, index), self.dtype)
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
