"""Encoder-decoder transformers: T5 v1.0, T5 v1.1 and ByT5, set by explicit fields.

Both stacks: pre-norm residual blocks with RMS-style LayerNorm (no bias, no mean-centring), no
biases anywhere, attention logits unscaled (T5 folds 1/sqrt(d) into its initialisation) plus a
relative position bias: log-spaced buckets of key - query distance, bidirectional in the encoder
and causal in the decoder, one table per stack computed once and shared by every layer. Decoder
blocks add cross-attention over the encoded states. One token embedding is shared by the encoder,
the decoder and (when tied) the output layer.

v1.0: ReLU MLP, tied output layer with hidden states scaled by d_model ** -0.5 first.
v1.1: gated tanh-GELU MLP, untied output layer, no dropout in pretraining.
ByT5: v1.1 on bytes with sentinels at the top of the vocabulary, encoder deeper than decoder.

Packing: each stack has its own segment ids; no token attends to another example's tokens in
self- or cross-attention. Relative positions come from each token's place in the row: within one
segment they give the same distances as per-segment positions, and other segments are masked.
Dropout acts where T5's does (embeddings, each sublayer's output, the MLP's hidden units and the
final norm) except on attention probabilities.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from research.models import layers
from research.partitioning import constrain

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ACTIVATIONS = ('relu', 'gelu_tanh')  # T5 v1.0 (ungated), T5 v1.1 and ByT5 (gated).


@dataclasses.dataclass(frozen=True)
class EncoderDecoderSpec:
  """Everything the network needs, translated once from `config.model`."""
  vocab_size: int
  num_layers: int  # Encoder blocks.
  num_decoder_layers: int
  num_heads: int
  head_dim: int
  emb_dim: int
  mlp_dim: int
  gated: bool
  activation: str
  tie_embeddings: bool
  relative_buckets: int
  relative_max_distance: int
  max_len: int  # Longest input or target the configs allow (relative positions have no table).
  norm_eps: float
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  scan_layers: bool
  remat: str
  attention: str

  @classmethod
  def from_config(cls, model):
    return cls(vocab_size=model.vocab_size, num_layers=model.num_layers,
               num_decoder_layers=model.num_decoder_layers or model.num_layers,
               num_heads=model.num_heads,
               head_dim=model.head_dim or model.emb_dim // model.num_heads,
               emb_dim=model.emb_dim, mlp_dim=model.mlp_dim, gated=model.gated,
               activation=model.activation, tie_embeddings=model.tie_embeddings,
               relative_buckets=model.relative_buckets,
               relative_max_distance=model.relative_max_distance, max_len=model.max_len,
               norm_eps=model.norm_eps, dropout_rate=model.dropout_rate,
               dtype=_DTYPES[model.dtype], param_dtype=_DTYPES[model.param_dtype],
               scan_layers=model.scan_layers, remat=model.remat, attention=model.attention)

  @property
  def inner_dim(self):
    return self.num_heads * self.head_dim


def relative_buckets(relative, bidirectional, num_buckets, max_distance):
  """T5's bucket of each key - query distance: exact below num_buckets / 4 (/ 2 one-way),
  log-spaced up to max_distance, the last bucket beyond; bidirectional tables give later keys
  the upper half of the buckets, causal ones give every later key bucket 0."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative > 0).astype(relative.dtype) * num_buckets
    distance = jnp.abs(relative)
  else:
    distance = -jnp.minimum(relative, 0)
  exact = num_buckets // 2
  # float32 and truncation, as the reference computes it: the bucket edges must agree exactly.
  scaled = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact)
            / math.log(max_distance / exact) * (num_buckets - exact))
  large = jnp.minimum(exact + scaled.astype(relative.dtype), num_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
  """[1, heads, queries, keys] float32 bias from a [buckets, heads] table."""
  spec: EncoderDecoderSpec
  bidirectional: bool

  @nn.compact
  def __call__(self, query_positions, key_positions):
    spec = self.spec
    table = self.param('embedding', nn.with_logical_partitioning(
        layers.normal_init(spec.emb_dim ** -0.5), (None, 'heads')),
                       (spec.relative_buckets, spec.num_heads), spec.param_dtype)
    buckets = relative_buckets(key_positions[None, :] - query_positions[:, None],
                               self.bidirectional, spec.relative_buckets,
                               spec.relative_max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [queries, keys, heads]
    return jnp.transpose(bias, (2, 0, 1))[None]


def _norm(spec):
  return layers.RMSNorm(eps=spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype)


class Block(nn.Module):
  """x + attn(norm(x)) [+ cross(norm(x), encoded) in the decoder] + mlp(norm(x))."""
  spec: EncoderDecoderSpec
  is_decoder: bool
  deterministic: bool = True
  sharding: Optional[Callable] = None
  decode: bool = False

  def setup(self):
    spec, d = self.spec, self.spec.emb_dim
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    self.attn_norm = _norm(spec)
    self.attn = layers.Attention(
        num_heads=spec.num_heads, num_kv_heads=spec.num_heads, head_dim=spec.head_dim,
        use_bias=False, rope_theta=None, init_std=(d * spec.head_dim) ** -0.5,
        kv_init_std=d ** -0.5, out_init_std=spec.inner_dim ** -0.5,
        implementation=spec.attention, dtype=spec.dtype,
        param_dtype=spec.param_dtype, sharding=self.sharding, decode=self.decode,
        causal=self.is_decoder, scale=1.0)
    if self.is_decoder:
      self.cross_norm = _norm(spec)
      self.cross = layers.CrossAttention(
          num_heads=spec.num_heads, head_dim=spec.head_dim, init_std=(d * spec.head_dim) ** -0.5,
          kv_init_std=d ** -0.5, out_init_std=spec.inner_dim ** -0.5,
          implementation=spec.attention, dtype=spec.dtype, param_dtype=spec.param_dtype,
          sharding=self.sharding, decode=self.decode, scale=1.0)
    self.mlp_norm = _norm(spec)
    self.mlp = layers.Mlp(hidden_dim=spec.mlp_dim, gated=spec.gated, use_bias=False,
                          init_std=d ** -0.5, out_init_std=spec.mlp_dim ** -0.5, dtype=spec.dtype,
                          param_dtype=spec.param_dtype, sharding=self.sharding,
                          activation=spec.activation, dropout=self.dropout)

  def __call__(self, x, segment_ids, bias, encoded=None, encoded_segment_ids=None):
    h = self.attn(self.attn_norm(x), None, segment_ids, bias)
    x = x + self.dropout(h)
    if self.is_decoder:
      h = self.cross(self.cross_norm(x), encoded, segment_ids, encoded_segment_ids)
      x = x + self.dropout(h)
    x = x + self.dropout(self.mlp(self.mlp_norm(x)))
    return constrain(x, self.sharding, ('batch', 'length', 'act_embed')), None


class Stack(nn.Module):
  """Embedded tokens -> blocks -> final norm: the encoder or the decoder."""
  spec: EncoderDecoderSpec
  is_decoder: bool
  deterministic: bool = True
  sharding: Optional[Callable] = None
  decode: bool = False
  decode_length: int = 0  # Decoding: slots of the self-attention cache.

  def setup(self):
    spec = self.spec
    depth = spec.num_decoder_layers if self.is_decoder else spec.num_layers
    self.relative_bias = RelativeBias(spec, bidirectional=not self.is_decoder)
    block = Block
    if spec.remat != 'none' and not self.decode:
      block = nn.remat(block, policy=layers.REMAT_POLICIES[spec.remat],
                       prevent_cse=not spec.scan_layers)
    args = (spec, self.is_decoder, self.deterministic, self.sharding, self.decode)
    if spec.scan_layers:
      self.layers = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                            split_rngs={'params': True, 'dropout': True},
                            in_axes=(nn.broadcast,) * 4, length=depth,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(*args)
    else:
      self.layers = [block(*args) for _ in range(depth)]
    self.final_norm = _norm(spec)
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)

  def __call__(self, x, segment_ids, positions=None, encoded=None, encoded_segment_ids=None):
    """positions: decoding only, [batch, 1] place of the token being decoded (every row the same
    step); training and encoding take each token's place in the row."""
    length = x.shape[1]
    if self.decode:  # Queries at their step (init: the first ones) over every cache slot.
      steps = jnp.arange(length) if positions is None else positions[0]
      bias = self.relative_bias(steps, jnp.arange(self.decode_length))
    else:
      bias = self.relative_bias(jnp.arange(length), jnp.arange(length))
    x = self.dropout(x)
    if self.spec.scan_layers:
      x, _ = self.layers(x, segment_ids, bias, encoded, encoded_segment_ids)
    else:
      for block in self.layers:
        x, _ = block(x, segment_ids, bias, encoded, encoded_segment_ids)
    return self.dropout(self.final_norm(x))


class EncoderDecoder(nn.Module):
  """(inputs, decoder inputs) -> decoder hidden states; `logits` applies the output layer.

  `encode` and `decode_hidden` run one stack each (generation encodes once, then decodes step by
  step with decode=True against the 'cache' collection, see research/decode.py).
  """
  spec: EncoderDecoderSpec
  sharding: Optional[Callable] = None
  deterministic: bool = True
  decode: bool = False
  decode_length: int = 0

  def setup(self):
    spec = self.spec
    self.token_embed = layers.Embed(spec.vocab_size, spec.emb_dim, init_std=1.0, dtype=spec.dtype,
                                    param_dtype=spec.param_dtype, sharding=self.sharding)
    stack = functools.partial(Stack, spec, deterministic=self.deterministic,
                              sharding=self.sharding)
    self.encoder = stack(is_decoder=False)
    self.decoder = stack(is_decoder=True, decode=self.decode, decode_length=self.decode_length)
    if not spec.tie_embeddings:
      self.lm_head = layers.DenseGeneral((spec.vocab_size,), ('embed', 'vocab'),
                                         init_std=spec.emb_dim ** -0.5, dtype=spec.dtype,
                                         param_dtype=spec.param_dtype)

  def _embed(self, tokens):
    return constrain(self.token_embed(tokens), self.sharding, ('batch', 'length', 'act_embed'))

  def encode(self, tokens, segment_ids=None):
    """Encoded states [batch, inputs, emb_dim]; segment ids: examples from 1, padding 0."""
    return self.encoder(self._embed(tokens), segment_ids)

  def decode_hidden(self, tokens, encoded, segment_ids=None, encoded_segment_ids=None,
                    positions=None):
    """Decoder hidden states [batch, targets, emb_dim] for decoder inputs `tokens` (targets
    shifted right, each example starting from id 0). Decoding passes encoded=None after the
    first call (the cross-attention keys are cached) and the step in `positions`."""
    return self.decoder(self._embed(tokens), segment_ids, positions, encoded, encoded_segment_ids)

  def __call__(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None):
    encoded = self.encode(encoder_tokens, encoder_segment_ids)
    return self.decode_hidden(decoder_tokens, encoded, decoder_segment_ids, encoder_segment_ids)

  def logits(self, hidden):
    """float32 logits [..., vocab]: a tied layer reads hidden states scaled by d_model ** -0.5."""
    if self.spec.tie_embeddings:
      logits = self.token_embed.attend(hidden * (self.spec.emb_dim ** -0.5))
    else:
      logits = self.lm_head(hidden)
    if logits.ndim == 3:
      logits = constrain(logits, self.sharding, ('batch', 'length', 'act_vocab'))
    return logits.astype(jnp.float32)

  def head_inputs(self, hidden):
    """The output layer as a product, for a loss that computes logits in chunks
    (research/objectives/chunked_loss.py): logits(hidden) == features @ kernel, the kernel's
    vocab_axis being its vocabulary axis (0: the tied table, read by the scaled states)."""
    spec = self.spec
    if spec.tie_embeddings:
      hidden, kernel, vocab_axis = hidden * (spec.emb_dim ** -0.5), self.token_embed.embedding, 0
    else:
      kernel, vocab_axis = nn.meta.unbox(self.lm_head.variables['params']['kernel']), 1
    return dict(features=hidden.astype(spec.dtype), kernel=kernel.astype(spec.dtype), bias=None,
                vocab_axis=vocab_axis)

  def initialize(self, encoder_tokens, decoder_tokens, encoder_segment_ids=None,
                 decoder_segment_ids=None):
    hidden = self(encoder_tokens, decoder_tokens, encoder_segment_ids, decoder_segment_ids)
    return dict(logits=self.logits(hidden))


HF_MODEL_TYPES = ('t5',)  # Converted by research/hf_t5.py.
GENERATES_TEXT = True  # research/decode.py generates from inputs.
IS_ENCODER_DECODER = True
TORCH_PEER = 'research.peers.torch_t5'  # research.bench --peer=torch.
HF_BASE_VARIANTS = {'t5': 't5_small'}


def hf_converter():
  from research import hf_t5  # Imported on use: only conversion needs safetensors.
  return hf_t5


def spec_from_config(model_config):
  return EncoderDecoderSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build."""
  m = model_config
  if m.activation not in ACTIVATIONS:
    raise ValueError(f'config.model.activation={m.activation!r} is not one of '
                     f'{list(ACTIVATIONS)}.')
  if m.head_dim == 0 and m.emb_dim % m.num_heads:
    raise ValueError(f'model.num_heads={m.num_heads} must divide model.emb_dim={m.emb_dim} '
                     '(or set model.head_dim explicitly).')
  if m.num_decoder_layers < 0:
    raise ValueError(f'model.num_decoder_layers={m.num_decoder_layers} must be positive (or 0 '
                     'for model.num_layers).')
  if m.relative_buckets < 4 or m.relative_buckets % 2:
    raise ValueError(f'model.relative_buckets={m.relative_buckets} must be an even number of at '
                     'least 4 (T5: 32).')
  if m.relative_max_distance <= m.relative_buckets // 2:
    raise ValueError(f'model.relative_max_distance={m.relative_max_distance} must exceed half of '
                     f'model.relative_buckets={m.relative_buckets} (T5: 128 with 32).')


def sharded_heads(model_config):
  return {'model.num_heads': model_config.num_heads}


def build(model_config, sharding=None):
  return EncoderDecoder(EncoderDecoderSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `EncoderDecoder.initialize` (the parameters do not depend on the lengths)."""
  return dict(encoder_tokens=jnp.zeros((1, seq_len), jnp.int32),
              decoder_tokens=jnp.zeros((1, seq_len), jnp.int32))



# Model FLOPs for MFU (training = 3x forward, a multiply-add = 2 FLOPs) of one row: `inputs`
# encoder positions and `targets` decoder positions. Attention over the whole row is counted
# (the bidirectional encoder and cross-attention compute every product; causal self-attention
# half of them).

def flops_per_row(spec, inputs, targets):
  d, inner, f = spec.emb_dim, spec.inner_dim, spec.mlp_dim
  mlp = (3 if spec.gated else 2) * d * f
  encoder = spec.num_layers * inputs * (4 * d * inner + mlp + 2 * inputs * inner)
  decoder = spec.num_decoder_layers * targets * (
      4 * d * inner + mlp + targets * inner  # Self-attention, causal: half of 2 * T * inner.
      + 2 * d * inner + 2 * inputs * inner  # Cross-attention queries and output; scores.
  ) + spec.num_decoder_layers * inputs * 2 * d * inner  # Cross-attention keys and values.
  head = targets * d * spec.vocab_size
  return 6 * (encoder + decoder + head)
