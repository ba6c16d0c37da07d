"""The explicit-backward attention kernel equals jax.nn.dot_product_attention, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import attention


def _inputs(heads, kv_heads, seed=0, b=3, t=20, d=16):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  d_out = jax.random.normal(keys[3], (b, t, heads, d))
  segments = np.ones((b, t), np.int32)
  segments[0, 7:] = 2  # Two documents in row 0,
  segments[1, 15:] = 0  # padding at the end of row 1.
  return q, k, v, d_out, jnp.asarray(segments)


@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_explicit_attention_matches_jax_nn(heads, kv_heads, with_segments):
  q, k, v, d_out, segments = _inputs(heads, kv_heads)
  segments = segments if with_segments else None

  def run(implementation):
    out, vjp = jax.vjp(lambda *x: attention.causal_attention(*x, segments, implementation), q, k, v)
    return (out,) + vjp(d_out)

  for got, want in zip(jax.jit(lambda: run('explicit'))(), jax.jit(lambda: run('xla'))()):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_auto_resolves_per_backend():
  assert jax.default_backend() == 'cpu'
  assert attention.resolve_implementation('auto', jnp.float32) == 'explicit'
  assert attention.resolve_implementation('xla', jnp.bfloat16) == 'xla'


@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (4, 2)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_bidirectional_explicit_attention_matches_jax_nn(heads, kv_heads, with_segments):
  q, k, v, d_out, segments = _inputs(heads, kv_heads, seed=1)
  segments = segments if with_segments else None

  def run(implementation):
    attend = lambda *x: attention.dot_product_attention(*x, segments, False, implementation)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(d_out)

  for got, want in zip(jax.jit(lambda: run('explicit'))(), jax.jit(lambda: run('xla'))()):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_bidirectional_attention_sees_later_keys_of_its_own_segment_only():
  q, k, v, _, segments = _inputs(4, 4, seed=2)
  base = attention.dot_product_attention(q, k, v, segments, False, 'explicit')
  # Row 0 holds documents [0, 7) and [7, 20); row 1 has padding from 15.
  changed = attention.dot_product_attention(q, k.at[0, 5].add(1.0), v, segments, False, 'explicit')
  assert not np.allclose(changed[0, :5], base[0, :5])  # Earlier queries see the later key,
  np.testing.assert_array_equal(changed[0, 7:], base[0, 7:])  # the next document does not.
  changed = attention.dot_product_attention(q, k, v.at[1, 17].add(1.0), segments, False,
                                            'explicit')
  np.testing.assert_array_equal(changed[1, :15], base[1, :15])  # Padding is never attended to.
  np.testing.assert_array_equal(
      attention.causal_attention(q, k, v, segments, 'explicit'),
      attention.dot_product_attention(q, k, v, segments, True, 'explicit'))
