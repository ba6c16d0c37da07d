"""Data from config: source -> tokenizer -> packed rows -> the batch for a step.

Sources (`config.data.source`):
  stdlib  the embedded default corpus: this Python's standard-library source files
  text    local files, directories or globs (`config.data.paths`, comma-separated)
  markov  an in-memory synthetic token stream (research/data/synthetic.py)
Text sources are written once as TFDS array_record splits under `config.data.data_dir` and read
with `as_data_source()` through grain.
"""

import dataclasses
import os

import grain
import numpy as np
from absl import logging

from research import objectives
from research.data import corpus
from research.data import labeled
from research.data import local_text
from research.data import packed_rows
from research.data import synthetic
from research.data import tokenizer as tokenizer_lib
from research.data.local_text import DataError


@dataclasses.dataclass
class Pipeline:
  """Batches as pure functions of the step and the data position.

  Training reads the endless sequence of rows in order: the batch at step N is the next
  `batch_size` rows after those consumed before it. A fresh run consumes from row 0; a resumed
  run continues from the row its checkpoint recorded (`resume_at`), so a changed batch size
  neither skips nor repeats rows. `lo`/`hi` select a host's rows of the global batch.
  """
  batch_size: int
  seq_len: int
  train: object  # .rows(start, stop)
  validation: object
  tokenizer: object
  record: dict  # What the workdir records about the data (source, fingerprint, sizes).
  seed: int
  eval_batches: int = 0  # > 0: batches that cover the validation set (else train.eval_batches).
  # config.objective: what turns documents into rows (masking rates, sentence pairs...).
  objective: dict = dataclasses.field(default_factory=dict)
  origin_step: int = 0
  origin_row: int = 0

  def resume_at(self, step, rows_consumed):
    self.origin_step, self.origin_row = step, rows_consumed

  def first_row(self, step):
    return self.origin_row + (step - self.origin_step) * self.batch_size

  def position(self, step):
    """What a checkpoint at `step` records to continue the data exactly (see check_position)."""
    return dict(next_step=step, rows_consumed=self.first_row(step), seq_len=self.seq_len,
                seed=self.seed, fingerprint=self.record['fingerprint'], objective=self.objective)

  def check_position(self, position):
    """Refuses, in one sentence, a position whose rows mean something else in this run."""
    if position['rows_consumed'] == 0:  # Nothing consumed yet: any data may follow.
      return
    for key, name in (('seq_len', 'train.seq_len'), ('seed', 'seed')):
      if position[key] != getattr(self, key):
        raise DataError(f'The checkpoint counts its data position in rows of {name}='
                        f'{position[key]} but this run has {getattr(self, key)}; resume with '
                        f'--config.{name}={position[key]}, or warm start a new --workdir with '
                        '--config.checkpoint.init_from.')
    if position['fingerprint'] != self.record['fingerprint']:
      raise DataError('The checkpoint was trained on other data (fingerprint '
                      f"{position['fingerprint'][:16]} there, {self.record['fingerprint'][:16]} "
                      'here); resume with the same data settings, or warm start a new --workdir '
                      'with --config.checkpoint.init_from.')
    saved = position.get('objective')  # Absent from checkpoints of earlier versions.
    if saved is not None and saved != self.objective:
      changed = ', '.join(f'objective.{k}: {saved.get(k)!r} there, {self.objective.get(k)!r} here'
                          for k in sorted(set(saved) | set(self.objective))
                          if saved.get(k) != self.objective.get(k))
      raise DataError(f"The checkpoint's rows were made with other objective settings "
                      f'({changed}); resume with those, or warm start a new --workdir with '
                      '--config.checkpoint.init_from.')

  def train_batch(self, step, lo=0, hi=None):
    hi = self.batch_size if hi is None else hi
    return self.train.rows(self.first_row(step) + lo, self.first_row(step) + hi)

  def eval_batch(self, index, lo=0, hi=None):
    hi = self.batch_size if hi is None else hi
    return self.validation.rows(index * self.batch_size + lo, index * self.batch_size + hi)

  def unigram_cross_entropy(self, num_batches):
    """Validation loss (nats/token) of the add-one unigram model of the training tokens."""
    counts = np.bincount(np.asarray(self.train.tokens), minlength=self.tokenizer.vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    total, count = 0.0, 0.0
    for index in range(num_batches):
      rows = self.eval_batch(index)
      mask = rows['weights'] > 0
      total -= log_probs[rows['targets'][mask]].sum()
      count += mask.sum()
    return total / count


def _tokenize_split(builder, split, tokenizer):
  """All documents of a split, each followed by EOS, concatenated: (tokens, doc_bounds)."""
  source = builder.as_data_source(split=split)
  if len(source) == 0:
    raise DataError(f'The {split} split is empty; add more files or change data.validation_percent.')
  documents = grain.MapDataset.source(source).map(
      lambda record: np.append(tokenizer.encode(record['text']), tokenizer.eos_id))
  pieces = [documents[i] for i in range(len(documents))]
  bounds = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
  return np.concatenate(pieces).astype(dtype), bounds


@dataclasses.dataclass
class _SyntheticVocabulary:
  """Synthetic tokens have a vocabulary size but no text: nothing to encode or decode, and no
  special ids but padding."""
  vocab_size: int
  pad_id: int = 0


class _MarkovRows:
  """Adapts the synthetic source to the rows(start, stop) interface."""

  def __init__(self, source, split, seq_len):
    self.source, self.split, self.seq_len = source, split, seq_len
    sample = source.rows(0, 64, seq_len, split)
    self.tokens = sample['tokens'][sample['segment_ids'] > 0]

  def rows(self, start, stop):
    return self.source.rows(start, stop, self.seq_len, self.split)


def _tokenizer(config):
  """config.data.tokenizer, checked against the model's vocabulary."""
  try:
    tokenizer = tokenizer_lib.get(config.data.tokenizer)
  except ValueError as error:
    raise DataError(str(error)) from None
  if tokenizer.vocab_size > config.model.vocab_size:
    raise DataError(f'The {config.data.tokenizer!r} tokenizer has {tokenizer.vocab_size} tokens '
                    f'but model.vocab_size={config.model.vocab_size}; raise model.vocab_size.')
  return tokenizer


def _labeled(config, objective):
  """A pipeline of labelled examples (fine-tuning), one example per row."""
  t = config.train
  tokenizer = _tokenizer(config)
  examples, fingerprint = labeled.read(config)
  transform = objective.transform(tokenizer)
  rows = {split: labeled.LabeledRows(examples[split], tokenizer, config.seed, split == 'train',
                                     transform) for split in examples}
  record = dict(source=config.data.source, fingerprint=fingerprint, tokenizer=config.data.tokenizer,
                train_examples=len(rows['train']), validation_examples=len(rows['validation']))
  return Pipeline(t.batch_size, t.seq_len, rows['train'], rows['validation'], tokenizer, record,
                  config.seed, eval_batches=-(-len(rows['validation']) // t.batch_size))


def build(config):
  """The pipeline of `config`'s data for its objective."""
  pipeline = _build(config)
  pipeline.objective = config.objective.to_dict()
  return pipeline


def _build(config):
  d, t = config.data, config.train
  objective = objectives.build(config)
  if d.source in labeled.SOURCES:
    return _labeled(config, objective)
  if d.source == 'markov':
    vocabulary = _SyntheticVocabulary(config.model.vocab_size)
    source = synthetic.MarkovSource(
        config.model.vocab_size, d.markov_branching, config.seed, d.min_doc_len,
        objective.transform(vocabulary))
    record = dict(source='markov', seed=config.seed, fingerprint=source.fingerprint())
    return Pipeline(t.batch_size, t.seq_len, _MarkovRows(source, 'train', t.seq_len),
                    _MarkovRows(source, 'validation', t.seq_len),
                    vocabulary, record, config.seed)

  tokenizer = _tokenizer(config)
  if d.source == 'stdlib':
    files = [f for f in local_text.resolve_files(corpus.stdlib_sources())
             if corpus.is_stdlib_file(f[1])]
  elif d.source == 'text':
    if not d.paths:
      raise DataError("data.source='text' needs data.paths (files, directories or globs).")
    files = local_text.resolve_files([p for p in d.paths.split(',') if p])
  else:
    raise DataError(f"data.source={d.source!r} is not one of ['stdlib', 'text', 'markov'].")
  content_hash, invalid = local_text.scan(files)
  if invalid:
    logging.warning('%d bytes in %d files of the %s source are not valid UTF-8 and are replaced '
                    'by U+FFFD (most in %s).', sum(invalid.values()), len(invalid), d.source,
                    max(invalid, key=invalid.get))
  builder = local_text.prepare(files, os.path.expanduser(d.data_dir), d.validation_percent,
                               d.source, content_hash)
  rows = {}
  transform = objective.transform(tokenizer)
  for split, shuffle in (('train', True), ('validation', False)):
    tokens, bounds = _tokenize_split(builder, split, tokenizer)
    if len(tokens) - (len(bounds) - 1) == 0:  # Every document is empty: only EOS tokens.
      raise DataError(f'The {split} split of data.source={d.source!r} holds only empty '
                      'documents; add files with text to data.paths or change '
                      'data.validation_percent.')
    rows[split] = packed_rows.PackedRows(tokens, bounds, t.seq_len, config.seed, shuffle,
                                         transform)
  record = dict(source=d.source, files=len(files), fingerprint=content_hash,
                prepared_at=builder.data_dir, tokenizer=d.tokenizer,
                train_tokens=int(len(rows['train'].tokens)),
                validation_tokens=int(len(rows['validation'].tokens)))
  return Pipeline(t.batch_size, t.seq_len, rows['train'], rows['validation'], tokenizer, record,
                  config.seed)
