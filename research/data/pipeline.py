"""Data from config: sources -> tokenized shards -> rows -> the batch for a step.

Document sources (`config.data.source`, or several weighted in `config.data.mixture`; see
research/data/sources.py) are tokenized once into array_record shards (research/data/shards.py)
and read by index (research/data/windows.py), so a start costs the same at any step and corpus
size. Two other kinds of data have their own paths:
  markov          an in-memory synthetic token stream (research/data/synthetic.py)
  csv/jsonl/tfds  labelled examples, for fine-tuning objectives (research/data/labeled.py)
"""

import dataclasses
import hashlib

import jax
import numpy as np

from research import objectives
from research.data import labeled
from research.data import pretokenize
from research.data import shards
from research.data import synthetic
from research.data import tokenizer as tokenizer_lib
from research.data import windows
from research.data import sources
from research.data.sources import DataError


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
  record: dict  # What the workdir records about the data (sources, fingerprint, sizes).
  seed: int
  eval_batches: int = 0  # > 0: batches that cover the validation set (else train.eval_batches).
  # config.objective: what turns documents into rows (masking rates, sentence pairs...).
  objective: dict = dataclasses.field(default_factory=dict)
  origin_step: int = 0
  origin_row: int = 0
  target_len: int = 0  # Decoder positions per row (encoder-decoders), else 0.
  train_token_counts: np.ndarray = None  # Of the training split: the unigram baseline.

  def resume_at(self, step, rows_consumed):
    self.origin_step, self.origin_row = step, rows_consumed

  def first_row(self, step):
    return self.origin_row + (step - self.origin_step) * self.batch_size

  def position(self, step):
    """What a checkpoint at `step` records to continue the data exactly (see check_position)."""
    return dict(next_step=step, rows_consumed=self.first_row(step), seq_len=self.seq_len,
                target_len=self.target_len, seed=self.seed,
                fingerprint=self.record['fingerprint'], objective=self.objective)

  def check_position(self, position, changed_settings=''):
    """Refuses, in one sentence, a position whose rows mean something else in this run
    (`changed_settings`: the data settings that differ from the run's recorded ones, if known)."""
    if position['rows_consumed'] == 0:  # Nothing consumed yet: any data may follow.
      return
    for key, name in (('seq_len', 'train.seq_len'), ('target_len', 'train.target_len'),
                      ('seed', 'seed')):
      saved = position.get(key, 0)  # Checkpoints of earlier versions hold no target_len.
      if saved != getattr(self, key):
        raise DataError(f'The checkpoint counts its data position in rows of {name}={saved} '
                        f'but this run has {getattr(self, key)}; resume with --config.{name}='
                        f'{saved}, or warm start a new --workdir with '
                        '--config.checkpoint.init_from.')
    if position['fingerprint'] != self.record['fingerprint']:
      what = (f'the run recorded other data settings: {changed_settings}' if changed_settings
              else f"fingerprint {position['fingerprint'][:16]} there, "
                   f"{self.record['fingerprint'][:16]} here")
      raise DataError(f'The checkpoint was trained on other data ({what}); resume with the same '
                      'data settings, or warm start a new --workdir with '
                      '--config.checkpoint.init_from.')
    saved = position.get('objective')  # Absent from checkpoints of earlier versions.
    # Settings a later version added are not in an earlier checkpoint's record: only those it
    # recorded can differ.
    changed = ', '.join(f'objective.{k}: {saved[k]!r} there, {self.objective.get(k)!r} here'
                        for k in sorted(saved or {}) if saved[k] != self.objective.get(k))
    if changed:
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
    counts = self.train_token_counts + 1.0
    log_probs = np.log(counts / counts.sum())
    total, count = 0.0, 0.0
    for index in range(num_batches):
      rows = self.eval_batch(index)
      mask = rows['weights'] > 0
      total -= log_probs[rows['targets'][mask]].sum()
      count += mask.sum()
    return total / count


@dataclasses.dataclass
class _SyntheticVocabulary:
  """Synthetic tokens have a vocabulary size but no text: nothing to encode or decode, and no
  special ids but padding."""
  vocab_size: int
  pad_id: int = 0
  eos_id: int = None


class _MarkovRows:
  """Adapts the synthetic source to the rows(start, stop) interface."""

  def __init__(self, source, split, seq_len):
    self.source, self.split, self.seq_len = source, split, seq_len
    sample = source.rows(0, 64, seq_len, split)
    self.tokens = sample['tokens'][sample['segment_ids'] > 0]

  def rows(self, start, stop):
    return self.source.rows(start, stop, self.seq_len, self.split)


def checked_tokenizer(config):
  """config.data.tokenizer, checked against the model's vocabulary."""
  try:
    tokenizer = tokenizer_lib.get(config.data.tokenizer, extra_ids=config.data.extra_ids)
  except ValueError as error:
    raise DataError(str(error)) from None
  if tokenizer.vocab_size > config.model.vocab_size:
    raise DataError(f'The {config.data.tokenizer!r} tokenizer has {tokenizer.vocab_size} tokens '
                    f'but model.vocab_size={config.model.vocab_size}; raise model.vocab_size.')
  return tokenizer


def _transform(objective, tokenizer):
  """The objective's data side; a tokenizer without the special tokens it needs is one
  sentence."""
  try:
    return objective.transform(tokenizer)
  except ValueError as error:
    raise DataError(str(error)) from None


def _labeled(config, objective):
  """A pipeline of labelled examples (fine-tuning), one example per row; the objective's module
  says whether labels are class ids (TARGETS = 'classes') or target texts ('text')."""
  t = config.train
  tokenizer = checked_tokenizer(config)
  targets = objectives.data_module(config).TARGETS
  examples, fingerprint, described = labeled.read(config, targets)
  transform = _transform(objective, tokenizer)
  rows = {split: labeled.LabeledRows(examples[split], tokenizer, config.seed, split == 'train',
                                     transform, targets) for split in examples}
  record = dict(source=config.data.source, read=described, fingerprint=fingerprint,
                tokenizer=config.data.tokenizer, train_examples=len(rows['train']),
                validation_examples=len(rows['validation']))
  return Pipeline(t.batch_size, t.seq_len, rows['train'], rows['validation'], tokenizer, record,
                  config.seed, eval_batches=-(-len(rows['validation']) // t.batch_size))


def build(config):
  """The pipeline of `config`'s data for its objective."""
  pipeline = _build(config)
  pipeline.objective = objectives.data_settings(config)
  pipeline.target_len = config.train.get('target_len', 0)  # Sizes encoder-decoder rows too.
  return pipeline


def _build(config):
  d, t = config.data, config.train
  objective = objectives.build(config)
  if objectives.data_module(config).DATA == 'labeled':
    return _labeled(config, objective)
  if d.source == 'markov' and not d.mixture:  # A mixture replaces data.source.
    vocabulary = _SyntheticVocabulary(config.model.vocab_size)
    source = synthetic.MarkovSource(
        config.model.vocab_size, d.markov_branching, config.seed, d.min_doc_len,
        objective.transform(vocabulary))
    record = dict(source='markov', seed=config.seed, fingerprint=source.fingerprint())
    train = _MarkovRows(source, 'train', t.seq_len)
    return Pipeline(t.batch_size, t.seq_len, train, _MarkovRows(source, 'validation', t.seq_len),
                    vocabulary, record, config.seed,
                    train_token_counts=np.bincount(train.tokens, minlength=vocabulary.vocab_size))

  if objectives.data_module(config).DATA == 'cooccurrence':  # Counted once (GloVe).
    return objective.cooccurrence(_documents(config, objective))
  return _documents(config, objective)


def _documents(config, objective):
  """Rows of the configured document sources, tokenized into shards on first use (each process
  of a multi-host job writing its share)."""
  d, t = config.data, config.train
  tokenizer = checked_tokenizer(config)
  transform = _transform(objective, tokenizer)
  entries = sources.specs(d)
  splits = {'train': [], 'validation': []}
  described, frequencies = [], np.zeros(tokenizer.vocab_size)
  total_weight = sum(weight for _, weight in entries)
  for salt, (spec, weight) in enumerate(entries):
    folder, manifest = pretokenize.ensure(spec, d, tokenizer, jax.process_index(),
                                          jax.process_count())  # Each process writes a share.
    for split, rows in splits.items():
      store = shards.TokenStore(folder, manifest, split)
      rows.append(windows.Windows(store, t.seq_len, config.seed, split == 'train', transform,
                                  salt=salt, name=spec))
    counts = splits['train'][-1].store.token_counts()
    frequencies += counts / counts.sum() * weight / total_weight  # As the mixture draws them.
    described.append(dict(spec=spec, weight=weight, tokenized=folder,
                          train_tokens=manifest['splits']['train']['tokens'],
                          train_documents=manifest['splits']['train']['documents'],
                          validation_tokens=manifest['splits']['validation']['tokens'],
                          train_fingerprint=manifest['splits']['train']['fingerprint']))
  weights = [weight for _, weight in entries]
  train, validation = (splits[s][0] if len(entries) == 1 else windows.Mixture(splits[s], weights)
                       for s in ('train', 'validation'))
  fingerprint = hashlib.sha256(repr([(e['spec'], e['weight'], e['train_fingerprint'])
                                     for e in described]).encode()).hexdigest()
  _check_same_everywhere(fingerprint)
  record = dict(sources=described, fingerprint=fingerprint, tokenizer=tokenizer.name,
                tokenizer_fingerprint=tokenizer.fingerprint)
  return Pipeline(t.batch_size, t.seq_len, train, validation, tokenizer, record, config.seed,
                  train_token_counts=frequencies * sum(e['train_tokens'] for e in described))


def _check_same_everywhere(fingerprint):
  """Every host reads its own shards (its own copy of the files, its own Python's stdlib): one
  that tokenized other data would feed other rows into its part of every batch."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  mine = np.frombuffer(bytes.fromhex(fingerprint)[:8], np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  differing = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
  if differing:
    raise DataError(f'Process {differing[0]} tokenized other data than process 0 (another copy '
                    'of the files, or another Python for data.source=stdlib); give every host the '
                    'same data, e.g. in a shared data.tokens_dir.')
