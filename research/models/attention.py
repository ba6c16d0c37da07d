"""Scaled dot-product attention kernels: causal (decoders) or bidirectional (encoders).

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


def segment_mask(segment_ids, length, causal=True):
  """[batch or 1, 1, q, k] boolean mask: causal when `causal`, and within one segment when
  packing (a query sees only keys of its own segment id; padding, id 0, sees only padding, so no
  row is ever empty)."""
  mask = jnp.ones((length, length), bool)
  mask = (jnp.tril(mask) if causal else mask)[None, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return mask


def _grouped(x, num_kv_heads):
  """[b, t, heads, d] -> [b, t, kv_heads, groups, d] (grouped-query attention)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def _forward(q, k, v, mask):
  qg = _grouped(q, k.shape[2])
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits)
  probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)
  return out.reshape(q.shape), probs


@jax.custom_vjp
def _explicit(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _explicit_fwd(q, k, v, mask):
  out, probs = _forward(q, k, v, mask)
  return out, (q, k, v, mask, probs, out)


def _explicit_bwd(residuals, d_out):
  q, k, v, mask, probs, out = residuals
  kv_heads = k.shape[2]
  d_out_g = _grouped(d_out, kv_heads)
  d_v = jnp.einsum('bkgts,btkgd->bskd', probs.astype(v.dtype), d_out_g)
  d_probs = jnp.einsum('btkgd,bskd->bkgts', d_out_g, v, preferred_element_type=jnp.float32)
  # sum_s probs * d_probs == sum_d out * d_out: a reduction over head_dim, done as a
  # matrix-vector product (fast on XLA:CPU, unlike a short row reduction).
  products = (d_out_g * _grouped(out, kv_heads)).astype(jnp.float32)
  row_dot = products @ jnp.ones((products.shape[-1],), jnp.float32)  # [b, t, kv_heads, groups]
  row_dot = jnp.transpose(row_dot, (0, 2, 3, 1))
  d_logits = (probs * (d_probs - row_dot[..., None])).astype(q.dtype)
  d_q = jnp.einsum('bkgts,bskd->btkgd', d_logits, k).reshape(q.shape)
  d_k = jnp.einsum('bkgts,btkgd->bskd', d_logits, _grouped(q, kv_heads))
  return d_q, d_k, d_v, None


_explicit.defvjp(_explicit_fwd, _explicit_bwd)


def explicit_attention(q, k, v, segment_ids=None, causal=True):
  """q: [b, t, heads, d]; k, v: [b, t, kv_heads, d]; returns [b, t, heads, d].

  The backward pass never assumes a causal mask, so bidirectional attention uses it as is.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  return _explicit(q * scale, k, v, segment_mask(segment_ids, q.shape[1], causal))


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


def masked_attention(q, k, v, mask, implementation='auto'):
  """Attention under an explicit [batch, 1, q, k] boolean mask (decoding with a cache)."""
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'explicit':
    return _forward(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v, mask)[0]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def dot_product_attention(q, k, v, segment_ids, causal, implementation='auto'):
  """Self-attention with the kernel `implementation` (see IMPLEMENTATIONS).

  q: [b, t, heads, d]; k, v: [b, t, kv_heads, d]; segment_ids: [b, t] or None (no packing and
  no padding: with causal=False every query sees every key).
  """
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'explicit':
    return explicit_attention(q, k, v, segment_ids, causal)
  # The causal part is left to is_causal: cuDNN then skips the masked blocks.
  mask = None if segment_ids is None else segment_mask(segment_ids, q.shape[1], causal=False)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation=implementation)


def causal_attention(q, k, v, segment_ids, implementation='auto'):
  """Causal attention (decoders); see dot_product_attention."""
  return dot_product_attention(q, k, v, segment_ids, True, implementation)
