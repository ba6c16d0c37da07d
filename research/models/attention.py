"""Scaled dot-product attention kernels: causal (decoders), bidirectional (encoders) or cross
(encoder-decoders), with an optional additive bias (T5's relative positions).

Packed rows never attend across their segments on any kernel. On accelerators the kernels with
native segment ids run: Pallas FlashAttention on GPU (flash_attention.py), splash attention or
the TPU flash kernel on TPU (tpu_attention.py); cuDNN (`jax.nn.dot_product_attention`) where
there are no segment ids, and XLA's kernel under a dense mask wherever a per-shard kernel does
not fit the mesh. `explicit_attention` is for CPUs: the same mathematics with a hand-written
backward pass, over head-major [batch, heads, length, head_dim] matrices. On XLA:CPU the
automatic backward of softmax spends most of its time in a slow row reduction over keys; the
explicit backward uses the identity
  sum_k p_k * dp_k = sum_d out_d * d_out_d
(as FlashAttention does) and computes that reduction as a matrix-vector product.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from research import partitioning

IMPLEMENTATIONS = ('auto', 'explicit', 'xla', 'cudnn', 'pallas_gpu', 'pallas_tpu')
PALLAS = ('pallas_gpu', 'pallas_tpu')  # flash_attention.py, tpu_attention.py.


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


def _heads_major(x, num_kv_heads):
  """[b, t, heads, d] -> [b, kv_heads, groups, t, d] (grouped-query heads, each a contiguous
  [t, d] matrix: XLA:CPU multiplies those about twice as fast as head-minor strided ones)."""
  b, t, h, d = x.shape
  return x.reshape(b, t, num_kv_heads, h // num_kv_heads, d).transpose(0, 2, 3, 1, 4)


def _kv_heads_major(x):
  """[b, s, kv_heads, d] <-> [b, kv_heads, s, d]."""
  return x.transpose(0, 2, 1, 3)


def _tokens_major(x):
  """[b, kv_heads, groups, t, d] -> [b, t, heads, d]."""
  b, k, g, t, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, d)


def _grouped_bias(bias, num_kv_heads):
  """[b or 1, heads, q, k] -> [b or 1, kv_heads, groups, q, k]."""
  b, h, t, s = bias.shape
  return bias.reshape(b, num_kv_heads, h // num_kv_heads, t, s)


def _forward(q, k, v, mask, bias=None):
  """Head-major attention: q [b, kv_heads, groups, t, d]; k, v [b, kv_heads, s, d]; returns the
  output (q's layout) and the probabilities [b, kv_heads, groups, t, s]."""
  logits = jnp.einsum('bkgtd,bksd->bkgts', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + _grouped_bias(bias, k.shape[1]).astype(jnp.float32)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits)
  probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum('bkgts,bksd->bkgtd', probs.astype(v.dtype), v)
  return out, probs


def _attend(q, k, v, mask, bias):
  """q: [b, t, heads, d]; k, v: [b, s, kv_heads, d] -> [b, t, heads, d]."""
  out, _ = _forward(_heads_major(q, k.shape[2]), _kv_heads_major(k), _kv_heads_major(v), mask,
                    bias)
  return _tokens_major(out)


@jax.custom_vjp
def _explicit(q, k, v, mask, bias):
  return _attend(q, k, v, mask, bias)


def _explicit_fwd(q, k, v, mask, bias):
  q, k, v = _heads_major(q, k.shape[2]), _kv_heads_major(k), _kv_heads_major(v)
  out, probs = _forward(q, k, v, mask, bias)
  return _tokens_major(out), (q, k, v, mask, bias, probs, out)


def _explicit_bwd(residuals, d_out):
  q, k, v, mask, bias, probs, out = residuals  # Head-major, as _forward takes them.
  d_out = _heads_major(d_out, k.shape[1])
  # The key and value gradients contract over queries, the major axis of [t, s] matrices: XLA:CPU
  # would transpose those matrices (fusing the softmax backward into the transpose, which it runs
  # slowly). Written as [d, s] products, it transposes q and d_out instead, [t, d] matrices a
  # fraction of the size, and the results' own transposes fold into `_kv_heads_major`.
  d_v = jnp.einsum('bkgtd,bkgts->bkds', d_out, probs.astype(v.dtype)).swapaxes(2, 3)
  d_probs = jnp.einsum('bkgtd,bksd->bkgts', d_out, v, preferred_element_type=jnp.float32)
  # sum_s probs * d_probs == sum_d out * d_out: a reduction over head_dim, done as a
  # matrix-vector product (fast on XLA:CPU, unlike a short row reduction).
  products = (d_out * out).astype(jnp.float32)
  row_dot = products @ jnp.ones((products.shape[-1],), jnp.float32)  # [b, kv_heads, groups, t]
  d_logits32 = probs * (d_probs - row_dot[..., None])
  d_logits = d_logits32.astype(q.dtype)
  d_q = _tokens_major(jnp.einsum('bkgts,bksd->bkgtd', d_logits, k))
  d_k = _kv_heads_major(jnp.einsum('bkgtd,bkgts->bkds', q, d_logits).swapaxes(2, 3))
  d_bias = None
  if bias is not None:  # The logits' gradient, summed over the batch where bias broadcasts.
    d_bias = d_logits32.reshape((d_logits32.shape[0], -1) + d_logits32.shape[3:])
    if bias.shape[0] == 1:  # A vector-matrix product: XLA:CPU reduces over a leading axis slowly.
      batch = d_bias.shape[0]
      d_bias = (jnp.ones((1, batch), jnp.float32) @ d_bias.reshape(batch, -1)).reshape(
          (1,) + d_bias.shape[1:])
    d_bias = d_bias.astype(bias.dtype)
  return d_q, d_k, _kv_heads_major(d_v), None, d_bias


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


def resolve_implementation(implementation, dtype, packed=True, kernel_fits=True):
  """The kernel 'auto' stands for, by backend:
    CPU: 'explicit';
    GPU: 'cudnn' for 16-bit inputs without segment ids (`packed` False), where cuDNN needs no
         dense mask; otherwise 'pallas_gpu';
    TPU: 'pallas_tpu' (splash attention, or the TPU flash kernel when there is a bias).
  A Pallas kernel runs once per shard, so it is chosen only where `kernel_fits`: the queries'
  length is not split across devices and key/value heads are split like query heads (see
  _kernel_specs); 'xla' otherwise. An implementation named in the config is used as is.
  """
  if implementation != 'auto':
    return implementation
  backend = jax.default_backend()
  if backend == 'cpu':
    return 'explicit'
  if backend == 'gpu':
    if not packed and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
      return 'cudnn'
    return 'pallas_gpu' if kernel_fits else 'xla'
  if backend == 'tpu':
    return 'pallas_tpu' if kernel_fits else 'xla'
  return 'xla'


def masked_attention(q, k, v, mask, implementation='auto', bias=None, scale=None):
  """Attention under an explicit [batch, 1, q, k] boolean mask (decoding with a cache). The
  Pallas kernels take segment ids, not masks: there XLA's kernel runs (one query per step)."""
  implementation = resolve_implementation(implementation, q.dtype)
  if implementation == 'explicit':
    return _attend(_scaled(q, scale), k, v, mask, bias)
  if implementation in PALLAS:
    implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, bias=_cast(bias, q), mask=mask, scale=scale,
                                      implementation=implementation)


def _cast(bias, q):
  return None if bias is None else bias.astype(q.dtype)


def _kernel_specs(q, k, bias, mesh):
  """PartitionSpecs of (q, k/v, query segment ids, key segment ids, bias) under the logical
  rules, or None where a per-shard kernel would compute something else: queries split along
  their length (each shard would see positions from 0), or key/value heads not split like the
  query heads (a shard's query heads would read other key/value heads than their own)."""
  def spec(axes, x):
    return partitioning.logical_to_spec(axes, x.shape, mesh)
  def split(entry):  # The mesh axes of a spec entry that really split (size > 1).
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)
  q_spec = spec(('batch', 'length', 'act_heads', 'head_dim'), q)
  kv_spec = spec(('batch', 'kv_length', 'act_kv_heads', 'head_dim'), k)
  if split(q_spec[1]) or split(q_spec[2]) != split(kv_spec[2]) or q_spec[0] != kv_spec[0]:
    return None
  bias_spec = None
  if bias is not None:
    bias_spec = P(q_spec[0] if bias.shape[0] > 1 else None, q_spec[2], None, None)
  q_spec = P(q_spec[0], None, q_spec[2], None)  # A length axis of size one: whole rows.
  return q_spec, kv_spec, P(q_spec[0], None), P(q_spec[0], None), bias_spec


def _pallas(implementation, q, k, v, segment_ids, kv_segment_ids, bias, causal, sharding):
  """A Pallas kernel, run once per shard of the mesh `sharding` carries (shard_map), since
  XLA cannot partition a custom kernel itself."""
  # Imported on use: JAX's Pallas GPU and TPU modules are experimental, and a run that never
  # asks for them should not depend on them.
  if implementation == 'pallas_gpu':
    from research.models.flash_attention import flash_attention as kernel
  else:
    from research.models.tpu_attention import tpu_attention as kernel
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  if segment_ids is None:  # Arrays before shard_map splits them (the kernels default alike).
    segment_ids = jnp.ones((b, t), jnp.int32)
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids if s == t else jnp.ones((b, s), jnp.int32)

  def run(q, k, v, q_seg, kv_seg, bias):
    return kernel(q, k, v, q_seg, kv_seg, bias, causal)

  if sharding is None:
    return run(q, k, v, segment_ids, kv_segment_ids, bias)
  specs = _kernel_specs(q, k, bias, sharding.mesh)
  if specs is None:
    raise ValueError(f'model.attention={implementation!r} cannot run per shard on this mesh '
                     '(the sequence is split, or key/value heads are not split like query '
                     "heads); use model.attention='auto' or 'xla'.")
  q_spec, kv_spec, q_seg_spec, kv_seg_spec, bias_spec = specs
  return jax.shard_map(run, mesh=sharding.mesh, in_specs=(
      q_spec, kv_spec, kv_spec, q_seg_spec, kv_seg_spec, bias_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids, kv_segment_ids, bias)


def dot_product_attention(q, k, v, segment_ids, causal, implementation='auto', bias=None,
                          scale=None, kv_segment_ids=None, sharding=None):
  """Attention with the kernel `implementation` (see IMPLEMENTATIONS and
  resolve_implementation).

  q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; segment_ids: [b, t] or None (no packing and
  no padding: with causal=False every query sees every key); kv_segment_ids: the keys' segment
  ids when they are not the queries' (cross-attention, s may differ from t); bias: [b or 1,
  heads, t, s] added to the logits; scale: of the logits (None: head_dim ** -0.5); sharding:
  the model's partitioning.ActivationSharding (its mesh), which the Pallas kernels need.
  """
  packed = segment_ids is not None or kv_segment_ids is not None
  fits = sharding is None or _kernel_specs(q, k, bias, sharding.mesh) is not None
  implementation = resolve_implementation(implementation, q.dtype, packed, fits)
  if implementation == 'explicit':
    return explicit_attention(q, k, v, segment_ids, causal, bias, scale, kv_segment_ids)
  if implementation in PALLAS:
    return _pallas(implementation, _scaled(q, scale), k, v, segment_ids, kv_segment_ids,
                   _cast(bias, q), causal, sharding)
  # The causal part is left to is_causal: cuDNN then skips the masked blocks.
  mask = None
  if packed:
    mask = segment_mask(segment_ids, q.shape[1], False, kv_segment_ids, k.shape[1])
  return jax.nn.dot_product_attention(q, k, v, bias=_cast(bias, q), mask=mask, scale=scale,
                                      is_causal=causal, implementation=implementation)


def causal_attention(q, k, v, segment_ids, implementation='auto'):
  """Causal attention (decoders); see dot_product_attention."""
  return dot_product_attention(q, k, v, segment_ids, True, implementation)
