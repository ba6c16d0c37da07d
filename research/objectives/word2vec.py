"""word2vec with negative sampling (Mikolov et al. 2013): skip-gram and CBOW, by objective.name.

Data side: documents of word ids (a word-level tokenizer, see research/word_vectors.py `vocab`)
are cut into windows of seq_len words and packed into rows with segment ids, as for language
modelling; each word carries `weights` (0 for special tokens such as [UNK], which word2vec drops
before it forms windows) and `noise`, a random 31-bit seed drawn from (seed, window, epoch).

Device side, vectorised over the whole row: frequent words are dropped with word2vec's
probability 1 - (sqrt(f / t) + 1) t / f (objective.subsample = t; 0 keeps every word), the
remaining words of a row are moved to its front in order, and each pairs with the words at most
objective.window places away in the same segment. Skip-gram scores the input vector of the
centre against the output vectors of each context word and of objective.negatives words drawn
per pair from the unigram distribution ** 0.75; CBOW scores the mean input vector of the context
against the output vectors of the centre and of its negatives. A negative equal to the word it
stands against is left out, as word2vec's code does. Every draw is a hash of the seeds in the
batch (not jax.random, which compiles slowly per key), so a step is a pure function of (seed,
step) on any mesh.

The unigram counts are those of the training split, which tokenizing counted once: they are read
from the tokenized shards (research/data/shards.py) when the step is first traced.

Loss per pair (skip-gram) or centre (CBOW): -log s(u.v) - sum_k log s(-u_k.v), summed and divided
by the pairs (centres) of the whole global batch. `accuracy`: the share whose positive scores
above every negative.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from research import objectives
from research.data import packing
from research.data import pipeline
from research.data import pretokenize
from research.data import shards
from research.data import sources

TERM = 'pairs'
FIELDS = ('tokens', 'weights', 'noise', 'positions', 'segment_ids')
DATA = 'documents'
SETTINGS = ('window', 'negatives', 'subsample')  # The objective.* keys it reads, besides name.
NAMES = ('skipgram', 'cbow')
NOISE_POWER = 0.75
_SALT = 0x77327663  # Separates these draws from other objectives' on the same windows.


def check_config(config, family):
  del family
  o = config.objective
  if config.model.family != 'word_vectors':
    raise ValueError(f'objective.name={o.name} trains word vectors, which model.family='
                     f'{config.model.family!r} does not; start from a variant of '
                     'configs/word_vectors.py.')
  objectives.check_word_documents(config, reads='reads documents of words')
  if config.model.biases:
    raise ValueError(f'objective.name={o.name} uses no biases; set model.biases=False.')
  if o.window < 1 or o.negatives < 1:
    raise ValueError(f'objective.window={o.window} and objective.negatives={o.negatives} must '
                     'both be at least 1.')
  if not 0 <= o.subsample < 1:
    raise ValueError(f'objective.subsample={o.subsample} must lie in [0, 1) (0 keeps every '
                     'word; word2vec uses 1e-3 or 1e-5).')


def training_frequencies(config):
  """Word frequencies of the training split (special tokens 0), as the pipeline mixes its
  sources: read from the counts that tokenizing wrote beside the shards, not recounted."""
  d = config.data
  # The pipeline's own check: a command that never builds the pipeline (plan, bench) reads here.
  tokenizer = pipeline.checked_tokenizer(config)
  entries = sources.specs(d)
  total = sum(weight for _, weight in entries)
  frequencies = np.zeros(config.model.vocab_size)
  for spec, weight in entries:
    folder, manifest = pretokenize.ensure(spec, d, tokenizer)
    counts = shards.TokenStore(folder, manifest, 'train').token_counts().astype(np.float64)
    counts[list(tokenizer.special_ids)] = 0
    frequencies[:len(counts)] += counts / max(counts.sum(), 1.0) * weight / total
  return frequencies


def noise_cdf(frequencies):
  """The cumulative distribution of frequencies ** 0.75 (float32, ending at exactly 1)."""
  weights = np.asarray(frequencies, np.float64) ** NOISE_POWER
  if weights.sum() <= 0:
    raise sources.DataError('The training split holds no words to draw negatives from (every '
                            'token is special, such as [UNK]); check data.tokenizer and '
                            'data.paths.')
  cdf = np.cumsum(weights) / weights.sum()
  cdf[-1] = 1.0
  return cdf.astype(np.float32)


def keep_probabilities(frequencies, threshold):
  """word2vec's chance of keeping each word: (sqrt(f / t) + 1) t / f, at most 1 (t = 0: 1)."""
  f = np.asarray(frequencies, np.float64)
  if threshold <= 0:
    return np.ones(len(f), np.float32)
  keep = np.where(f > 0, (np.sqrt(f / threshold) + 1) * threshold / np.maximum(f, 1e-300), 1.0)
  return np.minimum(keep, 1.0).astype(np.float32)


def _mix(x):
  """A 32-bit integer hash (Wellons' lowbias32): every bit of the input moves every bit out."""
  x ^= x >> 16
  x *= jnp.uint32(0x7FEB352D)
  x ^= x >> 15
  x *= jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _uniform(seeds, stream, shape):
  """Uniform [0, 1) draws of `shape` per seed: [*seeds.shape, *shape], the hash of (seed,
  stream, draw). A stateless hash, not jax.random: as independent of the sharding, and it
  compiles in a fraction of the time on CPU."""
  draws = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
  base = _mix(seeds.astype(jnp.uint32) ^ _mix(jnp.uint32(stream + 1)))
  bits = _mix(base.reshape(seeds.shape + (1,) * len(shape)) + draws * jnp.uint32(0x9E3779B9))
  return (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def draw_negatives(cdf, seeds, shape):
  """Word ids [*seeds.shape, *shape] drawn from the distribution whose cumulative is `cdf`."""
  cdf = jnp.asarray(cdf)
  ids = jnp.searchsorted(cdf, _uniform(seeds, 1, shape), side='right')
  return jnp.minimum(ids, cdf.shape[0] - 1).astype(jnp.int32)


def pair_positions(segment_ids, keep, window):
  """The (centre, context) pairs of rows [B, L] once the words not kept are removed.

  Returns (order, context, valid): order [B, L] puts the kept positions first, in order (the
  compacted row is x[order]); context [B, L, 2 * window] indexes the compacted row; valid says
  which (compacted centre, context) pairs exist: both kept, in the same segment, at most
  `window` compacted places apart.
  """
  order = jnp.argsort(~keep, axis=1, stable=True)
  kept = jnp.take_along_axis(keep, order, axis=1)
  segments = jnp.where(kept, jnp.take_along_axis(segment_ids, order, axis=1), 0)
  length = segment_ids.shape[1]
  offsets = jnp.asarray([d for d in range(-window, window + 1) if d], jnp.int32)
  context = jnp.arange(length)[:, None] + offsets  # [L, 2W]
  inside = (context >= 0) & (context < length)
  context = jnp.broadcast_to(jnp.clip(context, 0, length - 1), segments.shape + offsets.shape)
  context_segments = jnp.take_along_axis(segments[:, :, None], context, axis=1)
  valid = inside & (segments[:, :, None] > 0) & (context_segments == segments[:, :, None])
  return order, context, valid


class Transform:
  """Documents -> windows of words with their weights and seeds; rows need no finishing."""

  def __init__(self, special_ids=()):
    self.special_ids = np.asarray(sorted(special_ids), np.int32)

  def packed_fields(self, seq_len):
    return objectives.token_fields(seq_len, FIELDS)

  def span(self, seq_len):
    """Windows of seq_len words, back to back: every word is a centre once per epoch."""
    return seq_len, seq_len

  def capacity(self, seq_len):
    return seq_len

  def positions(self, length):
    return length

  def pack(self, examples, seq_len):
    return packing.pack_examples(examples, 1, seq_len, self.packed_fields(seq_len))[0]

  def example(self, tokens, index, epoch, split):
    rng = np.random.default_rng((split.seed, _SALT) + tuple(index) + (epoch,))
    return dict(tokens=tokens, weights=(~np.isin(tokens, self.special_ids)).astype(np.float32),
                noise=rng.integers(0, 2**31 - 1, len(tokens), dtype=np.int32))

  def finish_row(self, row):
    return row


class Objective:

  def __init__(self, config, frequencies=None):
    """frequencies: the training split's word frequencies; read from the tokenized shards when
    not given (see training_frequencies)."""
    self.config = config
    o = config.objective
    if o.name not in NAMES:
      raise ValueError(f'objective.name={o.name!r} is not one of {list(NAMES)}.')
    self.cbow = o.name == 'cbow'
    self.window, self.negatives, self.subsample = o.window, o.negatives, o.subsample
    self._frequencies = frequencies
    self._tables = None

  def tables(self):
    """(noise cdf, keep probabilities), float32 [vocab] each, computed once."""
    if self._tables is None:
      if self._frequencies is None:
        self._frequencies = training_frequencies(self.config)
      frequencies = np.zeros(self.config.model.vocab_size)
      frequencies[:len(self._frequencies)] = self._frequencies
      frequencies /= max(frequencies.sum(), 1e-300)
      self._tables = noise_cdf(frequencies), keep_probabilities(frequencies, self.subsample)
    return self._tables

  def fields(self, seq_len):
    return objectives.token_fields(seq_len, FIELDS)

  def transform(self, tokenizer):
    return Transform(getattr(tokenizer, 'special_ids', ()))

  def _pairs(self, batch):
    """The compacted rows and their pairs (see pair_positions), subsampled when asked."""
    keep = batch['weights'] > 0
    if self.subsample > 0:
      keep_probability = jnp.asarray(self.tables()[1])[batch['tokens']]
      keep &= _uniform(batch['noise'], 0, ()) < keep_probability
    order, context, valid = pair_positions(batch['segment_ids'], keep, self.window)
    tokens, noise = (jnp.take_along_axis(batch[k], order, axis=1) for k in ('tokens', 'noise'))
    context_tokens = jnp.take_along_axis(tokens[:, :, None], context, axis=1)
    return tokens, noise, context_tokens, valid

  def counts(self, batch):
    valid = self._pairs(batch)[-1]
    if self.cbow:
      return {TERM: jnp.sum(jnp.any(valid, axis=-1).astype(jnp.float32))}
    return {TERM: jnp.sum(valid.astype(jnp.float32))}

  def tokens(self, batch):
    """Works on host (numpy) and device arrays alike."""
    return batch['weights'].astype(np.float32).sum()

  def sums(self, model, params, batch, rng):
    del rng  # Every draw comes from the batch's seeds.
    tokens, noise, context_tokens, valid = self._pairs(batch)
    cdf = self.tables()[0]
    if self.cbow:
      negatives = draw_negatives(cdf, noise, (self.negatives,))  # [B, L, K]
      targets, mask = tokens, jnp.any(valid, axis=-1)

      def scores(module):
        inputs = module(context_tokens) * valid[..., None]
        hidden = inputs.sum(-2) / jnp.maximum(valid.sum(-1, keepdims=True), 1)
        return (jnp.einsum('bld,bld->bl', hidden, module.context(tokens)),
                jnp.einsum('bld,blkd->blk', hidden, module.context(negatives)))
    else:
      negatives = draw_negatives(cdf, noise, (2 * self.window, self.negatives))  # [B, L, 2W, K]
      targets, mask = context_tokens, valid

      def scores(module):
        centres = module(tokens)
        return (jnp.einsum('bld,blcd->blc', centres, module.context(context_tokens)),
                jnp.einsum('bld,blckd->blck', centres, module.context(negatives)))
    positive, negative = objectives.apply(model, params, None, method=scores)
    return {TERM: pair_sums(positive, negative, mask, negatives != targets[..., None])}

  def metric_names(self):
    return ('loss', 'accuracy')

  def metrics(self, totals):
    t = totals[TERM]
    return dict(loss=objectives.ratio(t['loss'], t['count']),
                accuracy=objectives.ratio(t['correct'], t['count']))

  def flops_per_token(self, family, spec):
    """Per word: skip-gram scores 2 * window pairs against 1 + negatives words; CBOW sums the
    2 * window context vectors and scores 1 + negatives words."""
    pairs = 1 if self.cbow else 2 * self.window
    return family.dot_flops(spec) * (pairs * (1 + self.negatives)
                                     + (2 * self.window if self.cbow else 0))

  def synthetic_batch(self, rng):
    """Full rows of uniform random words (one document per row), for benchmarks."""
    c = self.config
    b, t = c.train.batch_size, c.train.seq_len
    return dict(tokens=rng.integers(0, c.model.vocab_size, (b, t), dtype=np.int32),
                weights=np.ones((b, t), np.float32),
                noise=rng.integers(0, 2**31 - 1, (b, t), dtype=np.int32),
                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                segment_ids=np.ones((b, t), np.int32))


def pair_sums(positive, negative, mask, negative_mask):
  """{'loss', 'correct'} of scores `positive` [...] and `negative` [..., K] where `mask` holds
  (the negatives where both masks hold): -log s(pos) - sum log s(-neg), and whether the positive
  scores above every negative."""
  positive, negative = positive.astype(jnp.float32), negative.astype(jnp.float32)
  negative_mask = negative_mask & mask[..., None]
  loss = (-jax.nn.log_sigmoid(positive) * mask
          - jnp.sum(jax.nn.log_sigmoid(-negative) * negative_mask, axis=-1))
  beaten = jnp.any((negative >= positive[..., None]) & negative_mask, axis=-1)
  return dict(loss=jnp.sum(loss), correct=jnp.sum((mask & ~beaten).astype(jnp.float32)))
