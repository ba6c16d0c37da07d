"""What every encoder-decoder objective shares: the batch spec, the loss and the metrics.

A row holds two streams, packed example by example (research/data/packing.py `pack_pairs`):
train.seq_len encoder positions (the inputs) and train.target_len decoder positions (the targets,
fed to the decoder shifted right with each example starting from the padding id, as T5 does).
Positions within each example are packed too (as T5X packs them), though T5's relative bias
reads each token's place in the row: within one example both give the same distances.
The objectives differ only in how an example's inputs and targets are made from a piece of a
document (span_corruption.py, prefix_lm.py, ul2.py) or read from labelled pairs (seq2seq.py).

Loss: cross entropy over real targets, optionally label-smoothed (shifted so that a perfect
prediction costs 0, as T5X does) and with T5X's z-loss (z_loss * log(Z)^2 per target, which keeps
the softmax normaliser near 1 in low precision), summed and divided by the number of real targets
of the whole global batch. Metrics: the loss, plain cross entropy and perplexity, token accuracy
and sequence accuracy (an example counts when every one of its targets is predicted).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from research import objectives
from research.objectives import chunked_loss
from research.data import packing
from research.data import pipeline
from research.data import sources
from research.data import tokenizer as tokenizer_lib

TERM = 'lm'
LOSS_SETTINGS = ('z_loss', 'label_smoothing')  # objective.* keys of every text-to-text loss.
ENCODER_FIELDS = ('encoder_tokens', 'encoder_positions', 'encoder_segment_ids')
DECODER_FIELDS = ('decoder_tokens', 'decoder_targets', 'decoder_weights', 'decoder_positions',
                  'decoder_segment_ids')


def check_config(config, family, name, reads=sources.KINDS):
  """What every encoder-decoder objective needs of the config (`name`: the objective's)."""
  o, t = config.objective, config.train
  if not getattr(family, 'IS_ENCODER_DECODER', False):
    raise ValueError(f'objective.name={name} trains an encoder-decoder; model.family='
                     f'{config.model.family!r} is not one (start from a variant of '
                     'configs/encoder_decoder.py).')
  if 'target_len' not in t:
    raise ValueError(f'objective.name={name} needs train.target_len (decoder positions per row); '
                     'start from --config configs/encoder_decoder.py:VARIANT.')
  if t.target_len < 2:
    raise ValueError(f'train.target_len={t.target_len} leaves no decoder positions for a target '
                     'and its EOS; set it to at least 2.')
  if t.target_len > config.model.max_len:
    raise ValueError(f'train.target_len={t.target_len} exceeds model.max_len='
                     f'{config.model.max_len}; shorten the targets or raise max_len.')
  if config.data.source not in reads:
    raise ValueError(f'objective.name={name} reads {", ".join(reads)} data; set data.source to '
                     f'one of {list(reads)} (it is {config.data.source!r}).')
  if not 0 <= o.label_smoothing < 1:
    raise ValueError(f'objective.label_smoothing={o.label_smoothing} must lie in [0, 1).')
  if o.z_loss < 0:
    raise ValueError(f'objective.z_loss={o.z_loss} must not be negative (T5X uses 1e-4).')
  chunked_loss.check_config(config, family, t.target_len, 'train.target_len')


def fields(seq_len, target_len, pad_id=0):
  row = objectives.token_fields(seq_len, ENCODER_FIELDS)
  row['encoder_tokens'] = objectives.Field((seq_len,), np.int32, ('length',), pad_id)
  row.update(objectives.token_fields(target_len, DECODER_FIELDS))
  row['decoder_tokens'] = objectives.Field((target_len,), np.int32, ('length',), pad_id)
  row['decoder_targets'] = objectives.Field((target_len,), np.int32, ('length',), pad_id)
  return row


class Transform:
  """The data side shared by the document objectives: rows of two streams. Subclasses give
  `span`, `positions` (an upper bound per stream, for the room left in a row) and `example`
  (-> dict(inputs=ids, targets=ids), each ending with EOS)."""
  SALT = 0

  def __init__(self, config, tokenizer, purpose):
    tokenizer_lib.require(tokenizer, ('eos_id',), purpose)
    self.tokenizer, self.seed = tokenizer, config.seed
    self.eos = np.asarray([tokenizer.eos_id], np.int32)
    self.pad_id = tokenizer_lib.filler_id(tokenizer)
    self.target_len = config.train.target_len

  def packed_fields(self, seq_len):
    return fields(seq_len, self.target_len, self.pad_id)

  def capacity(self, seq_len):
    """(encoder, decoder) positions of a row."""
    return seq_len, self.target_len

  def pack(self, examples, seq_len):
    return packing.pack_pairs(examples, seq_len, self.target_len, self.packed_fields(seq_len),
                              start_id=self.pad_id)

  def finish_row(self, row):
    return row

  def rng(self, index, epoch):
    """An example's randomness: from the seed, its place and the epoch (new noise each epoch,
    as T5's pipeline draws it anew)."""
    return np.random.default_rng((self.seed, self.SALT) + tuple(index) + (epoch,))

  def with_eos(self, ids):
    return np.concatenate([np.asarray(ids, np.int32), self.eos])


def token_terms(logits, targets, z_loss=0.0, label_smoothing=0.0):
  """(training loss, cross entropy) per position, float32."""
  logits = logits.astype(jnp.float32)
  return stats_terms(jax.nn.logsumexp(logits, axis=-1),
                     jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0],
                     jnp.sum(logits, axis=-1), logits.shape[-1], z_loss, label_smoothing)


def stats_terms(log_z, target_logit, logit_sum, vocab, z_loss=0.0, label_smoothing=0.0):
  """token_terms from per-position log Z, target logit and sum of the logits (what a chunked
  loss keeps of the logits, research/objectives/chunked_loss.py)."""
  target_log_p = target_logit - log_z
  cross_entropy = -target_log_p
  loss = cross_entropy
  if label_smoothing:
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    others = logit_sum - vocab * log_z - target_log_p  # Sum of the other log p.
    # The smoothed distribution's own entropy: a perfect prediction then costs 0.
    floor = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    loss = -(confidence * target_log_p + low * others) - floor
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return loss, cross_entropy


def sequence_counts(correct, weights, segment_ids):
  """(examples, examples with every target right) of packed rows: an example is a (row, segment)
  with real targets."""
  rows, length = segment_ids.shape
  ids = (jnp.arange(rows)[:, None] * (length + 1) + segment_ids).reshape(-1)
  real = (weights > 0).astype(jnp.float32).reshape(-1)
  wrong = jax.ops.segment_sum(real * (1.0 - correct.reshape(-1)), ids, rows * (length + 1))
  targets = jax.ops.segment_sum(real, ids, rows * (length + 1))
  examples = targets > 0
  return jnp.sum(examples.astype(jnp.float32)), jnp.sum((examples & (wrong == 0)).astype(
      jnp.float32))


class Objective:
  """Shared by every encoder-decoder objective; `transform` is the subclass's own."""

  def __init__(self, config):
    self.config = config
    self.target_len = config.train.target_len
    self.z_loss = config.objective.get('z_loss', 0.0)
    self.label_smoothing = config.objective.get('label_smoothing', 0.0)
    self.loss_chunk = chunked_loss.chunk_size(config, self.target_len)

  def fields(self, seq_len):
    return fields(seq_len, self.target_len)

  def counts(self, batch):
    return {TERM: jnp.sum(batch['decoder_weights'].astype(jnp.float32))}

  def tokens(self, batch):
    """Real encoder and decoder tokens; works on host (numpy) and device arrays alike."""
    return ((batch['encoder_segment_ids'] > 0).astype(np.float32).sum()
            + batch['decoder_weights'].astype(np.float32).sum())

  def sums(self, model, params, batch, rng):
    targets, weights = batch['decoder_targets'], batch['decoder_weights'].astype(jnp.float32)
    chunked = chunked_loss.uses_chunks(model, self.loss_chunk)

    def forward(module):
      hidden = module(batch['encoder_tokens'], batch['decoder_tokens'],
                      batch['encoder_segment_ids'], batch['decoder_segment_ids'])
      if chunked:
        return chunked_loss.head_stats(module, hidden, targets, self.loss_chunk)
      return module.logits(hidden)

    out = objectives.apply(model, params, rng, method=forward)
    if chunked:
      loss, cross_entropy = stats_terms(out['log_z'], out['target_logit'], out['logit_sum'],
                                        self.config.model.vocab_size, self.z_loss,
                                        self.label_smoothing)
      correct = out['correct']
    else:
      loss, cross_entropy = token_terms(out, targets, self.z_loss, self.label_smoothing)
      correct = (jnp.argmax(out, axis=-1) == targets).astype(jnp.float32)
    examples, examples_correct = sequence_counts(correct, weights, batch['decoder_segment_ids'])
    return {TERM: dict(loss=jnp.sum(loss * weights), cross_entropy=jnp.sum(cross_entropy * weights),
                       correct=jnp.sum(correct * weights), examples=examples,
                       examples_correct=examples_correct)}

  def metric_names(self):
    return ('loss', 'cross_entropy', 'perplexity', 'accuracy', 'sequence_accuracy')

  def metrics(self, totals):
    lm = totals[TERM]
    cross_entropy = objectives.ratio(lm['cross_entropy'], lm['count'])
    return dict(loss=objectives.ratio(lm['loss'], lm['count']), cross_entropy=cross_entropy,
                perplexity=math.exp(min(cross_entropy, 50.0)),
                accuracy=objectives.ratio(lm['correct'], lm['count']),
                sequence_accuracy=objectives.ratio(lm['examples_correct'], lm['examples']))

  def flops_per_token(self, family, spec):
    """Model FLOPs of a full row over its encoder and decoder positions (throughput counts
    tokens of both streams)."""
    s, t = self.config.train.seq_len, self.target_len
    return family.flops_per_row(spec, s, t) / (s + t)

  def synthetic_batch(self, rng):
    """Full rows of one example each (random ids, EOS last), for benchmarks."""
    c = self.config
    b, s, t = c.train.batch_size, c.train.seq_len, self.target_len
    tokenizer = pipeline.checked_tokenizer(c)
    text = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.special_ids)
    row = packing.empty_rows(self.fields(s), b)
    for i in range(b):
      example = dict(inputs=np.r_[rng.choice(text, s - 1), tokenizer.eos_id],
                     targets=np.r_[rng.choice(text, t - 1), tokenizer.eos_id])
      packed = packing.pack_pairs([example], s, t, fields(s, t), tokenizer_lib.filler_id(tokenizer))
      for name in row:
        row[name][i] = packed[name][0]
    return row
