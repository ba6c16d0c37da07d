"""Scaled dot-product attention kernels: causal (decoders), bidirectional (encoders) or cross
(encoder-decoders), with an optional additive bias (T5's relative positions).

`jax.nn.dot_product_attention` is the path on accelerators (its cuDNN fused kernel on GPU).
`explicit_attention` is for CPUs: the same mathematics with a hand-written backward pass. On
XLA:CPU the automatic backward of softmax spends most of its time in a slow row reduction over
keys; the explicit backward uses the identity
  sum_k p_k * dp_k = sum_d out_d * d_out_d
(as FlashAttention does) and computes that reduction as a matrix-vector product.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'explicit', 'xla', 'cudnn')


def segment_mask(segment_ids, length, causal=True, kv_segment_ids=None, kv_length=None):
  """[batch or 1, 1, q, k] boolean mask: causal when `causal`, and within one segment when
  packing (a query sees only keys of its own segment id; padding, id 0, sees only padding, so no
  self-attention row is empty). Cross-attention passes the keys' own `kv_segment_ids` and
  `kv_length`; there a padding query over inputs without padding sees nothing and attends
  uniformly, harmlessly: its outputs carry no loss."""
  kv_length = length if kv_length is None else kv_length
  mask = jnp.ones((length, kv_length), bool)
  mask = (jnp.tril(mask) if causal else mask)[None, None]
  if segment_ids is None and kv_segment_ids is None:
    return mask
  if segment_ids is None:
    segment_ids = jnp.ones(kv_segment_ids.shape[:1] + (length,), kv_segment_ids.dtype)
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids if kv_length == length else jnp.ones(
        segment_ids.shape[:1] + (kv_length,), segment_ids.dtype)
  return mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def _grouped(x, num_kv_heads):
  """[b, t, heads, d] -> [b, t, kv_heads, groups, d] (grouped-query attention)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def _grouped_bias(bias, num_kv_heads):
  """[b or 1, heads, q, k] -> [b or 1, kv_heads, groups, q, k]."""
  b, h, t, s = bias.shape
  return bias.reshape(b, num_kv_heads, h // num_kv_heads, t, s)


def _forward(q, k, v, mask, bias=None):
  qg = _grouped(q, k.shape[2])
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + _grouped_bias(bias, k.shape[2]).astype(jnp.float32)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits)
  probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)
  return out.reshape(q.shape), probs


@jax.custom_vjp
def _explicit(q, k, v, mask, bias):
  return _forward(q, k, v, mask, bias)[0]


def _explicit_fwd(q, k, v, mask, bias):
  out, probs = _forward(q, k, v, mask, bias)
  return out, (q, k, v, mask, bias, probs, out)


def _explicit_bwd(residuals, d_out):
  q, k, v, mask, bias, probs, out = residuals
  kv_heads = k.shape[2]
  d_out_g = _grouped(d_out, kv_heads)
  d_v = jnp.einsum('bkgts,btkgd->bskd', probs.astype(v.dtype), d_out_g)
  d_probs = jnp.einsum('btkgd,bskd->bkgts', d_out_g, v, preferred_element_type=jnp.float32)
  # sum_s probs * d_probs == sum_d out * d_out: a reduction over head_dim, done as a
  # matrix-vector product (fast on XLA:CPU, unlike a short row reduction).
  products = (d_out_g * _grouped(out, kv_heads)).astype(jnp.float32)
  row_dot = products @ jnp.ones((products.shape[-1],), jnp.float32)  # [b, t, kv_heads, groups]
  row_dot = jnp.transpose(row_dot, (0, 2, 3, 1))
  d_logits32 = probs * (d_probs - row_dot[..., None])
  d_logits = d_logits32.astype(q.dtype)
  d_q = jnp.einsum('bkgts,bskd->btkgd', d_logits, k).reshape(q.shape)
  d_k = jnp.einsum('bkgts,btkgd->bskd', d_logits, _grouped(q, kv_heads))
  d_bias = None
  if bias is not None:  # The logits' gradient, summed over the batch where bias broadcasts.
    d_bias = d_logits32.reshape((d_logits32.shape[0], -1) + d_logits32.shape[3:])
    if bias.shape[0] == 1:
      d_bias = jnp.sum(d_bias, axis=0, keepdims=True)
    d_bias = d_bias.astype(bias.dtype)
  return d_q, d_k, d_v, None, d_bias


_explicit.defvjp(_explicit_fwd, _explicit_bwd)


def _scaled(q, scale):
  """q times `scale` (None: head_dim ** -0.5; T5 folds the scale into its initialisation, 1.0)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return q if scale == 1.0 else q * jnp.asarray(scale, q.dtype)


def explicit_attention(q, k, v, segment_ids=None, causal=True, bias=None, scale=None,
                       kv_segment_ids=None):
  """q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; bias: [b or 1, heads, t, s] added to the
  logits (T5's relative positions); returns [b, t, heads, d].

  The backward pass never assumes a causal mask, so bidirectional and cross-attention use it as
  is; it returns the bias gradient too.
  """
  mask = segment_mask(segment_ids, q.shape[1], causal, kv_segment_ids, k.shape[1])
  return _explicit(_scaled(q, scale), k, v, mask, bias)


def resolve_implementation(implementation, dtype):
  """'auto' -> 'explicit' on CPU, 'cudnn' on GPU for 16-bit inputs, 'xla' otherwise.

  (`jax.nn.dot_product_attention` itself defaults to its XLA implementation, so cuDNN must be
  asked for by name.)
  """
  if implementation != 'auto':
    return implementation
  backend = jax.default_backend()
  if backend == 'cpu':
    return 'explicit'
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def masked_attention(q, k, v, mask, implementation='auto', bias=None, scale=None):
  """Attention under an explicit [batch, 1, q, k] boolean mask (decoding with a cache)."""
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'explicit':
    return _forward(_scaled(q, scale), k, v, mask, bias)[0]
  return jax.nn.dot_product_attention(q, k, v, bias=_cast(bias, q), mask=mask, scale=scale,
                                      implementation=implementation)


def _cast(bias, q):
  return None if bias is None else bias.astype(q.dtype)


def dot_product_attention(q, k, v, segment_ids, causal, implementation='auto', bias=None,
                          scale=None, kv_segment_ids=None):
  """Attention with the kernel `implementation` (see IMPLEMENTATIONS).

  q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; segment_ids: [b, t] or None (no packing and
  no padding: with causal=False every query sees every key); kv_segment_ids: the keys' segment
  ids when they are not the queries' (cross-attention, s may differ from t); bias: [b or 1,
  heads, t, s] added to the logits; scale: of the logits (None: head_dim ** -0.5).
  """
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'explicit':
    return explicit_attention(q, k, v, segment_ids, causal, bias, scale, kv_segment_ids)
  # The causal part is left to is_causal: cuDNN then skips the masked blocks.
  mask = None
  if segment_ids is not None or kv_segment_ids is not None:
    mask = segment_mask(segment_ids, q.shape[1], False, kv_segment_ids, k.shape[1])
  return jax.nn.dot_product_attention(q, k, v, bias=_cast(bias, q), mask=mask, scale=scale,
                                      is_causal=causal, implementation=implementation)


def causal_attention(q, k, v, segment_ids, implementation='auto'):
  """Causal attention (decoders); see dot_product_attention."""
  return dot_product_attention(q, k, v, segment_ids, True, implementation)
