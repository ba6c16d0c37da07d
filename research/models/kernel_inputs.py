"""What the Pallas attention kernels (flash_attention.py, tpu_attention.py) share: the defaults
of their segment ids and the padding of sequences to whole tiles."""

import jax
import jax.numpy as jnp

QUERY_PAD, KEY_PAD = -1, -2  # Segment ids of padded positions (real ids are >= 0): never equal.


def pad(x, axis, size, value=0):
  """`x` padded with `value` at the end of `axis` to `size`."""
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def interpreting(interpret):
  """interpret=None: interpret exactly when the default backend is the CPU."""
  return jax.default_backend() == 'cpu' if interpret is None else interpret


def padded_segment_ids(q, k, q_segment_ids, kv_segment_ids, causal, padded_t, padded_s):
  """(query, key) segment ids [b, padded_t], [b, padded_s] int32. None is one segment; the keys'
  default to the queries' when the lengths agree. Padded queries and keys get ids no real
  position and no padding of the other stream has."""
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  if causal and s != t:
    raise ValueError(f'Causal attention needs as many keys as queries, not {s} and {t}.')
  if q_segment_ids is None:
    q_segment_ids = jnp.ones((b, t), jnp.int32)
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids if s == t else jnp.ones((b, s), jnp.int32)
  return (pad(jnp.asarray(q_segment_ids, jnp.int32), 1, padded_t, QUERY_PAD),
          pad(jnp.asarray(kv_segment_ids, jnp.int32), 1, padded_s, KEY_PAD))
