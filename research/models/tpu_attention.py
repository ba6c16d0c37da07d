"""Attention on TPUs through the Pallas kernels that JAX ships: splash attention, and the TPU
flash-attention kernel where there is an additive bias (T5), which splash does not take.

Both take segment ids natively (`SegmentIds`), so packed rows never build a dense mask. Grouped-
query keys and values are repeated per query head here (the TPU flash kernel needs that; splash
could read them in place, a memory saving left for when it is measured on a TPU), and lengths are
padded to whole 128-token blocks, the padding given segment ids no real position has. T5's
batch-shared bias is broadcast over the batch for the flash kernel, which wants one per row. On
CPU they run in the TPU interpret mode, which is how the tests check them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from research.models import kernel_inputs
from research.models.kernel_inputs import pad

_BLOCK = 128  # Both kernels tile sequences in blocks of 128 by default.


def _round_up(length):
  return -(-length // _BLOCK) * _BLOCK


def _flash(q, k, v, bias, segment_ids, causal):
  return tpu_flash.flash_attention(q, k, v, bias, segment_ids, causal=causal, sm_scale=1.0)


# The TPU interpret mode applies to kernels traced under its context, and the backward kernels
# are traced when the gradient is taken, outside any call here: so both passes enter it
# themselves (the vjp function is a pytree of residual arrays, a valid residual).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _interpreted_flash(q, k, v, bias, segment_ids, causal):
  with pltpu.force_tpu_interpret_mode():
    return _flash(q, k, v, bias, segment_ids, causal)


def _interpreted_flash_fwd(q, k, v, bias, segment_ids, causal):
  with pltpu.force_tpu_interpret_mode():
    return jax.vjp(lambda *x: _flash(*x, segment_ids, causal), q, k, v, bias)


def _interpreted_flash_bwd(causal, vjp, d_out):
  del causal
  with pltpu.force_tpu_interpret_mode():
    return vjp(d_out) + (None,)  # Segment ids have no gradient.


_interpreted_flash.defvjp(_interpreted_flash_fwd, _interpreted_flash_bwd)


def _splash_kernel(heads, t, s, causal, interpret):
  # Made per trace, not cached: the kernel holds arrays, which a cache would leak across traces.
  make = splash_mask.CausalMask if causal else splash_mask.FullMask
  mask = splash_mask.MultiHeadMask([make((t, s)) for _ in range(heads)])
  sizes = splash.BlockSizes.get_default()
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                interpret=interpret)


def tpu_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, bias=None, causal=True,
                  interpret=None):
  """q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; segment ids [b, t], [b, s] (None: one
  segment; the keys' default to the queries' when s == t); bias: [b or 1, heads, t, s].
  Unscaled: the caller scales q. interpret=None interprets exactly when running on the CPU."""
  b, t, h, _ = q.shape
  s = k.shape[1]
  interpret = kernel_inputs.interpreting(interpret)
  padded_t, padded_s = _round_up(t), _round_up(s)
  q_seg, kv_seg = kernel_inputs.padded_segment_ids(q, k, q_segment_ids, kv_segment_ids, causal,
                                                   padded_t, padded_s)
  # [b, heads, length, d], keys repeated per query head.
  q = jnp.transpose(pad(q, 1, padded_t), (0, 2, 1, 3))
  k, v = (jnp.repeat(jnp.transpose(pad(x, 1, padded_s), (0, 2, 1, 3)), h // x.shape[2], axis=1)
          for x in (k, v))
  if bias is None:
    kernel = _splash_kernel(h, padded_t, padded_s, causal, interpret)
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
        q, k, v, q_seg, kv_seg)
  else:
    bias = jnp.broadcast_to(pad(pad(bias, 2, padded_t), 3, padded_s).astype(q.dtype),
                            (b, h, padded_t, padded_s))
    segment_ids = tpu_flash.SegmentIds(q_seg, kv_seg)
    if interpret:
      out = _interpreted_flash(q, k, v, bias, segment_ids, causal)
    else:
      out = tpu_flash.flash_attention(q, k, v, bias, segment_ids, causal=causal, sm_scale=1.0)
  return jnp.transpose(out, (0, 2, 1, 3))[:, :t]
