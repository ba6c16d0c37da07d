"""Causal language modelling: predict token t+1 from tokens <= t (decoder family).

Data side: documents are cut into examples of at most seq_len + 1 tokens that overlap by one
token, so every token but a document's first is a target exactly once; packing puts several
examples in a row with segment ids. Loss: cross entropy summed over real targets, divided by
the number of real targets of the whole global batch. Bits per byte divide the same sum (in bits)
by the UTF-8 bytes the targets spell, a measure that does not depend on the tokenizer (so models
over bytes, subwords and words, neural or counted, compare on one scale).
"""

import math

import jax.numpy as jnp
import numpy as np

from research import objectives
from research.objectives import chunked_loss
from research.data import packing
from research.data import pipeline
from research.data import sources
from research.data import tokenizer as tokenizer_lib

TERM = 'lm'
FIELDS = ('tokens', 'targets', 'weights', 'positions', 'segment_ids')
token_losses = objectives.token_losses


DATA = 'documents'  # Reads document sources (research/data/sources.py), or synthetic tokens.
SETTINGS = ()  # The objective.* keys it reads, besides name: none.
SOURCES = sources.KINDS + ('markov',)


def check_config(config, family):
  # An encoder-decoder generates too, but from inputs: its targets need a source sequence.
  predicts_next = (getattr(family, 'GENERATES_TEXT', False)
                   and not getattr(family, 'IS_ENCODER_DECODER', False))
  if not (predicts_next or getattr(family, 'COUNTED', False)):
    raise ValueError(f'objective.name=causal_lm needs a family that predicts the next token; '
                     f'model.family={config.model.family!r} does not (start from a variant of '
                     'configs/decoder.py).')
  if config.data.source not in SOURCES:
    raise ValueError(f'objective.name=causal_lm reads documents; set data.source to one of '
                     f'{list(SOURCES)} (it is {config.data.source!r}).')
  chunked_loss.check_config(config, family, config.train.seq_len, 'train.seq_len')


class Transform:
  """Documents -> (tokens, targets, weights) examples; rows need no finishing."""

  def __init__(self, pad_id=0):
    self.pad_id = pad_id

  def packed_fields(self, seq_len):
    """What packing fills: the batch fields themselves."""
    return objectives.token_fields(seq_len, FIELDS, self.pad_id)

  def span(self, seq_len):
    """(tokens per example at most, stride between example starts within a document)."""
    return seq_len + 1, seq_len

  def capacity(self, seq_len):
    """Row positions to fill (one stream)."""
    return seq_len

  def pack(self, examples, seq_len):
    return packing.pack_examples(examples, 1, seq_len, self.packed_fields(seq_len))[0]

  def positions(self, length):
    """Row positions taken by an example cut from `length` document tokens."""
    return length - 1

  def example(self, tokens, index, epoch, split):
    del index, epoch, split  # Nothing random, nothing from other examples.
    return dict(tokens=tokens[:-1], targets=tokens[1:],
                weights=np.ones(len(tokens) - 1, np.float32))

  def finish_row(self, row):
    return row


class Objective:

  def __init__(self, config):
    self.config = config
    self._text_bytes = None
    self.loss_chunk = chunked_loss.chunk_size(config, config.train.seq_len)

  def text_bytes(self):
    """UTF-8 bytes each id spells, over the model's vocabulary; None for synthetic tokens (no
    text)."""
    c = self.config
    if c.data.source == 'markov':
      return None
    if self._text_bytes is None:
      table = pipeline.checked_tokenizer(c).text_bytes()
      self._text_bytes = np.zeros(max(c.model.vocab_size, len(table)), np.float32)
      self._text_bytes[:len(table)] = table
    return self._text_bytes

  def target_bytes(self, batch):
    """UTF-8 bytes of the weighted targets of a host batch (0 for synthetic tokens)."""
    table = self.text_bytes()
    if table is None:
      return 0.0
    return float(np.sum(table[batch['targets']] * batch['weights']))

  def fields(self, seq_len):
    return objectives.token_fields(seq_len, FIELDS)

  def transform(self, tokenizer):
    return Transform(tokenizer_lib.filler_id(tokenizer))

  def counts(self, batch):
    return {TERM: jnp.sum(batch['weights'].astype(jnp.float32))}

  def tokens(self, batch):
    """Works on host (numpy) and device arrays alike."""
    return batch['weights'].astype(np.float32).sum()

  def sums(self, model, params, batch, rng):
    if chunked_loss.uses_chunks(model, self.loss_chunk):
      def forward(module):
        hidden = module(batch['tokens'], batch['positions'], batch.get('segment_ids'))
        return chunked_loss.head_sums(module, hidden, batch['targets'], batch['weights'],
                                      self.loss_chunk)
      sums = objectives.apply(model, params, rng, method=forward)
    else:
      logits = objectives.apply(model, params, rng, batch['tokens'], batch['positions'],
                                batch.get('segment_ids'), method='language_model')
      sums = objectives.cross_entropy_sums(logits, batch['targets'], batch['weights'])
    table = self.text_bytes()
    if table is not None:
      sums['bytes'] = jnp.sum(jnp.asarray(table)[batch['targets']]
                              * batch['weights'].astype(jnp.float32))
    return {TERM: sums}

  def metric_names(self):
    names = ('loss', 'accuracy', 'perplexity')
    return names if self.config.data.source == 'markov' else names + ('bits_per_byte',)

  def metrics(self, totals):
    lm = totals[TERM]
    loss = objectives.ratio(lm['loss'], lm['count'])
    metrics = dict(loss=loss, accuracy=objectives.ratio(lm['correct'], lm['count']),
                   perplexity=math.exp(min(loss, 50.0)))
    if 'bytes' in lm:
      metrics['bits_per_byte'] = objectives.ratio(lm['loss'] / math.log(2), lm['bytes'])
    return metrics

  def flops_per_token(self, family, spec):
    """The body at every position plus the output head at every position."""
    return (family.body_flops_per_token(spec, self.config.train.seq_len)
            + family.lm_head_flops_per_position(spec))

  def synthetic_batch(self, rng):
    """Full rows of uniform random tokens in this objective's batch format (one document per
    row), for benchmarks."""
    c = self.config
    b, t = c.train.batch_size, c.train.seq_len
    tokens = rng.integers(0, c.model.vocab_size, (b, t + 1), dtype=np.int32)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((b, t), np.float32),
                positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                segment_ids=np.ones((b, t), np.int32))
