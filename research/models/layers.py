"""Transformer building blocks shared by every model family.

Each layer takes explicit arguments (sizes, dtypes, init scales); family files translate their
config into these. Parameters carry logical axis names (see research/partitioning.py); `sharding`
constrains activations when the model runs on a mesh and is None otherwise.
"""

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from research.models import activations
from research.models import attention
from research.models import normalization
from research.partitioning import constrain

# Rematerialisation policies (config.model.remat) of a transformer block: what the forward pass
# keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    'none': None,  # No remat: keep everything (the block is not wrapped at all).
    'full': None,  # Keep nothing: recompute the whole block.
    # Keep the outputs of weight matmuls; recompute attention and elementwise work. Fastest on
    # CPU too: stacking every saved activation per layer costs more than recomputing it.
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Keep only each attention's output (before its projection): recompute the projections and
    # the MLP, never the softmax over the sequence.
    'minimal': jax.checkpoint_policies.save_only_these_names('attention_out'),
    # As `dots`, but the kept activations wait in pinned host memory (GPU and TPU only).
    'offload': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}

Dtype = Any


def normal_init(std):
  return nn.initializers.normal(stddev=std)


def contract_last(x, kernel, contract_dims):
  """x's last `contract_dims` dimensions times kernel's first ones: [..., in...] x [in..., out...]
  -> [..., out...].

  On CPU the product runs as one [rows, in] x [in, out] matrix product, with x's leading
  dimensions (batch, length) merged into rows. XLA:CPU computes the gradient of a 3-D product's
  kernel through a 3-D transpose of the output gradient, into which it fuses the elementwise work
  before it (an activation's backward pass) and which it then runs about ten times slower than
  the same work on matrices: 42 ms against 7 ms for a gated MLP at t5_tiny's shape. Elsewhere
  the product stays as written, so that the partitioner sees batch and length apart: merging a
  batch split over `data` with a length split over `sequence` would cost an all-to-all.
  """
  if jax.default_backend() == 'cpu':
    rows, inputs = x.shape[:x.ndim - contract_dims], x.shape[x.ndim - contract_dims:]
    outputs = kernel.shape[contract_dims:]
    product = x.reshape(math.prod(rows), math.prod(inputs)) @ kernel.reshape(
        math.prod(inputs), math.prod(outputs))
    return product.reshape(rows + outputs)
  contract = (tuple(range(x.ndim - contract_dims, x.ndim)), tuple(range(contract_dims)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())))


class DenseGeneral(nn.Module):
  """Contracts the last `contract_dims` input dimensions with a kernel of shape in + features."""
  features: Sequence[int]
  kernel_axes: Sequence[str]  # Logical names of the kernel's (input..., output...) dimensions.
  contract_dims: int = 1
  use_bias: bool = False
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features)
    in_shape = x.shape[x.ndim - self.contract_dims:]
    kernel = self.param('kernel', nn.with_logical_partitioning(normal_init(self.init_std),
                                                               tuple(self.kernel_axes)),
                        in_shape + features, self.param_dtype)
    y = contract_last(x.astype(self.dtype), kernel.astype(self.dtype), self.contract_dims)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, tuple(self.kernel_axes[self.contract_dims:])), features,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """Token (or position) embedding table; `attend` gives tied output logits.

  `sharding` (partitioning.ActivationSharding): the look-up reads the table gathered along its
  embedding dimension (as FSDP gathers any weight before use), so that the rows it picks come
  out sharded like the ids, over the batch. Left sharded over `embed`, the gathered rows would
  be sharded over the feature dimension instead, and no collective turns that into the batch
  sharding the next layer wants: XLA then replicates them (an involuntary full
  rematerialization), both forward and backward.
  """
  num_embeddings: int
  features: int
  axes: Sequence[str] = ('vocab', 'embed')
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  sharding: Optional[Callable] = None

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(normal_init(self.init_std), tuple(self.axes)),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    table = constrain(self.embedding, self.sharding, (self.axes[0], None))
    return jnp.take(table, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    return jnp.einsum('...d,vd->...v', x.astype(self.dtype), self.embedding.astype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm with statistics in float32 (GPT-2, BERT)."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (features,), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                        (features,), self.param_dtype).astype(jnp.float32)
    y = normalization.layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias,
                                 self.eps)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with statistics in float32 (Llama, T5)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rotary_embedding(x, positions, theta):
  """Rotary position embedding in the rotate-half layout used by Llama checkpoints.

  x: [batch, length, heads, head_dim]; positions: [batch, length].
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, head_dim / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention: causal (decoders) or bidirectional (encoders)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool
  rope_theta: Optional[float]  # None: no rotary embedding (positions added at the input).
  init_std: float
  out_init_std: float
  implementation: str = 'auto'  # See research/models/attention.py.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  sharding: Optional[Callable] = None
  decode: bool = False  # Autoregressive decoding with a key/value cache (collection 'cache').
  causal: bool = True  # False: every query sees every key of its segment (encoders).
  scale: Optional[float] = None  # Of the logits; None: head_dim ** -0.5 (T5: 1.0).
  kv_init_std: Optional[float] = None  # Of the key and value kernels; None: init_std.

  @nn.compact
  def __call__(self, x, positions, segment_ids, bias=None):
    """bias: [batch or 1, heads, length, keys] added to the logits (T5's relative positions;
    when decoding, over every slot of the cache)."""
    def project(heads, head_axis, std, name):
      return DenseGeneral((heads, self.head_dim), ('embed', head_axis, 'head_dim'),
                          use_bias=self.use_bias, init_std=std, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)(x)

    kv_std = self.init_std if self.kv_init_std is None else self.kv_init_std
    q = project(self.num_heads, 'heads', self.init_std, 'query')
    k = project(self.num_kv_heads, 'kv_heads', kv_std, 'key')
    v = project(self.num_kv_heads, 'kv_heads', kv_std, 'value')
    if self.rope_theta is not None:
      q = rotary_embedding(q, positions, self.rope_theta)
      k = rotary_embedding(k, positions, self.rope_theta)
    q = constrain(q, self.sharding, ('batch', 'length', 'act_heads', 'head_dim'))
    k = constrain(k, self.sharding, ('batch', 'kv_length', 'act_kv_heads', 'head_dim'))
    v = constrain(v, self.sharding, ('batch', 'kv_length', 'act_kv_heads', 'head_dim'))
    if self.decode:
      out = self._cached_attention(q, k, v, segment_ids, bias)
    else:
      out = attention.dot_product_attention(q, k, v, segment_ids, self.causal,
                                            self.implementation, bias=bias, scale=self.scale,
                                            sharding=self.sharding)
      out = checkpoint_name(out, 'attention_out')  # Kept by remat='minimal'.
    return DenseGeneral((x.shape[-1],), ('heads', 'head_dim', 'embed'), contract_dims=2,
                        use_bias=self.use_bias, init_std=self.out_init_std, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='out')(out)


  def _cached_attention(self, q, k, v, segment_ids, bias):
    """Writes k, v at the cache's next slots and attends over everything written so far.

    The cache (allocated once, by `init` with a [batch, cache_length] input) holds keys, values
    and the segment id of every slot; left-padded prompts carry segment 0 on their padding, so
    no real token ever attends to it.
    """
    batch, length = q.shape[:2]
    initialising = not self.has_variable('cache', 'cached_key')
    keys = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    values = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    segments = self.variable('cache', 'cached_segment', jnp.zeros, (batch, length), jnp.int32)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    if initialising:
      return jnp.zeros_like(q)
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    start = index.value
    keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, start, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v, (0, start, 0, 0))
    segments.value = jax.lax.dynamic_update_slice(segments.value, segment_ids, (0, start))
    index.value = start + length
    slots = jnp.arange(keys.value.shape[1])
    causal = slots[None, :] <= (start + jnp.arange(length))[:, None]
    mask = causal[None, None] & (segment_ids[:, None, :, None] == segments.value[:, None, None, :])
    return attention.masked_attention(q, keys.value, values.value, mask, self.implementation,
                                      bias=bias, scale=self.scale)


class CrossAttention(nn.Module):
  """Multi-head attention of queries `x` over `encoded` states (encoder-decoders), no biases.

  When decoding, the keys and values of the encoded states are projected once, by the call that
  passes `encoded` (the prefill), kept in the 'cache' collection, and read by the calls after it
  (which pass encoded=None).
  """
  num_heads: int
  head_dim: int
  init_std: float
  kv_init_std: float
  out_init_std: float
  implementation: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  sharding: Optional[Callable] = None
  decode: bool = False
  scale: Optional[float] = None

  @nn.compact
  def __call__(self, x, encoded, segment_ids, encoded_segment_ids):
    def project(inputs, std, name):
      return DenseGeneral((self.num_heads, self.head_dim), ('embed', 'heads', 'head_dim'),
                          init_std=std, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)(inputs)

    q = constrain(project(x, self.init_std, 'query'), self.sharding,
                  ('batch', 'length', 'act_heads', 'head_dim'))
    if encoded is not None:
      k = project(encoded, self.kv_init_std, 'key')
      v = project(encoded, self.kv_init_std, 'value')
    if self.decode:
      if encoded is not None:  # The prefill: keep the projections for every later step.
        self.put_variable('cache', 'cross_key', k)
        self.put_variable('cache', 'cross_value', v)
        self.put_variable('cache', 'cross_segment', encoded_segment_ids)
      k, v = self.get_variable('cache', 'cross_key'), self.get_variable('cache', 'cross_value')
      encoded_segment_ids = self.get_variable('cache', 'cross_segment')
    k = constrain(k, self.sharding, ('batch', 'kv_length', 'act_heads', 'head_dim'))
    v = constrain(v, self.sharding, ('batch', 'kv_length', 'act_heads', 'head_dim'))
    out = attention.dot_product_attention(q, k, v, segment_ids, False, self.implementation,
                                          scale=self.scale, kv_segment_ids=encoded_segment_ids,
                                          sharding=self.sharding)
    out = checkpoint_name(out, 'attention_out')
    return DenseGeneral((x.shape[-1],), ('heads', 'head_dim', 'embed'), contract_dims=2,
                        init_std=self.out_init_std, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='out')(out)


class Mlp(nn.Module):
  """Ungated MLP act(x W1) W2 (GPT-2, BERT: GELU; T5 v1.0: ReLU) or gated act(x Wg) * (x Wu) W2
  (Llama: SiLU; T5 v1.1: tanh GELU). Dropout, when given, acts on the hidden activations (T5).
  """
  hidden_dim: int
  gated: bool
  use_bias: bool
  init_std: float
  out_init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  sharding: Optional[Callable] = None
  activation: str = 'gelu_tanh'  # A key of activations.ACTIVATIONS.
  dropout: Optional[Callable] = None

  @nn.compact
  def __call__(self, x):
    def dense(features, axes, std, name):
      return DenseGeneral((features,), axes, use_bias=self.use_bias, init_std=std,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    if self.gated:
      gate = dense(self.hidden_dim, ('embed', 'mlp'), self.init_std, 'gate')(x)
      up = dense(self.hidden_dim, ('embed', 'mlp'), self.init_std, 'up')(x)
      h = activations.ACTIVATIONS[self.activation](gate) * up
    else:
      h = activations.ACTIVATIONS[self.activation](
          dense(self.hidden_dim, ('embed', 'mlp'), self.init_std, 'fc')(x))
    h = constrain(h, self.sharding, ('batch', 'length', 'act_mlp'))
    if self.dropout is not None:
      h = self.dropout(h)
    return dense(x.shape[-1], ('mlp', 'embed'), self.out_init_std, 'proj')(h)
