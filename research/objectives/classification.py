"""Sequence and sentence-pair classification (fine-tuning), on any family with a `classify` head.

Rows hold one example each: [CLS] text [SEP] (pair [SEP]) with token types 0 for the text and 1
for the pair, cut longest-first to train.seq_len. The encoder classifies from the first token
([CLS], pooled), the decoder from the last real token. Loss: cross entropy summed over the real
rows of a (micro-)batch, divided by the number of real rows in the global batch. Metrics:
accuracy, and for two classes the F1 of class 1.
"""

import jax.numpy as jnp
import numpy as np

from research import objectives
from research.data import labeled
from research.data import pipeline
from research.data import tokenizer as tokenizer_lib

DATA = 'labeled'  # Reads labelled examples (research/data/labeled.py)...
SETTINGS = ()  # The objective.* keys it reads, besides name: none.
TARGETS = 'classes'  # ...whose labels are class ids.
TERM = 'label'
_TOKEN_FIELDS = ('tokens', 'positions', 'segment_ids', 'token_types')


def check_config(config, family):
  m = config.model
  if not hasattr(family.build(m), 'classify'):
    raise ValueError(f'objective.name=classification needs a family with a classification head; '
                     f'model.family={m.family!r} has none.')
  if m.num_labels < 2:
    raise ValueError(f'objective.name=classification needs model.num_labels >= 2 (it is '
                     f'{m.num_labels}); set it to the number of classes.')
  if config.data.source not in labeled.SOURCES:
    raise ValueError(f'objective.name=classification reads labelled examples; set data.source '
                     f'to one of {list(labeled.SOURCES)} (it is {config.data.source!r}).')
  missing = [k for k in ('train_path', 'validation_path', 'tfds_name', 'validation_split',
                         'text_field', 'pair_field', 'label_field') if k not in config.data]
  if missing:
    raise ValueError(f'objective.name=classification needs the data settings of '
                     f'configs/finetune.py (data.{missing[0]} is missing); start from --config '
                     'configs/finetune.py:TASK.')
  if config.train.seq_len < 3:
    raise ValueError(f'train.seq_len={config.train.seq_len} leaves no room for [CLS] text '
                     '[SEP]; use at least 3.')


class Transform:
  """(text ids, pair ids or None, label) -> one row; None -> a padding row of weight 0."""

  def __init__(self, tokenizer, seq_len, pair_type=1):
    tokenizer_lib.require(tokenizer, ('cls_id', 'sep_id'), 'objective.name=classification')
    self.tokenizer, self.seq_len, self.pair_type = tokenizer, seq_len, pair_type

  def row(self, example):
    t, n = self.tokenizer, self.seq_len
    row = {name: np.zeros((1, n), np.int32) for name in _TOKEN_FIELDS}
    row['tokens'][:] = tokenizer_lib.filler_id(t)
    if example is None:
      return dict(row, label=np.zeros(1, np.int32), label_weight=np.zeros(1, np.float32))
    text, pair, label = example
    room = n - (3 if pair is not None else 2)
    if pair is None:
      text = text[:room]
      ids = np.concatenate([[t.cls_id], text, [t.sep_id]])
    else:
      while len(text) + len(pair) > room:  # Longest first, as BERT cuts pairs.
        text, pair = (text[:-1], pair) if len(text) >= len(pair) else (text, pair[:-1])
      ids = np.concatenate([[t.cls_id], text, [t.sep_id], pair, [t.sep_id]])
    length = len(ids)
    row['tokens'][0, :length] = ids
    row['positions'][0, :length] = np.arange(length)
    row['segment_ids'][0, :length] = 1
    row['token_types'][0, len(text) + 2:length] = self.pair_type
    return dict(row, label=np.full(1, label, np.int32), label_weight=np.ones(1, np.float32))


class Objective:

  def __init__(self, config):
    self.config = config
    self.num_labels = config.model.num_labels
    self.types = objectives.token_types(config.model)

  def fields(self, seq_len):
    fields = objectives.token_fields(seq_len, _TOKEN_FIELDS)
    fields['label'] = objectives.Field((), np.int32, ())
    fields['label_weight'] = objectives.Field((), np.float32, ())
    return fields

  def transform(self, tokenizer):
    return Transform(tokenizer, self.config.train.seq_len, pair_type=int(self.types > 1))

  def counts(self, batch):
    return {TERM: jnp.sum(batch['label_weight'])}

  def tokens(self, batch):
    """Works on host (numpy) and device arrays alike."""
    return (batch['segment_ids'] > 0).astype(np.float32).sum()

  def sums(self, model, params, batch, rng):
    def forward(module):
      inputs = [batch['tokens'], batch['positions'], batch['segment_ids']]
      if self.types:  # Encoders embed sentence A/B; decoders do not.
        inputs.append(batch['token_types'])
      hidden = module(*inputs)
      return module.classify(hidden, batch['segment_ids'])

    logits = objectives.apply(model, params, rng, method=forward)
    weights = batch['label_weight']
    sums = objectives.cross_entropy_sums(logits, batch['label'], weights)
    if self.num_labels == 2:  # Counts for the F1 of class 1.
      predicted, actual = jnp.argmax(logits, axis=-1) == 1, batch['label'] == 1
      sums.update(true_positives=jnp.sum(weights * (predicted & actual)),
                  false_positives=jnp.sum(weights * (predicted & ~actual)),
                  false_negatives=jnp.sum(weights * (~predicted & actual)))
    return {TERM: sums}

  def metric_names(self):
    return ('loss', 'accuracy') + (('f1',) if self.num_labels == 2 else ())

  def metrics(self, totals):
    total = totals[TERM]
    metrics = dict(loss=objectives.ratio(total['loss'], total['count']),
                   accuracy=objectives.ratio(total['correct'], total['count']))
    if self.num_labels == 2:
      tp, fp, fn = (total[k] for k in ('true_positives', 'false_positives', 'false_negatives'))
      metrics['f1'] = objectives.ratio(2 * tp, 2 * tp + fp + fn)
    return metrics

  def flops_per_token(self, family, spec):
    """The body at every position; the head, once per row, is negligible and not counted."""
    return family.body_flops_per_token(spec, self.config.train.seq_len)

  def synthetic_batch(self, rng):
    """Rows of random text with random labels, for benchmarks."""
    c = self.config
    tokenizer = pipeline.checked_tokenizer(c)
    transform = self.transform(tokenizer)
    text = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.special_ids)
    rows = [transform.row((rng.choice(text, c.train.seq_len), None,
                           int(rng.integers(self.num_labels)))) for _ in range(c.train.batch_size)]
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}

