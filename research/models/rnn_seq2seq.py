"""Recurrent encoder-decoders with attention (Bahdanau et al. 2015, Luong et al. 2015).

Encoder: token embedding, then `num_layers` bidirectional GRU or LSTM layers (Flax's GRUCell or
OptimizedLSTMCell), each reading the previous layer's two directions concatenated; the encoded
state of a position is the top layer's [forward; backward] output. Each direction is a
research/models/recurrent.py Recurrent (the backward one reads the row reversed), whose cell
weights are replicated; the decoder's cells carry logical axes.

Decoder: token embedding of the targets shifted right (teacher forcing), `num_decoder_layers`
cells of the same kind. Each layer's state starts from tanh(W h_b + b), h_b the top backward
encoder state at the example's first input token (Bahdanau's initialisation; an LSTM's memory
cell starts at zero). Every step, the top decoder state h_t queries the encoded states of its own
example: `attention_score` 'bahdanau' scores v^T tanh(W h_t + U k_s), 'luong' scores
h_t^T W k_s (Luong's general score). The context c_t and h_t give Luong's attentional hidden
state tanh(W_c [c_t; h_t]), which is both the output (the logits read it) and, with the next
target embedding, the first layer's next input (Luong's input feeding: the recurrence knows
where it attended). The same combination serves both scores, so the two differ only in how they
align.

Packing: a row holds several examples (segment ids from 1, padding 0). Both encoder directions
restart from a zero state where the segment id changes, the decoder restarts from its example's
initial state, and attention reads only encoder positions of the decoder position's own segment,
so a packed row computes what its examples compute alone.

Decoding (research/decode.py): the first call passes the encoded states, whose projected keys,
values and segment ids are kept in the 'cache' collection with the decoder's state; later calls
pass encoded=None and feed one token each. Every cache entry has the batch first.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from research.models import layers
from research.models import recurrent
from research.partitioning import constrain

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CELLS = ('gru', 'lstm')
ATTENTION_SCORES = ('bahdanau', 'luong')


@dataclasses.dataclass(frozen=True)
class RnnSeq2SeqSpec:
  """Everything the network needs, translated once from `config.model`."""
  vocab_size: int
  emb_dim: int
  hidden_dim: int  # Each encoder direction, every decoder layer.
  attention_dim: int  # Bahdanau's hidden layer of the score (unused by 'luong').
  num_layers: int  # Bidirectional encoder layers.
  num_decoder_layers: int
  cell: str
  attention_score: str
  max_len: int  # Longest input or target (a recurrence has no position table).
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @classmethod
  def from_config(cls, model):
    return cls(vocab_size=model.vocab_size, emb_dim=model.emb_dim, hidden_dim=model.hidden_dim,
               attention_dim=model.attention_dim, num_layers=model.num_layers,
               num_decoder_layers=model.num_decoder_layers, cell=model.cell,
               attention_score=model.attention_score, max_len=model.max_len,
               dropout_rate=model.dropout_rate, dtype=_DTYPES[model.dtype],
               param_dtype=_DTYPES[model.param_dtype])


def _cell(spec, name):
  """A library cell whose kernels carry logical axes (inputs 'embed', gate units 'mlp')."""
  cell = nn.GRUCell if spec.cell == 'gru' else nn.OptimizedLSTMCell
  return cell(features=spec.hidden_dim,
              kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                       ('embed', 'mlp')),
              recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                                 ('embed', 'mlp')),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)),
              dtype=spec.dtype, param_dtype=spec.param_dtype, name=name)


def _state(spec, hidden):
  """A cell's carry whose output state is `hidden` (an LSTM's memory cell zero); float32, the
  dtype the cells keep their carry in."""
  hidden = hidden.astype(jnp.float32)
  return (jnp.zeros_like(hidden), hidden) if spec.cell == 'lstm' else hidden


def _restart(carry, restart, initial):
  """`initial` where `restart` [batch] is set, `carry` elsewhere."""
  return jax.tree.map(lambda c, i: jnp.where(restart[:, None], i, c), carry, initial)


def segment_starts(segment_ids):
  """[batch, length] True where a segment begins."""
  before = jnp.roll(segment_ids, 1, axis=1)
  edge = jnp.arange(segment_ids.shape[1]) == 0
  return (segment_ids != before) | edge[None, :]


# The decoder scans its step module along the length (axis 1), its parameters shared by every
# step.
_scan = functools.partial(nn.scan, variable_broadcast='params', split_rngs={'params': False},
                          out_axes=1)


class _Attention(nn.Module):
  """Scores of a query over precomputed keys [batch, inputs, *], restricted to the query's own
  segment; returns (context [batch, 2 * hidden], weights [batch, inputs], float32)."""
  spec: RnnSeq2SeqSpec

  @nn.compact
  def __call__(self, query, keys, values, encoded_segment_ids, segment):
    spec = self.spec
    if spec.attention_score == 'bahdanau':
      query = layers.DenseGeneral((spec.attention_dim,), ('embed', 'mlp'), init_std=(
          spec.hidden_dim ** -0.5), dtype=spec.dtype, param_dtype=spec.param_dtype,
                                  name='query')(query)
      v = self.param('v', nn.with_logical_partitioning(layers.normal_init(
          spec.attention_dim ** -0.5), ('mlp',)), (spec.attention_dim,), spec.param_dtype)
      scores = jnp.tanh(keys + query[:, None, :]) @ v.astype(spec.dtype)
    else:  # Luong's general score: the keys are W k already.
      scores = jnp.einsum('bsh,bh->bs', keys, query.astype(spec.dtype))
    own = (encoded_segment_ids == segment[:, None]) & (encoded_segment_ids > 0)
    # A decoder position of no example (padding) sees nothing: its weights come out uniform.
    scores = jnp.where(own, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum('bs,bsd->bd', weights.astype(spec.dtype), values)
    return context, weights


class _DecoderStep(nn.Module):
  """One target position: restart, cells, attention, attentional hidden state. Not a
  recurrent.Recurrent: input feeding makes the first layer's input depend on the previous
  step's attention, and a restart goes to the example's initial state, not to zeros."""
  spec: RnnSeq2SeqSpec

  @nn.compact
  def __call__(self, carry, inputs, keys, values, encoded_segment_ids):
    spec = self.spec
    cells, feed = carry
    x, restart, initial, segment = inputs
    cells = tuple(_restart(c, restart, _state(spec, h)) for c, h in zip(cells, initial))
    feed = jnp.where(restart[:, None], jnp.zeros_like(feed), feed)
    h = jnp.concatenate([x, feed.astype(x.dtype)], axis=-1)
    new_cells = []
    for index, c in enumerate(cells):
      c, h = _cell(spec, f'layer_{index}')(c, h)
      new_cells.append(c)
    context, weights = _Attention(spec, name='attention')(h, keys, values, encoded_segment_ids,
                                                          segment)
    combined = jnp.concatenate([context.astype(spec.dtype), h.astype(spec.dtype)], axis=-1)
    attended = jnp.tanh(layers.DenseGeneral(
        (spec.hidden_dim,), ('embed', 'mlp'), init_std=(3 * spec.hidden_dim) ** -0.5,
        dtype=spec.dtype, param_dtype=spec.param_dtype, name='combine')(combined))
    return (tuple(new_cells), attended.astype(feed.dtype)), (attended, weights)


class Encoder(nn.Module):
  """Embedded inputs [batch, inputs, emb_dim] -> encoded [batch, inputs, 2 * hidden_dim]."""
  spec: RnnSeq2SeqSpec
  deterministic: bool = True
  sharding: Optional[Callable] = None

  @nn.compact
  def __call__(self, x, segment_ids):
    spec = self.spec
    dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    direction = functools.partial(recurrent.Recurrent, spec.cell, spec.hidden_dim,
                                  dtype=spec.dtype, param_dtype=spec.param_dtype)
    flip = functools.partial(jnp.flip, axis=1)
    for index in range(spec.num_layers):
      _, forward = direction(name=f'forward_{index}')(x, segment_ids)
      # The row read backwards: a reversed row starts with its padding (segment 0), which runs
      # from the zero carry, and the carry resets at each example's last input token.
      _, backward = direction(name=f'backward_{index}')(flip(x), flip(segment_ids))
      x = dropout(jnp.concatenate([forward, flip(backward)], axis=-1))
      x = constrain(x, self.sharding, ('batch', 'length', 'act_embed'))
    return x


class Decoder(nn.Module):
  """Embedded decoder inputs and encoded states -> attentional hidden states
  [batch, targets, hidden_dim]; the attention weights [batch, targets, inputs] are sown in
  'intermediates' as `attention_weights`."""
  spec: RnnSeq2SeqSpec
  decode: bool = False

  @nn.compact
  def __call__(self, x, segment_ids, encoded, encoded_segment_ids):
    spec = self.spec
    batch, length = x.shape[:2]
    key_dim = spec.attention_dim if spec.attention_score == 'bahdanau' else spec.hidden_dim
    project_keys = layers.DenseGeneral((key_dim,), ('embed', 'mlp'),
                                       init_std=(2 * spec.hidden_dim) ** -0.5, dtype=spec.dtype,
                                       param_dtype=spec.param_dtype, name='key')
    initial_layers = [layers.DenseGeneral((spec.hidden_dim,), ('embed', 'mlp'), use_bias=True,
                                          init_std=spec.hidden_dim ** -0.5, dtype=spec.dtype,
                                          param_dtype=spec.param_dtype, name=f'initial_{index}')
                      for index in range(spec.num_decoder_layers)]
    fresh = (tuple(_state(spec, jnp.zeros((batch, spec.hidden_dim), jnp.float32))
                   for _ in range(spec.num_decoder_layers)),
             jnp.zeros((batch, spec.hidden_dim), spec.dtype))
    if encoded is not None:
      keys, values = project_keys(encoded), encoded.astype(spec.dtype)
      restart = segment_starts(segment_ids)
      # Each position's example's first input token (one-hot over the inputs), whose backward
      # state starts the decoder.
      first = segment_starts(encoded_segment_ids) & (encoded_segment_ids > 0)
      select = first[:, None, :] & (encoded_segment_ids[:, None, :] == segment_ids[:, :, None])
      backward = jnp.einsum('bts,bsh->bth', select.astype(spec.dtype),
                            values[..., spec.hidden_dim:])
      initial = tuple(jnp.tanh(layer(backward)) for layer in initial_layers)
      carry = fresh
      if self.decode:  # The first call: what every later step reads.
        self.put_variable('cache', 'keys', keys)
        self.put_variable('cache', 'values', values)
        self.put_variable('cache', 'segments', encoded_segment_ids)
    else:  # A later decoding call: one example per row, continued from the cache.
      keys, values = self.get_variable('cache', 'keys'), self.get_variable('cache', 'values')
      encoded_segment_ids = self.get_variable('cache', 'segments')
      restart = jnp.zeros((batch, length), bool)
      initial = tuple(jnp.zeros((batch, length, spec.hidden_dim), spec.dtype)
                      for _ in initial_layers)
      carry = self.get_variable('cache', 'carry')
    step = _scan(_DecoderStep, in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast))(
        spec, name='step')
    carry, (hidden, weights) = step(carry, (x, restart, initial, segment_ids), keys, values,
                                    encoded_segment_ids)
    if self.decode:
      self.put_variable('cache', 'carry', carry)
    self.sow('intermediates', 'attention_weights', weights)
    return hidden


class RnnSeq2Seq(nn.Module):
  """(inputs, decoder inputs) -> decoder hidden states; `logits` applies the output layer.

  `encode` and `decode_hidden` run one side each (generation encodes once, then decodes step by
  step with decode=True against the 'cache' collection, see research/decode.py).
  """
  spec: RnnSeq2SeqSpec
  sharding: Optional[Callable] = None
  deterministic: bool = True
  decode: bool = False
  decode_length: int = 0  # Unused: the decoder's cache does not grow with the steps.

  def setup(self):
    spec = self.spec
    embed = functools.partial(layers.Embed, spec.vocab_size, spec.emb_dim, init_std=1.0,
                              dtype=spec.dtype, param_dtype=spec.param_dtype)
    self.encoder_embed, self.decoder_embed = embed(), embed()
    self.encoder = Encoder(spec, self.deterministic, self.sharding)
    self.decoder = Decoder(spec, self.decode)
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    self.lm_head = layers.DenseGeneral((spec.vocab_size,), ('embed', 'vocab'),
                                       init_std=spec.hidden_dim ** -0.5, dtype=spec.dtype,
                                       param_dtype=spec.param_dtype)

  def _embed(self, table, tokens):
    return self.dropout(constrain(table(tokens), self.sharding, ('batch', 'length', 'act_embed')))

  def encode(self, tokens, segment_ids=None):
    """Encoded states [batch, inputs, 2 * hidden_dim]; segment ids: examples from 1, padding 0
    (None: one example per row)."""
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return self.encoder(self._embed(self.encoder_embed, tokens), segment_ids)

  def decode_hidden(self, tokens, encoded, segment_ids=None, encoded_segment_ids=None,
                    positions=None):
    """Decoder hidden states [batch, targets, hidden_dim] for decoder inputs `tokens` (targets
    shifted right, each example starting from the padding id). Decoding passes encoded=None
    after the first call; `positions` is unused (the carry knows the step)."""
    del positions
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if encoded is not None and encoded_segment_ids is None:
      encoded_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
    hidden = self.decoder(self._embed(self.decoder_embed, tokens), segment_ids, encoded,
                          encoded_segment_ids)
    return self.dropout(constrain(hidden, self.sharding, ('batch', 'length', 'act_embed')))

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None):
    if encoder_segment_ids is None:
      encoder_segment_ids = jnp.ones(encoder_tokens.shape, jnp.int32)
    encoded = self.encode(encoder_tokens, encoder_segment_ids)
    return self.decode_hidden(decoder_tokens, encoded, decoder_segment_ids, encoder_segment_ids)

  def logits(self, hidden):
    logits = self.lm_head(hidden)
    if logits.ndim == 3:
      logits = constrain(logits, self.sharding, ('batch', 'length', 'act_vocab'))
    return logits.astype(jnp.float32)

  def initialize(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
                 decoder_segment_ids=None):
    hidden = self(encoder_tokens, decoder_tokens, encoder_segment_ids, decoder_segment_ids)
    return dict(logits=self.logits(hidden))


GENERATES_TEXT = True  # research/decode.py generates from inputs.
IS_ENCODER_DECODER = True


def spec_from_config(model_config):
  return RnnSeq2SeqSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build."""
  m = model_config
  if m.cell not in CELLS:
    raise ValueError(f'config.model.cell={m.cell!r} is not one of {list(CELLS)}.')
  if m.attention_score not in ATTENTION_SCORES:
    raise ValueError(f'config.model.attention_score={m.attention_score!r} is not one of '
                     f'{list(ATTENTION_SCORES)}.')
  if m.num_decoder_layers < 1:
    raise ValueError(f'model.num_decoder_layers={m.num_decoder_layers} must be at least 1.')
  if m.attention_score == 'bahdanau' and m.attention_dim < 1:
    raise ValueError(f'model.attention_dim={m.attention_dim} must be positive for '
                     "model.attention_score='bahdanau'.")


def sharded_heads(model_config):
  del model_config
  return {}  # No attention heads: nothing that mesh.tensor must divide.


def build(model_config, sharding=None):
  return RnnSeq2Seq(RnnSeq2SeqSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `RnnSeq2Seq.initialize` (the parameters do not depend on the lengths)."""
  return dict(encoder_tokens=jnp.zeros((1, seq_len), jnp.int32),
              decoder_tokens=jnp.zeros((1, seq_len), jnp.int32))



def flops_per_row(spec, inputs, targets):
  """Model FLOPs for MFU of one row of `inputs` encoder and `targets` decoder positions:
  6 x the multiply-adds of the forward pass (training = 3x forward, a multiply-add = 2 FLOPs),
  biases and element-wise gate arithmetic left out."""
  h, cell = spec.hidden_dim, spec.cell
  encoder = 0
  for index in range(spec.num_layers):
    width = spec.emb_dim if index == 0 else 2 * h
    encoder += 2 * inputs * recurrent.cell_multiply_adds(cell, width, h)  # Two directions.
  bahdanau = spec.attention_score == 'bahdanau'
  keys = inputs * 2 * h * (spec.attention_dim if bahdanau else h)
  decoder = 0
  for index in range(spec.num_decoder_layers):
    width = spec.emb_dim + h if index == 0 else h  # The first layer reads the fed-back state.
    decoder += targets * recurrent.cell_multiply_adds(cell, width, h)
  initial = targets * spec.num_decoder_layers * h * h + targets * inputs * h
  query = h * spec.attention_dim + inputs * spec.attention_dim if bahdanau else inputs * h
  attention = targets * (query + inputs * 2 * h + 3 * h * h)  # Scores, context, combination.
  head = targets * h * spec.vocab_size
  return 6 * (encoder + keys + decoder + initial + attention + head)
