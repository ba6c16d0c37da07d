"""Document sources: where the text of a split comes from, cut into parts of bounded size.

A source is named by a spec `KIND[:LOCATION]` (config: data.source with data.paths or
data.tfds_name, or an entry of data.mixture):
  stdlib              the embedded default: this Python's standard-library .py files
  text:PATHS          local text files, directories or globs (comma-separated); a file is a document
  jsonl:PATHS         JSON lines; each line's data.text_field is a document
  parquet:PATHS       Parquet files; each row's data.text_field column is a document
  tfds:NAME[:VERSION] a TFDS dataset prepared as array_record under data.data_dir (c4/en:3.1.0)
Local sources are split into train and validation by data.validation_percent: several files by a
hash of each one's path (so the split does not depend on file order), a single file by the last
fraction of its bytes (Parquet: of its rows), contiguous, as nanoGPT does. TFDS datasets use their
own splits (data.train_split, data.validation_split).

A split is a list of parts (at most PART_BYTES of text, or PART_EXAMPLES examples), each of which
becomes one shard when tokenized (research/data/shards.py), so that several processes can share
the work and no step holds more than a part in memory. `documents(part)` yields (text, ends,
origin) pieces: `ends` is False when a document continues in the next piece (a large file read
in pieces, each cut after a newline and tokenized on its own: a SentencePiece model's dummy
prefix adds one space token at each such cut, one per PIECE_BYTES of text); `origin` names the
file or dataset, for messages.
"""

import dataclasses
import glob
import hashlib
import json
import math
import os
import re

from research.data import corpus

PART_BYTES = 64 << 20
PIECE_BYTES = 4 << 20  # Text read and tokenized at a time: what bounds a writer's memory.
PART_EXAMPLES = 100_000
KINDS = ('stdlib', 'text', 'jsonl', 'parquet', 'tfds')


class DataError(ValueError):
  """A data problem, described in one sentence that says what to change."""


@dataclasses.dataclass(frozen=True)
class Part:
  """One shard's worth of a split: byte ranges of files, row ranges, or example ranges."""
  split: str
  index: int
  pieces: tuple  # ((path or name, begin, end, ends_document), ...)
  continues: bool = False  # The first piece continues the last document of the part before.


def resolve_files(specs, setting='data.paths'):
  """Expands files, directories (recursively) and globs into sorted (root, path) pairs."""
  found = {}
  for spec in specs:
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
      matches = [(spec, p) for p in glob.glob(os.path.join(spec, '**', '*'), recursive=True)]
    elif any(c in spec for c in '*?['):
      root = os.path.dirname(spec.split('*')[0].split('?')[0].split('[')[0]) or '.'
      matches = [(root, p) for p in glob.glob(spec, recursive=True)]
    elif os.path.isfile(spec):
      matches = [(os.path.dirname(spec) or '.', spec)]
    else:
      matches = []
    if not any(os.path.isfile(path) for _, path in matches):
      raise DataError(f'Source {spec!r} matches no file; fix {setting} (files, directories or '
                      'globs).')
    for root, path in matches:
      if os.path.isfile(path):
        found[os.path.abspath(path)] = os.path.abspath(root)
  if not found:
    raise DataError(f'No source file given; set {setting} (files, directories or globs).')
  return sorted((root, path) for path, root in found.items())


def _bucket(relative_path):
  return int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100


def is_validation(relative_path, validation_percent):
  return _bucket(relative_path) < validation_percent


def split_files(files, validation_percent):
  """(train, validation) by path hash; at least one file validates when there are several."""
  relative = [os.path.relpath(path, root) for root, path in files]
  chosen = {i for i, name in enumerate(relative) if is_validation(name, validation_percent)}
  if not chosen:
    chosen = {min(range(len(files)), key=lambda i: (_bucket(relative[i]), relative[i]))}
  return ([f for i, f in enumerate(files) if i not in chosen],
          [f for i, f in enumerate(files) if i in chosen])


def _boundary(path, offset, size, lines_only):
  """Where to cut a file near `offset`: after the next newline, or (for plain text, when no
  newline follows within 1 MiB) at the next UTF-8 character start, so no character is split."""
  if offset <= 0 or offset >= size:
    return min(max(offset, 0), size)
  with open(path, 'rb') as f:
    f.seek(offset)
    searched = 0
    while True:
      block = f.read(1 << 16)
      if not block:
        return size
      newline = block.find(b'\n')
      if newline >= 0:
        return offset + searched + newline + 1
      searched += len(block)
      if not lines_only and searched >= 1 << 20:
        break
    f.seek(offset)
    block = f.read(4)
  return offset + next((i for i, b in enumerate(block) if b & 0xC0 != 0x80), 0)


def _ranges(path, begin, end, ends_document, lines_only):
  """Byte ranges of about PIECE_BYTES, cut after newlines, covering [begin, end) of a file."""
  size = os.path.getsize(path)
  pieces, start = [], begin
  while start < end:
    stop = (min(end, _boundary(path, start + PIECE_BYTES, size, lines_only))
            if end - start > PIECE_BYTES else end)
    stop = max(stop, min(end, start + 1))
    pieces.append((path, start, stop, ends_document and stop == end))
    start = stop
  return pieces


def _continues(piece, file_starts):
  """Whether a file piece continues a document begun in an earlier piece."""
  path, begin = piece[0], piece[1]
  return begin != file_starts.get(path, 0)


def _group(pieces, split, sizes, continues=lambda piece: False):
  """Consecutive pieces grouped into parts of about PART_BYTES."""
  parts, current, used = [], [], 0

  def close():
    parts.append(Part(split, len(parts), tuple(current), continues(current[0])))

  for piece, size in zip(pieces, sizes):
    if current and used + size > PART_BYTES:
      close()
      current, used = [], 0
    current.append(piece)
    used += size
  if current:
    close()
  return parts


class FileSource:
  """text, jsonl and stdlib: files read in byte ranges (JSON lines are never cut)."""

  def __init__(self, kind, files, validation_percent, text_field):
    self.kind, self.files = kind, files
    self.validation_percent, self.text_field = validation_percent, text_field
    self.name = kind if kind == 'stdlib' else f'{kind}:{len(files)} files'

  def fingerprint(self):
    """Relative paths, sizes and modification times: cheap at every start, and any edit of a
    file names a new tokenized dataset. (The tokens themselves carry a content hash.)"""
    digest = hashlib.sha256(f'{self.kind}|{self.validation_percent}|{self.text_field}'.encode())
    for root, path in self.files:
      stat = os.stat(path)
      digest.update(f'{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()

  def parts(self, split):
    lines = self.kind == 'jsonl'  # A JSON line is never cut.
    if len(self.files) == 1:  # One file: the last fraction of its bytes validates.
      path = self.files[0][1]
      size = os.path.getsize(path)
      cut = _boundary(path, size - size * self.validation_percent // 100, size, lines)
      begin, end = (0, cut) if split == 'train' else (cut, size)
      pieces, starts = _ranges(path, begin, end, True, lines), {path: begin}
    else:
      train, validation = split_files(self.files, self.validation_percent)
      pieces = [piece for _, path in (train if split == 'train' else validation)
                for piece in _ranges(path, 0, os.path.getsize(path), True, lines)]
      starts = {}
    # A JSON line is a document of its own: no JSON piece continues one.
    continues = (lambda piece: False) if lines else (lambda piece: _continues(piece, starts))
    return _group(pieces, split, [end - begin for _, begin, end, _ in pieces], continues)

  def documents(self, part):
    for path, begin, end, ends in part.pieces:
      with open(path, 'rb') as f:
        f.seek(begin)
        data = f.read(end - begin)
      if self.kind != 'jsonl':
        yield data, ends, path
        continue
      offset = begin
      for line in data.splitlines(keepends=True):
        if line.strip():
          yield _json_text(line, self.text_field, path, offset), True, path
        offset += len(line)


def _json_text(line, field, path, offset):
  where = f'the line at byte {offset} of {path}'
  try:
    record = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DataError(f'{where} is not JSON ({error}); write one object per line.') from None
  if not isinstance(record, dict) or field not in record:
    raise DataError(f'{where} has no {field!r} field; set data.text_field (--text_field) to the '
                    'field that holds the text.')
  text = record[field]
  if not isinstance(text, str):
    raise DataError(f'The {field!r} field of {where} is not a string; set data.text_field to a '
                    'text field.')
  return text


class ParquetSource:
  """Parquet files: a part is a range of rows of one row group; each row is a document."""

  def __init__(self, files, validation_percent, text_field):
    import pyarrow.parquet as pq  # Imported on use: only Parquet sources need it.
    self.pq = pq
    self.files, self.validation_percent, self.text_field = files, validation_percent, text_field
    self.name = f'parquet:{len(files)} files'
    for _, path in files:
      try:
        schema = pq.read_schema(path)
      except Exception as error:  # pyarrow raises several types for a file that is not Parquet.
        raise DataError(f'{path} is not a readable Parquet file ({error}); fix data.paths.'
                        ) from None
      if text_field not in schema.names:
        raise DataError(f'{path} has no column {text_field!r} (it has {schema.names}); set '
                        'data.text_field.')

  fingerprint = FileSource.fingerprint
  kind = 'parquet'

  def parts(self, split):
    if len(self.files) == 1:
      path = self.files[0][1]
      rows = self.pq.ParquetFile(path).metadata.num_rows
      cut = rows - rows * self.validation_percent // 100
      chosen = [(path, *((0, cut) if split == 'train' else (cut, rows)))]
    else:
      train, validation = split_files(self.files, self.validation_percent)
      chosen = [(path, 0, self.pq.ParquetFile(path).metadata.num_rows)
                for _, path in (train if split == 'train' else validation)]
    pieces, sizes = [], []
    for path, first, last in chosen:
      metadata = self.pq.ParquetFile(path).metadata
      start = 0
      for group in range(metadata.num_row_groups):
        group_rows = metadata.row_group(group).num_rows
        lo, hi = max(first, start), min(last, start + group_rows)
        if lo < hi:
          pieces.append((path, group, lo - start, hi - start))
          sizes.append(metadata.row_group(group).total_byte_size * (hi - lo) // group_rows)
        start += group_rows
    return _group(pieces, split, sizes)

  def documents(self, part):
    for path, group, lo, hi in part.pieces:
      column = self.pq.ParquetFile(path).read_row_group(group, columns=[self.text_field])
      for value in column.column(0).slice(lo, hi - lo).to_pylist():
        if value is not None and not isinstance(value, (str, bytes)):
          raise DataError(f'Column {self.text_field!r} of {path} holds {type(value).__name__} '
                          'values, not text; set data.text_field to a text column.')
        yield value or '', True, path


def tfds_directory(data_dir, name):
  """The prepared folder of `name` (`c4/en:3.1.0`, or without version: the newest) under
  data_dir, a local path or a URL such as gs:// (etils.epath); None when there is none."""
  from etils import epath  # TFDS's own path library.
  name, _, version = name.partition(':')
  root = epath.Path(os.path.expanduser(data_dir)) / name
  if version:
    candidates = [root / version]
  else:
    versions = [v for v in (root.glob('*.*.*') if root.exists() else [])
                if re.fullmatch(r'\d+\.\d+\.\d+', v.name)]
    candidates = sorted(versions, key=lambda v: tuple(map(int, v.name.split('.'))))
  prepared = [c for c in candidates if (c / 'dataset_info.json').exists()]
  return os.fspath(prepared[-1]) if prepared else None


def tfds_builder(data_dir, name):
  """The TFDS builder of dataset `name` prepared as array_record under data_dir: what every
  reader of TFDS datasets here opens (documents, labelled examples)."""
  import tensorflow_datasets as tfds  # Imported on use: it is slow to import.
  directory = tfds_directory(data_dir, name)
  if directory is None:
    raise DataError(
        f'TFDS dataset {name} is not prepared under {data_dir}; prepare it where TensorFlow is '
        f'installed (tfds build {name.split(":")[0]} --data_dir=DIR '
        '--file_format=array_record, or convert a TFRecord one with python -m '
        f'research.data.tfds_convert --data_dir DIR --dataset {name}) and set data.data_dir '
        '(the tokenizer command\'s --data_dir) to DIR.')
  builder = tfds.builder_from_directory(directory)
  if builder.info.file_format.value != 'array_record':
    raise DataError(f'TFDS dataset {name} under {directory} is stored as '
                    f'{builder.info.file_format.value}, which cannot be read by index; '
                    'convert it once with python -m research.data.tfds_convert.')
  return builder


class TfdsSource:
  """A TFDS dataset prepared as array_record, read by index without TensorFlow."""

  def __init__(self, name, data_dir, train_split, validation_split, text_field):
    self.builder = tfds_builder(data_dir, name)
    self.name, self.kind, self.text_field = f'tfds:{name}', 'tfds', text_field
    self.splits = dict(train=train_split, validation=validation_split)
    features = list(self.builder.info.features.keys())
    if text_field not in features:
      raise DataError(f'TFDS dataset {name} has no feature {text_field!r} (it has {features}); '
                      'set data.text_field.')
    for split, setting in ((train_split, 'data.train_split'),
                           (validation_split, 'data.validation_split')):
      if split.split('[')[0] not in self.builder.info.splits:
        raise DataError(f'TFDS dataset {name} has no split {split!r} (it has '
                        f'{sorted(self.builder.info.splits)}); set {setting}.')
    self._sources = {}

  def _source(self, split):
    if split not in self._sources:
      self._sources[split] = self.builder.as_data_source(split=self.splits[split])
    return self._sources[split]

  def fingerprint(self):
    info = self.builder.info
    sizes = {s: (info.splits[s].num_examples, info.splits[s].num_bytes) for s in info.splits}
    text = f'{info.full_name}|{sorted(sizes.items())}|{self.splits}|{self.text_field}'
    return hashlib.sha256(text.encode()).hexdigest()

  def parts(self, split):
    count = len(self._source(split))
    return [Part(split, i, ((split, lo, min(lo + PART_EXAMPLES, count), True),))
            for i, lo in enumerate(range(0, count, PART_EXAMPLES))]

  def documents(self, part):
    for split, lo, hi, _ in part.pieces:
      source = self._source(split)
      for index in range(lo, hi):
        value = source[index][self.text_field]
        if not isinstance(value, (str, bytes)):
          raise DataError(f'Feature {self.text_field!r} of {self.name} is not text; set '
                          'data.text_field to a text feature.')
        yield value, True, self.name


def parse_spec(spec):
  """(kind, location) of a source spec `KIND[:LOCATION]`, checked."""
  kind, _, location = spec.strip().partition(':')
  if kind not in KINDS:
    raise DataError(f'Data source {spec!r} is not one of {list(KINDS)} (as KIND or '
                    'KIND:LOCATION, e.g. text:/data/*.txt or tfds:c4/en:3.1.0).')
  if kind != 'stdlib' and not location:
    raise DataError(f'Data source {kind!r} needs a location ({kind}:PATHS, or tfds:NAME).')
  return kind, location


def stdlib_files():
  """The (root, path) pairs of the embedded corpus."""
  return [f for f in resolve_files(corpus.stdlib_sources()) if corpus.is_stdlib_file(f[1])]


def build(spec, data, setting='data.paths'):
  """The source named by `spec`, with the reading settings of config.data; `setting` names
  where the paths came from, for messages."""
  kind, location = parse_spec(spec)
  if kind == 'tfds':
    return TfdsSource(location, data.data_dir, data.train_split, data.validation_split,
                      data.text_field)
  if kind == 'stdlib':
    return FileSource('stdlib', stdlib_files(), data.validation_percent, data.text_field)
  files = resolve_files([p for p in location.split(',') if p], setting)
  if kind == 'parquet':
    return ParquetSource(files, data.validation_percent, data.text_field)
  return FileSource(kind, files, data.validation_percent, data.text_field)


def reading_settings(spec, data):
  """{setting: value} of the config.data settings that shape the documents `spec` reads, beyond
  its files: the manifest of its shards records them, so that shards made elsewhere (whose
  files this machine may not have) are checked against a run's settings."""
  kind = parse_spec(spec)[0]
  if kind == 'tfds':
    keys = ('train_split', 'validation_split', 'text_field')
  elif kind in ('jsonl', 'parquet'):
    keys = ('validation_percent', 'text_field')
  else:  # Plain text and the standard library have no fields.
    keys = ('validation_percent',)
  return {f'data.{key}': data[key] for key in keys}


def specs(data):
  """[(spec, weight)] of config.data: its mixture, or its one source."""
  if data.paths and (data.mixture or data.source in ('stdlib', 'tfds')):
    reader = 'data.mixture' if data.mixture else f'data.source={data.source!r}'
    raise DataError(f'data.paths is set, but {reader} reads no paths; set data.source to text, '
                    'jsonl or parquet to read them (and leave data.mixture empty), or drop '
                    'data.paths.')
  if data.mixture:
    if data.tokenized_dir:
      raise DataError('data.tokenized_dir names the shards of one source; leave it empty for a '
                      'mixture.')
    entries = []
    for entry in filter(None, (e.strip() for e in data.mixture.split(';'))):
      spec, _, weight = entry.rpartition('=')
      try:
        weight = float(weight)
      except ValueError:
        weight = None
      if not spec or weight is None:
        raise DataError(f'data.mixture entry {entry!r} is not SOURCE=WEIGHT; write e.g. '
                        "'tfds:c4/en:3.1.0=0.7;text:/data/wiki=0.3'.")
      if not 0 < weight < math.inf:
        raise DataError(f'data.mixture gives {spec} the weight {weight}; weights must be '
                        'positive and finite (drop the entry instead).')
      parse_spec(spec)
      entries.append((spec, weight))
    return entries
  if data.source == 'stdlib':
    return [('stdlib', 1.0)]
  if data.source == 'tfds':
    if not data.tfds_name:
      raise DataError("data.source='tfds' needs data.tfds_name (e.g. c4/en:3.1.0).")
    return [(f'tfds:{data.tfds_name}', 1.0)]
  if not data.paths:
    raise DataError(f'data.source={data.source!r} needs data.paths (files, directories or globs).')
  return [(f'{data.source}:{data.paths}', 1.0)]
