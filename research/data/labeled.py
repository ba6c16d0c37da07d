"""Labelled examples for fine-tuning, as (text, pair, label) with a label of the objective's kind
(`read(config, targets)`): 'classes' reads (text, optional text pair, integer class id) for
classifiers, 'text' reads (input text, None, target text) for sequence-to-sequence models.

Sources (`config.data.source`):
  csv, jsonl  local files `data.train_path` and `data.validation_path` (a header row / one JSON
              object per line) with the columns `data.text_field`, `data.pair_field` (optional)
              and `data.label_field` (classes), or `data.text_field` and `data.target_field`
              (text)
  tfds        a TFDS dataset by name (`data.tfds_name`, e.g. glue/sst2) already prepared as
              array_record under `data.data_dir`, read with `as_data_source()`; without
              TensorFlow TFDS cannot prepare it, so a missing one is one sentence saying how
Every value is checked where it enters: a missing column, a label that is not an integer in
[0, model.num_labels), a missing text pair or target text: one sentence naming the file and
row.

Rows hold one example each. Training visits the examples in an order drawn from (seed, epoch),
epoch after epoch, so the batch at step N is a pure function of the step; validation visits them
once, in order, and pads its last batch with rows of weight 0.
"""

import csv
import glob
import hashlib
import json
import os

import numpy as np

from research.data import sources
from research.data.sources import DataError

SOURCES = ('csv', 'jsonl', 'tfds')
TARGETS = ('classes', 'text')  # What an example's label is: a class id or a target text.


def _where(path, row):
  return f'row {row} of {path}'


def _read_csv(path):
  with open(path, newline='', encoding='utf-8-sig') as f:  # A spreadsheet's byte-order mark too.
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    return columns, [(i + 2, dict(r)) for i, r in enumerate(reader)]  # Line numbers (1 = header).


def _read_jsonl(path):
  records, columns = [], set()
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise DataError(f'Line {line_number} of {path} is not JSON ({error.msg}); write one '
                        'object per line.') from None
      if not isinstance(record, dict):
        raise DataError(f'Line {line_number} of {path} is not a JSON object; write one object '
                        'per line.')
      columns.update(record)
      records.append((line_number, record))
  return sorted(columns), records


def _class(value, where, num_labels, field):
  try:
    label = int(value)
    if isinstance(value, float) and value != label or isinstance(value, bool):
      raise ValueError
  except (TypeError, ValueError, OverflowError):
    raise DataError(f'The {field!r} of {where} is {value!r}, not an integer class id; write '
                    f'labels as integers in [0, {num_labels - 1}].') from None
  if not 0 <= label < num_labels:
    raise DataError(f'The {field!r} of {where} is {label}, outside [0, {num_labels - 1}]; fix the '
                    'label or raise model.num_labels.')
  return label


def _text(value, where, field, hint):
  if isinstance(value, bytes):
    value = value.decode('utf-8', errors='replace')
  if value is not None and not isinstance(value, str):
    raise DataError(f'The {field!r} of {where} is {value!r}, not a text; write it as a string.')
  if not value:
    raise DataError(f'The {field!r} of {where} is missing or empty; {hint}.')
  return value


def _fields(d, targets):
  """{setting: column} of every column that examples with `targets` labels read."""
  if targets == 'text':
    return dict(text_field=d.text_field, target_field=d.target_field)
  fields = dict(text_field=d.text_field, label_field=d.label_field)
  if d.pair_field:
    fields['pair_field'] = d.pair_field
  return fields


def _label(record, where, d, num_labels, targets):
  if targets == 'text':
    return _text(record.get(d.target_field), where, d.target_field,
                 'every example needs a target text')
  return _class(record.get(d.label_field), where, num_labels, d.label_field)


def _records_to_examples(records, columns, path, d, num_labels, targets):
  """[(text, pair or None, label)] from (row, dict) records, checked field by field."""
  for setting, field in _fields(d, targets).items():
    if field not in columns:
      raise DataError(f'{path} has no field {field!r} (it has {sorted(columns)}); set '
                      f'data.{setting} to one of them.')
  examples = []
  for row, record in records:
    where = _where(path, row)
    text = _text(record.get(d.text_field), where, d.text_field, 'every example needs a text')
    pair = None
    if targets == 'classes' and d.pair_field:
      pair = _text(record.get(d.pair_field), where, d.pair_field, 'every example needs its '
                   "text pair (or set data.pair_field='' for single texts)")
    examples.append((text, pair, _label(record, where, d, num_labels, targets)))
  if not examples:
    raise DataError(f'{path} holds no example; add rows to it.')
  return examples


def _local_split(path, d, num_labels, targets='classes'):
  """(examples, a digest of the files' bytes, the files) of a path or glob."""
  if not path:
    raise DataError(f"data.source={d.source!r} needs data.train_path and data.validation_path.")
  matches = sorted(glob.glob(os.path.expanduser(path)))
  if not matches:
    raise DataError(f'{path} does not exist; fix data.train_path or data.validation_path.')
  folders = [file for file in matches if os.path.isdir(file)]
  if folders:
    raise DataError(f'{folders[0]} is a folder, not a {d.source} file; point data.train_path and '
                    f'data.validation_path at files (a glob such as '
                    f'{os.path.join(folders[0], "*." + d.source)} reads those in it).')
  examples, digest = [], hashlib.sha256()
  for file in matches:
    with open(file, 'rb') as f:
      digest.update(f.read())
    try:
      columns, records = (_read_csv if d.source == 'csv' else _read_jsonl)(file)
    except (UnicodeDecodeError, csv.Error) as error:
      raise DataError(f'{file} is not a readable UTF-8 {d.source} file ({error}); fix or convert '
                      'it.') from None
    if d.source == 'csv' and columns and columns[0].lstrip().startswith('{'):
      raise DataError(f'{file} holds JSON objects, not CSV (its first line starts with "{{"); set '
                      'data.source=jsonl for one JSON object per line.')
    examples += _records_to_examples(records, columns, file, d, num_labels, targets)
  return examples, digest.hexdigest(), matches


def _tfds_split(d, split, num_labels, targets):
  """(examples, the dataset, split and size read)."""
  builder = sources.tfds_builder(d.data_dir, d.tfds_name)
  if split.split('[')[0] not in builder.info.splits:  # TFDS slicing (train[:90%]) is allowed.
    setting = 'set data.train_split' if split == d.train_split else 'set data.validation_split'
    raise DataError(f'TFDS dataset {d.tfds_name} has no split {split!r} (it has '
                    f'{sorted(builder.info.splits)}); {setting}.')
  source = builder.as_data_source(split=split)
  columns = list(builder.info.features.keys())
  records = ((i, source[i]) for i in range(len(source)))
  where = f'{d.tfds_name} {split}'
  examples = _records_to_examples(records, columns, where, d, num_labels, targets)
  return examples, f'{builder.info.full_name}:{split}:{len(source)}'


def read(config, targets='classes'):
  """({'train': examples, 'validation': examples}, a fingerprint of both, what was read: the
  files or TFDS splits, the columns and the kind of labels). `targets` (TARGETS) says what the
  labels are: class ids in [0, model.num_labels) or target texts."""
  if targets not in TARGETS:
    raise ValueError(f'targets={targets!r} is not one of {list(TARGETS)}.')
  d = config.data
  num_labels = config.model.num_labels if targets == 'classes' else None
  if d.source == 'tfds':
    if not d.tfds_name:
      raise DataError("data.source='tfds' needs data.tfds_name (a dataset prepared under "
                      'data.data_dir, e.g. glue/sst2).')
    train, train_id = _tfds_split(d, d.train_split, num_labels, targets)
    validation, validation_id = _tfds_split(d, d.validation_split, num_labels, targets)
    origin = dict(train=train_id, validation=validation_id)
  else:
    train, train_id, train_files = _local_split(d.train_path, d, num_labels, targets)
    validation, validation_id, validation_files = _local_split(d.validation_path, d, num_labels,
                                                               targets)
    origin = dict(train=train_files, validation=validation_files)
  if targets == 'classes':  # As fingerprinted before text targets existed: runs still resume.
    fields = f'{d.text_field}|{d.pair_field}|{d.label_field}'
  else:
    fields = f'{d.text_field}|{d.target_field}|text'
  fingerprint = hashlib.sha256(f'{train_id}|{validation_id}|{fields}'.encode()).hexdigest()
  described = dict(origin, columns=_fields(d, targets), targets=targets)
  return dict(train=train, validation=validation), fingerprint, described


class LabeledRows:
  """Rows of one example each: training endless over shuffled epochs, validation once in order
  (indices past its end are padding rows of weight 0). Texts, and labels that are target texts
  (`targets`='text'), are tokenized once here."""

  def __init__(self, examples, tokenizer, seed, shuffle, transform, targets='classes'):
    encode = tokenizer.encode
    self.examples = [(encode(text), None if pair is None else encode(pair),
                      encode(label) if targets == 'text' else label)
                     for text, pair, label in examples]
    self.seed, self.shuffle, self.transform = seed, shuffle, transform
    self._orders = {}

  def __len__(self):
    return len(self.examples)

  def _example(self, index):
    if not self.shuffle:
      return self.examples[index] if index < len(self.examples) else None
    epoch, position = divmod(index, len(self.examples))
    if epoch not in self._orders:
      if len(self._orders) > 4:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
          len(self.examples))
    return self.examples[self._orders[epoch][position]]

  def rows(self, start, stop):
    per_row = [self.transform.row(self._example(i)) for i in range(start, stop)]
    return {name: np.concatenate([r[name] for r in per_row]) for name in per_row[0]}
