"""Masked language modelling (BERT, RoBERTa, ALBERT), optionally with a sentence-pair task.

Data side, per example (a chunk of a document):
  pair='none'      [CLS] chunk [SEP]; several examples are packed into a row (segment ids keep
                   them apart), as RoBERTa packs full sentences.
  pair='nsp'/'sop' [CLS] A [SEP] B [SEP], one example per row, with token types 0 (A) and 1 (B):
                   the chunk is split at a random point; half the examples are negatives: for
                   NSP (BERT) B is replaced by text of another document, for SOP (ALBERT) A and
                   B swap places. pair_label is 1 for a negative.
Masking: `mask_rate` of each example's text tokens (never a special token or padding), at least
one, are chosen (whole words when `whole_word`); of those, `mask_token_rate` become [MASK],
`random_token_rate` a random text token, and the rest stay unchanged. The randomness of an
example is drawn from (seed, example index), plus the epoch when `dynamic_masking` (RoBERTa),
so static masks repeat in every epoch and both kinds are reproducible on resume.
Each packed row gathers its chosen positions into `max_predictions` slots (mlm_positions,
mlm_targets, mlm_weights); a row with more chosen tokens keeps the first ones and restores the
others' inputs, so every masked input is predicted.

Loss terms: 'mlm' (cross entropy over the gathered positions, divided by the number of
predictions in the global batch) and the pair task's (cross entropy of the pooled output's
2-way head, divided by the number of rows in the global batch).
"""

import jax.numpy as jnp
import numpy as np

from research import objectives
from research.objectives import chunked_loss
from research.data import packing
from research.data import pipeline
from research.data import sources
from research.data import tokenizer as tokenizer_lib

DATA = 'documents'
# The objective.* keys it reads, besides name.
SETTINGS = ('mask_rate', 'mask_token_rate', 'random_token_rate', 'max_predictions', 'pair',
            'whole_word', 'dynamic_masking')
PAIRS = ('none', 'nsp', 'sop')
_SALT = 0x4D4C4D  # Separates this objective's random streams from the data order's.


def check_config(config, family):
  o, m, t = config.objective, config.model, config.train
  if not hasattr(family.build(m), 'mlm_logits'):
    raise ValueError(f'objective.name=mlm needs a family with a masked-LM head; '
                     f'model.family={m.family!r} has none (start from a variant of '
                     'configs/encoder.py).')
  if config.data.source not in sources.KINDS:
    raise ValueError('objective.name=mlm needs documents of text with special tokens; set '
                     f'data.source to one of {list(sources.KINDS)} (it is '
                     f'{config.data.source!r}).')
  if o.pair not in PAIRS:
    raise ValueError(f'objective.pair={o.pair!r} is not one of {list(PAIRS)}.')
  if o.pair != m.pair_head:
    raise ValueError(f'objective.pair={o.pair!r} needs model.pair_head={o.pair!r} (it is '
                     f'{m.pair_head!r}); set both to the same task.')
  if not 0 < o.mask_rate < 1:
    raise ValueError(f'objective.mask_rate={o.mask_rate} must lie in (0, 1).')
  shares = (o.mask_token_rate, o.random_token_rate)
  if min(shares) < 0 or sum(shares) > 1:
    raise ValueError(f'objective.mask_token_rate={o.mask_token_rate} and objective.'
                     f'random_token_rate={o.random_token_rate} must be non-negative shares '
                     'that add up to at most 1.')
  if not 1 <= o.max_predictions <= t.seq_len:
    raise ValueError(f'objective.max_predictions={o.max_predictions} must lie in [1, '
                     f'train.seq_len={t.seq_len}] (about 15% of seq_len, e.g. 20 at 128).')
  chosen = round(o.mask_rate * (t.seq_len - 2))
  if o.max_predictions < chosen:
    raise ValueError(f'objective.max_predictions={o.max_predictions} is fewer than the about '
                     f'{chosen} tokens objective.mask_rate={o.mask_rate} chooses in rows of '
                     f'train.seq_len={t.seq_len}; raise it (BERT: 20 at 128, 80 at 512).')
  if t.seq_len < 5:
    raise ValueError(f'train.seq_len={t.seq_len} leaves no room for [CLS] A [SEP] B [SEP]; '
                     'use at least 5.')
  chunked_loss.check_config(config, family, o.max_predictions, 'objective.max_predictions')


class Transform:
  """Documents -> masked examples -> packed rows with gathered predictions."""

  def __init__(self, config, tokenizer):
    tokenizer_lib.require(tokenizer, ('cls_id', 'sep_id', 'mask_id'), 'objective.name=mlm')
    o = config.objective
    self.seed = config.seed
    self.rate, self.max_predictions, self.pair = o.mask_rate, o.max_predictions, o.pair
    self.mask_share, self.random_share = o.mask_token_rate, o.random_token_rate
    self.dynamic, self.whole_word = o.dynamic_masking, o.whole_word
    self.tokenizer = tokenizer
    self.one_per_row = self.pair != 'none'  # A pair's label belongs to its whole row.
    self.pair_type = int(objectives.token_types(config.model) > 1)
    self.special = np.asarray(tokenizer.special_ids)
    # Random replacements are text tokens, never special ones.
    self.text_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), self.special)

  def packed_fields(self, seq_len):
    names = ('tokens', 'positions', 'segment_ids', 'token_types', 'mlm_labels',
             'mlm_token_weights', 'pair_label')
    return objectives.token_fields(seq_len, names, tokenizer_lib.filler_id(self.tokenizer))

  def span(self, seq_len):
    """(document tokens per example at most, stride): room for [CLS], [SEP] (and a second
    [SEP] between the pair)."""
    size = seq_len - (3 if self.pair != 'none' else 2)
    return size, size

  def capacity(self, seq_len):
    """Row positions to fill (one stream)."""
    return seq_len

  def pack(self, examples, seq_len):
    return packing.pack_examples(examples, 1, seq_len, self.packed_fields(seq_len))[0]

  def positions(self, length):
    return length + (3 if self.pair != 'none' else 2)

  def _rng(self, index, epoch):
    index = tuple(index) if isinstance(index, tuple) else (index,)
    return np.random.default_rng((self.seed, _SALT) + index + (epoch if self.dynamic else 0,))

  def _pair(self, tokens, index, rng, split):
    """(ids, token types, label) of [CLS] A [SEP] B [SEP] from one chunk."""
    t = self.tokenizer
    cut = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else len(tokens)
    first, second = tokens[:cut], tokens[cut:]
    negative = bool(rng.random() < 0.5)
    if negative and self.pair == 'sop':
      first, second = second, first
    elif negative and self.pair == 'nsp':
      second = split.other_document_text(index, max(len(second), 1), rng)
    ids = np.concatenate([[t.cls_id], first, [t.sep_id], second, [t.sep_id]]).astype(np.int32)
    types = np.zeros(len(ids), np.int32)
    types[len(first) + 2:] = self.pair_type
    return ids, types, int(negative)

  def _choose(self, ids, rng):
    """Positions chosen for prediction among the text tokens of `ids`."""
    candidates = np.flatnonzero(~np.isin(ids, self.special))
    if len(candidates) == 0:
      return candidates
    count = min(self.max_predictions, max(1, int(round(len(candidates) * self.rate))))
    if not self.whole_word:
      return np.sort(rng.permutation(candidates)[:count])
    words = self.tokenizer.word_ids(ids[candidates])
    chosen = []
    for word in rng.permutation(words[-1] + 1):  # Whole words while they fit the budget...
      members = candidates[words == word]
      if len(chosen) + len(members) <= count or not chosen:  # ...and at least one word.
        chosen.extend(members)
    return np.sort(np.asarray(chosen, np.int64))

  def example(self, tokens, index, epoch, split):
    t = self.tokenizer
    rng = self._rng(index, epoch)
    tokens = np.asarray(tokens, np.int32)
    if self.pair == 'none':
      ids = np.concatenate([[t.cls_id], tokens, [t.sep_id]]).astype(np.int32)
      types, label = np.zeros(len(ids), np.int32), 0
    else:
      ids, types, label = self._pair(tokens, index, rng, split)
    chosen = self._choose(ids, rng)
    inputs, labels, weights = ids.copy(), np.zeros_like(ids), np.zeros(len(ids), np.float32)
    labels[chosen], weights[chosen] = ids[chosen], 1.0
    draw = rng.random(len(chosen))
    masked = chosen[draw < self.mask_share]
    replaced = chosen[(draw >= self.mask_share) & (draw < self.mask_share + self.random_share)]
    inputs[masked] = t.mask_id
    inputs[replaced] = rng.choice(self.text_ids, len(replaced))
    return dict(tokens=inputs, token_types=types, mlm_labels=labels, mlm_token_weights=weights,
                pair_label=np.full(len(ids), label, np.int32))

  def finish_row(self, row):
    """Gathers a packed row's chosen positions into max_predictions slots."""
    chosen = np.flatnonzero(row['mlm_token_weights'][0])
    kept, dropped = chosen[:self.max_predictions], chosen[self.max_predictions:]
    tokens = row['tokens'].copy()
    tokens[0, dropped] = row['mlm_labels'][0, dropped]  # Not predicted: shown as they are.
    gathered = packing.empty_rows(mlm_fields(self.max_predictions), 1)
    gathered['mlm_positions'][0, :len(kept)] = kept
    gathered['mlm_targets'][0, :len(kept)] = row['mlm_labels'][0, kept]
    gathered['mlm_weights'][0, :len(kept)] = 1.0
    batch = dict(tokens=tokens, positions=row['positions'], segment_ids=row['segment_ids'],
                 token_types=row['token_types'], **gathered)
    if self.pair != 'none':
      batch['pair_label'] = row['pair_label'][:, 0]
    return batch


def mlm_fields(max_predictions):
  return {name: objectives.Field((max_predictions,), np.float32 if name == 'mlm_weights'
                                 else np.int32, ('predictions',))
          for name in ('mlm_positions', 'mlm_targets', 'mlm_weights')}


class Objective:

  def __init__(self, config):
    self.config = config
    self.pair = config.objective.pair
    self.loss_chunk = chunked_loss.chunk_size(config, config.objective.max_predictions)

  def fields(self, seq_len):
    fields = objectives.token_fields(seq_len, ('tokens', 'positions', 'segment_ids',
                                               'token_types'))
    fields.update(mlm_fields(self.config.objective.max_predictions))
    if self.pair != 'none':
      fields['pair_label'] = objectives.Field((), np.int32, ())
    return fields

  def transform(self, tokenizer):
    return Transform(self.config, tokenizer)

  def counts(self, batch):
    counts = {'mlm': jnp.sum(batch['mlm_weights'].astype(jnp.float32))}
    if self.pair != 'none':
      counts[self.pair] = jnp.asarray(batch['pair_label'].shape[0], jnp.float32)
    return counts

  def tokens(self, batch):
    """Works on host (numpy) and device arrays alike."""
    return (batch['segment_ids'] > 0).astype(np.float32).sum()

  def sums(self, model, params, batch, rng):
    pair = self.pair
    chunked = chunked_loss.uses_chunks(model, self.loss_chunk)

    def forward(module):
      hidden = module(batch['tokens'], batch['positions'], batch['segment_ids'],
                      batch['token_types'])
      # Only the gathered positions go through the vocabulary projection.
      gathered = jnp.take_along_axis(hidden, batch['mlm_positions'][..., None], axis=1)
      if chunked:
        logits = {'mlm': chunked_loss.head_sums(module, gathered, batch['mlm_targets'],
                                                batch['mlm_weights'], self.loss_chunk)}
      else:
        logits = {'mlm': module.mlm_logits(gathered)}
      if pair != 'none':
        logits[pair] = module.pair_logits(module.pooled(hidden))
      return logits

    logits = objectives.apply(model, params, rng, method=forward)
    sums = {'mlm': logits['mlm'] if chunked else objectives.cross_entropy_sums(
        logits['mlm'], batch['mlm_targets'], batch['mlm_weights'])}
    if pair != 'none':
      sums[pair] = objectives.cross_entropy_sums(logits[pair], batch['pair_label'],
                                                 jnp.ones(batch['pair_label'].shape))
    return sums

  def metric_names(self):
    terms = ('mlm',) + ((self.pair,) if self.pair != 'none' else ())
    return ('loss',) + tuple(f'{t}_{k}' for t in terms for k in ('loss', 'accuracy'))

  def metrics(self, totals):
    metrics, loss = {}, 0.0
    for term, total in totals.items():
      metrics[f'{term}_loss'] = objectives.ratio(total['loss'], total['count'])
      metrics[f'{term}_accuracy'] = objectives.ratio(total['correct'], total['count'])
      loss += metrics[f'{term}_loss']
    return dict(loss=loss, **metrics)

  def flops_per_token(self, family, spec):
    """The body at every position, the MLM head at the gathered positions and the pooler and
    pair head once per row, spread over the row's positions."""
    t = self.config.train.seq_len
    flops = (family.body_flops_per_token(spec, t)
             + family.mlm_head_flops_per_position(spec) * self.config.objective.max_predictions / t)
    if self.pair != 'none':
      flops += family.pair_head_flops_per_example(spec) / t
    return flops

  def synthetic_batch(self, rng):
    """Rows of random text tokens, masked and gathered as in training, for benchmarks."""
    c = self.config
    transform = Transform(c, pipeline.checked_tokenizer(c))
    size = transform.span(c.train.seq_len)[0]
    split = _SyntheticSplit(rng, size, transform)
    rows = []
    for row in range(c.train.batch_size):
      tokens = rng.choice(transform.text_ids, size)
      example = transform.example(tokens, (0, 0, row, 0), 0, split)
      packed = packing.pack_examples([example], 1, c.train.seq_len,
                                     transform.packed_fields(c.train.seq_len))[0]
      rows.append(transform.finish_row(packed))
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


class _SyntheticSplit:
  """Random text for the NSP negatives of synthetic batches."""

  def __init__(self, rng, size, transform):
    self._rng, self._size, self._text = rng, size, transform.text_ids

  def other_document_text(self, index, length, rng):
    del index, rng  # Every row is a document of its own.
    return self._rng.choice(self._text, min(length, self._size))
