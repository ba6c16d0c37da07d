"""A TFDS builder for local text files, written as array_record WITHOUT TensorFlow.

Without TensorFlow installed, TFDS can write only the array_record file format, which is what we
ask for explicitly; reading goes through `builder.as_data_source()` (random access, no download).
Each source file is one document; a file goes to the validation split when a hash of its path
relative to its root falls below `validation_percent` (or, if none does, the lowest-hashing file
alone), so the split does not depend on file order.
A single file is split instead by its lines: the last `validation_percent` of them validate.
"""

import fcntl
import glob
import hashlib
import os

import tensorflow_datasets as tfds


class DataError(ValueError):
  """A data problem, described in one sentence that says what to change."""


def resolve_files(specs, suffix=''):
  """Expands files, directories (recursively) and globs into sorted (root, path) pairs."""
  found = {}
  for spec in specs:
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
      matches = [(spec, p) for p in glob.glob(os.path.join(spec, '**', '*' + suffix), recursive=True)]
    elif any(c in spec for c in '*?['):
      root = os.path.dirname(spec.split('*')[0].split('?')[0].split('[')[0]) or '.'
      matches = [(root, p) for p in glob.glob(spec, recursive=True)]
    elif os.path.isfile(spec):
      matches = [(os.path.dirname(spec) or '.', spec)]
    else:
      matches = []
    if not any(os.path.isfile(path) for _, path in matches):
      raise DataError(f'Text source {spec!r} matches no file; fix data.paths (files, '
                      'directories or globs).')
    for root, path in matches:
      if os.path.isfile(path):
        found[os.path.abspath(path)] = os.path.abspath(root)
  if not found:
    raise DataError('No text source given; set data.paths (files, directories or globs).')
  return sorted((root, path) for path, root in found.items())


# Above this share of invalid UTF-8 bytes a source is taken for binary or wrongly encoded data.
MAX_INVALID_UTF8 = 0.001


def scan(files):
  """(content hash, {path: invalid UTF-8 bytes}) in one read of every file.

  The hash covers (relative path, bytes) of all files and names the prepared dataset. Invalid
  bytes are replaced when the dataset is written; above MAX_INVALID_UTF8 of all bytes the source
  is refused, so that a binary file or a Latin-1 corpus does not train silently on mojibake.
  """
  digest = hashlib.sha256()
  invalid, total = {}, 0
  for root, path in files:
    digest.update(os.path.relpath(path, root).encode())
    with open(path, 'rb') as f:
      data = f.read()
    digest.update(hashlib.sha256(data).digest())
    total += len(data)
    try:
      data.decode('utf-8')
    except UnicodeDecodeError:  # Count exactly the bytes that decoding would have to drop.
      invalid[path] = len(data) - len(data.decode('utf-8', errors='ignore').encode('utf-8'))
  if total == 0:
    raise DataError(f'The {len(files)} files of data.paths are all empty; point data.paths at '
                    'files with text.')
  bad = sum(invalid.values())
  if bad > MAX_INVALID_UTF8 * max(total, 1):
    worst = max(invalid, key=invalid.get)
    raise DataError(f'{bad} of the {total} bytes in data.paths are not valid UTF-8 (the most in '
                    f'{worst}: {invalid[worst]}); convert those files to UTF-8 or remove them '
                    'from data.paths.')
  return digest.hexdigest(), invalid


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


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files -> {'text': bytes, 'path': relative path}, train/validation splits."""
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, files, validation_percent, **kwargs):
    self._files = files
    self._validation_percent = validation_percent
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'path': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if len(self._files) == 1:
      return {'train': self._generate_examples(self._files, part='train'),
              'validation': self._generate_examples(self._files, part='validation')}
    train, validation = split_files(self._files, self._validation_percent)
    return {'train': self._generate_examples(train),
            'validation': self._generate_examples(validation)}

  def _generate_examples(self, files, part=None):
    for root, path in files:
      relative = os.path.relpath(path, root)
      with open(path, 'rb') as f:
        text = f.read().decode('utf-8', errors='replace')
      if part is not None:  # One file: split by lines.
        lines = text.splitlines(keepends=True)
        cut = len(lines) - max(1, len(lines) * self._validation_percent // 100)
        text = ''.join(lines[:cut] if part == 'train' else lines[cut:])
      yield relative, {'text': text, 'path': relative}


def prepare(files, data_dir, validation_percent, name, content_hash):
  """Writes (once) and returns the builder for `files`, in a folder named by their content hash.

  A file lock makes concurrent preparations (several processes of one job, or two jobs sharing
  data_dir) write the dataset once while the others wait and then read it.
  """
  version_dir = f'{name}-{content_hash[:16]}-val{validation_percent}'
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, version_dir + '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = LocalText(files=files, validation_percent=validation_percent,
                        data_dir=os.path.join(data_dir, version_dir), file_format='array_record')
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      builder.download_and_prepare()
  return builder
