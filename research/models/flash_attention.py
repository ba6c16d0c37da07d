"""FlashAttention for GPUs, written in Pallas (Triton), with segment ids and an additive bias.

Packed rows must never attend across their segments. `jax.nn.dot_product_attention` takes no
segment ids, so on its XLA and cuDNN paths packing costs a dense [batch, 1, q, k] mask; this kernel
compares the queries' and keys' segment ids tile by tile instead and never forms the attention
matrix, forward or backward (FlashAttention-2: an online softmax over key blocks, the log-sum-exp
kept for the backward pass, which recomputes the probabilities block by block). The one exception
is the bias gradient, which is as large as the bias it differentiates: [batch, heads, q, k] in
float32, summed over the batch afterwards for T5's batch-shared bias.

What it adds to the usual kernel: separate query and key segment ids (cross-attention, where the
lengths differ), grouped-query attention read in place (a query head reads key/value head
h // groups, no copies), and T5's additive bias with its gradient. Lengths are padded to whole
blocks and head_dim to a power of two here, so any shape runs; padded keys carry a segment id no
query has, padded queries one no real key has. A query that sees no key at all outputs zeros.

On CPU the same kernels run in Pallas' interpret mode, which is how the tests check them.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from research.models import kernel_inputs
from research.models.kernel_inputs import pad

_LOG2E = math.log2(math.e)  # Softmax in base 2: exp(x) == exp2(x * log2(e)), cheaper on GPUs.
# Finite, so that masked logits never make inf - inf = NaN in the online softmax.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two, at least 16 for Triton's dot) and launch settings."""
  q: int = 64
  kv: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _dot(a, b, trans_a=False, trans_b=False):
  """2-D product with float32 accumulation; the transposes fold into the contraction."""
  return lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _logits(q, k, q_seg, kv_seg, bias, causal, q_start, k_start):
  """Base-2 logits of one [block_q, block_kv] tile and its mask (same segment, and causal)."""
  logits = _dot(q, k, trans_b=True)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = q_seg[:, None] == kv_seg[None, :]
  if causal:
    rows = q_start + jnp.arange(q.shape[0])
    cols = k_start + jnp.arange(k.shape[0])
    mask = mask & (rows[:, None] >= cols[None, :])
  return jnp.where(mask, logits * _LOG2E, _MASK_VALUE), mask


def _causal_key_blocks(q_block, block_q, block_kv, key_blocks):
  """Key blocks that queries of block `q_block` can see under a causal mask (a ceiling, never
  past the last key block when query tiles are longer than key tiles)."""
  return jnp.minimum(lax.div((q_block + 1) * block_q + block_kv - 1, block_kv), key_blocks)


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, *refs, causal, has_bias,
                    block_kv):
  bias_ref, out_ref, lse_ref = refs if has_bias else (None,) + refs
  q_block = pl.program_id(0)
  block_q = q_ref.shape[0]
  q = q_ref[...]
  q_seg = q_seg_ref[...]

  def body(j, carry):
    acc, row_max, row_sum = carry
    keys = pl.ds(j * block_kv, block_kv)
    bias = None if bias_ref is None else bias_ref[:, keys]
    logits, _ = _logits(q, k_ref[keys, :], q_seg, kv_seg_ref[keys], bias, causal,
                        q_block * block_q, j * block_kv)
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(logits - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum

  blocks = k_ref.shape[0] // block_kv
  if causal:
    blocks = _causal_key_blocks(q_block, block_q, block_kv, blocks)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(0, blocks, body, init)
  # A query that sees no key (a padding query of cross-attention) outputs zeros, and its
  # log-sum-exp of +inf gives it zero probabilities in the backward pass too: MASK + log2(n)
  # would round back to MASK there and disagree with the forward.
  sees_a_key = row_max > _MASK_VALUE
  out_ref[...] = jnp.where(sees_a_key[:, None], acc / row_sum[:, None], 0.0).astype(out_ref.dtype)
  lse_ref[...] = jnp.where(sees_a_key, row_max + jnp.log2(row_sum), jnp.inf)


def _key_values_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, d_out_ref, lse_ref, delta_ref,
                       *refs, causal, has_bias, block_q):
  """dK and dV of one key block (for one query head), and that block's column of dBias."""
  if has_bias:
    bias_ref, d_k_ref, d_v_ref, d_bias_ref = refs
  else:
    (d_k_ref, d_v_ref), bias_ref, d_bias_ref = refs, None, None
  k_block = pl.program_id(0)
  block_kv = k_ref.shape[0]
  k, v, kv_seg = k_ref[...], v_ref[...], kv_seg_ref[...]

  def body(i, carry):
    d_k, d_v = carry
    queries = pl.ds(i * block_q, block_q)
    q, d_out = q_ref[queries, :], d_out_ref[queries, :]
    bias = None if bias_ref is None else bias_ref[queries, :]
    logits, mask = _logits(q, k, q_seg_ref[queries], kv_seg, bias, causal, i * block_q,
                           k_block * block_kv)
    probs = jnp.exp2(logits - lse_ref[queries][:, None])
    d_v = d_v + _dot(probs.astype(d_out.dtype), d_out, trans_a=True)
    d_probs = _dot(d_out, v, trans_b=True)
    d_logits = jnp.where(mask, probs * (d_probs - delta_ref[queries][:, None]), 0.0)
    if d_bias_ref is not None:
      d_bias_ref[queries, :] = d_logits.astype(d_bias_ref.dtype)
    d_k = d_k + _dot(d_logits.astype(q.dtype), q, trans_a=True)
    return d_k, d_v

  first = 0
  if causal:  # Query blocks wholly before this key block see none of it.
    first = lax.div(k_block * block_kv, block_q)
    if d_bias_ref is not None:
      def zero(i, carry):
        d_bias_ref[pl.ds(i * block_q, block_q), :] = jnp.zeros(
            (block_q, block_kv), d_bias_ref.dtype)
        return carry
      lax.fori_loop(0, first, zero, 0)
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  d_k, d_v = lax.fori_loop(first, q_ref.shape[0] // block_q, body, init)
  d_k_ref[...] = d_k.astype(d_k_ref.dtype)
  d_v_ref[...] = d_v.astype(d_v_ref.dtype)


def _queries_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, d_out_ref, lse_ref, delta_ref,
                    *refs, causal, has_bias, block_kv):
  """dQ of one query block."""
  bias_ref, d_q_ref = refs if has_bias else (None,) + refs
  q_block = pl.program_id(0)
  block_q = q_ref.shape[0]
  q, d_out, q_seg = q_ref[...], d_out_ref[...], q_seg_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, d_q):
    keys = pl.ds(j * block_kv, block_kv)
    k = k_ref[keys, :]
    bias = None if bias_ref is None else bias_ref[:, keys]
    logits, mask = _logits(q, k, q_seg, kv_seg_ref[keys], bias, causal, q_block * block_q,
                           j * block_kv)
    probs = jnp.exp2(logits - lse[:, None])
    d_probs = _dot(d_out, v_ref[keys, :], trans_b=True)
    d_logits = jnp.where(mask, probs * (d_probs - delta[:, None]), 0.0)
    return d_q + _dot(d_logits.astype(k.dtype), k)

  blocks = k_ref.shape[0] // block_kv
  if causal:
    blocks = _causal_key_blocks(q_block, block_q, block_kv, blocks)
  d_q = lax.fori_loop(0, blocks, body, jnp.zeros(q.shape, jnp.float32))
  d_q_ref[...] = d_q.astype(d_q_ref.dtype)


def _specs(b, t, s, h, d, groups, bias_batch, blocks, along):
  """BlockSpecs of (q, k, v, q_seg, kv_seg, bias) for a grid (blocks along `along`, batch,
  head): the tiled stream gets one block per program, the other stream the whole sequence."""
  del b
  tq = blocks.q if along == 'q' else t
  tk = blocks.kv if along == 'kv' else s
  q_index = (lambda i, n, hh: (n, i, hh, 0)) if along == 'q' else (lambda i, n, hh: (n, 0, hh, 0))
  kv_index = ((lambda i, n, hh: (n, i, hh // groups, 0)) if along == 'kv'
              else (lambda i, n, hh: (n, 0, hh // groups, 0)))
  specs = [pl.BlockSpec((None, tq, None, d), q_index),
           pl.BlockSpec((None, tk, None, d), kv_index),
           pl.BlockSpec((None, tk, None, d), kv_index),
           pl.BlockSpec((None, tq), lambda i, n, hh: (n, i if along == 'q' else 0)),
           pl.BlockSpec((None, tk), lambda i, n, hh: (n, i if along == 'kv' else 0))]
  bias_spec = pl.BlockSpec(
      (None, None, tq, tk),
      lambda i, n, hh: (n if bias_batch > 1 else 0, hh, i if along == 'q' else 0,
                        i if along == 'kv' else 0))
  per_query = pl.BlockSpec((None, None, tq), lambda i, n, hh: (n, hh, i if along == 'q' else 0))
  return specs, bias_spec, per_query


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret, name=name)


def _forward(q, k, v, q_seg, kv_seg, bias, causal, blocks, interpret):
  b, t, h, d = q.shape
  s, groups = k.shape[1], h // k.shape[2]
  specs, bias_spec, per_query = _specs(b, t, s, h, d, groups, _bias_batch(bias), blocks, 'q')
  args = [q, k, v, q_seg, kv_seg]
  if bias is not None:
    specs, args = specs + [bias_spec], args + [bias]
  kernel = functools.partial(_forward_kernel, causal=causal, has_bias=bias is not None,
                             block_kv=blocks.kv)
  out, lse = _call(kernel, (t // blocks.q, b, h), specs, [specs[0], per_query],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype),
                    jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
                   blocks, interpret, 'flash_attention_forward')(*args)
  return out, lse


def _backward(q, k, v, q_seg, kv_seg, bias, out, lse, d_out, causal, blocks, interpret):
  b, t, h, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  groups = h // kv_heads
  has_bias = bias is not None
  # sum_k p_k * dp_k == sum_d out_d * d_out_d: the softmax's backward needs it once per query.
  delta = jnp.einsum('bthd,bthd->bht', out.astype(jnp.float32), d_out.astype(jnp.float32))
  args = [q, k, v, q_seg, kv_seg, d_out, lse, delta] + ([bias] if has_bias else [])

  specs, bias_spec, per_query = _specs(b, t, s, h, d, groups, _bias_batch(bias), blocks, 'kv')
  in_specs = specs + [specs[0], per_query, per_query] + ([bias_spec] if has_bias else [])
  # dK and dV per query head (a group's heads are summed below), dBias per batch row.
  per_head_kv = pl.BlockSpec((None, blocks.kv, None, d), lambda i, n, hh: (n, i, hh, 0))
  out_specs = [per_head_kv, per_head_kv]
  out_shape = [jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)] * 2  # Summed, then cast.
  if has_bias:
    out_specs.append(pl.BlockSpec((None, None, t, blocks.kv), lambda i, n, hh: (n, hh, 0, i)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, t, s), jnp.float32))
  kernel = functools.partial(_key_values_kernel, causal=causal, has_bias=has_bias,
                             block_q=blocks.q)
  grads = _call(kernel, (s // blocks.kv, b, h), in_specs, out_specs, out_shape, blocks,
                interpret, 'flash_attention_backward_kv')(*args)
  d_k, d_v = (g.reshape(b, s, kv_heads, groups, d).sum(3).astype(k.dtype) for g in grads[:2])
  d_bias = None
  if has_bias:
    d_bias = grads[2]
    if bias.shape[0] == 1:
      d_bias = jnp.sum(d_bias, axis=0, keepdims=True)
    d_bias = d_bias.astype(bias.dtype)

  specs, bias_spec, per_query = _specs(b, t, s, h, d, groups, _bias_batch(bias), blocks, 'q')
  in_specs = specs + [specs[0], per_query, per_query] + ([bias_spec] if has_bias else [])
  kernel = functools.partial(_queries_kernel, causal=causal, has_bias=has_bias,
                             block_kv=blocks.kv)
  d_q = _call(kernel, (t // blocks.q, b, h), in_specs, specs[0],
              jax.ShapeDtypeStruct(q.shape, q.dtype), blocks, interpret,
              'flash_attention_backward_q')(*args)
  return d_q, d_k, d_v, d_bias


def _bias_batch(bias):
  return 0 if bias is None else bias.shape[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, q_seg, kv_seg, bias, causal, blocks, interpret):
  return _forward(q, k, v, q_seg, kv_seg, bias, causal, blocks, interpret)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, bias, causal, blocks, interpret):
  out, lse = _forward(q, k, v, q_seg, kv_seg, bias, causal, blocks, interpret)
  return out, (q, k, v, q_seg, kv_seg, bias, out, lse)


def _attention_bwd(causal, blocks, interpret, residuals, d_out):
  q, k, v, q_seg, kv_seg, bias, out, lse = residuals
  d_q, d_k, d_v, d_bias = _backward(q, k, v, q_seg, kv_seg, bias, out, lse, d_out, causal,
                                    blocks, interpret)
  return d_q, d_k, d_v, None, None, d_bias


_attention.defvjp(_attention_fwd, _attention_bwd)


def _block(length, block):
  """The tile along a sequence of `length`: `block`, or the smallest power of two >= 16 that
  holds a shorter sequence."""
  return min(block, max(16, pl.next_power_of_2(length)))


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, bias=None, causal=True,
                    blocks=Blocks(), interpret=None):
  """q: [b, t, heads, d]; k, v: [b, s, kv_heads, d] (heads a multiple of kv_heads); segment
  ids: [b, t] and [b, s] (None: one segment; the keys' default to the queries' when s == t);
  bias: [b or 1, heads, t, s]. Unscaled: the caller scales q. interpret=None runs the kernels
  in interpret mode exactly when the default backend is the CPU."""
  t, d, s = q.shape[1], q.shape[3], k.shape[1]
  blocks = dataclasses.replace(blocks, q=_block(t, blocks.q), kv=_block(s, blocks.kv))
  padded_t, padded_s = pl.cdiv(t, blocks.q) * blocks.q, pl.cdiv(s, blocks.kv) * blocks.kv
  q_seg, kv_seg = kernel_inputs.padded_segment_ids(q, k, q_segment_ids, kv_segment_ids, causal,
                                                   padded_t, padded_s)
  padded_d = max(16, pl.next_power_of_2(d))
  q = pad(pad(q, 1, padded_t), 3, padded_d)
  k, v = (pad(pad(x, 1, padded_s), 3, padded_d) for x in (k, v))
  if bias is not None:
    bias = pad(pad(bias, 2, padded_t), 3, padded_s)
  out = _attention(q, k, v, q_seg, kv_seg, bias, causal, blocks,
                   kernel_inputs.interpreting(interpret))
  return out[:, :t, :, :d]
