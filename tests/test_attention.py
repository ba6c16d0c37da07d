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


def _plain_attention(q, k, v, bias, mask, scale):
  """The textbook form, differentiated by jax: softmax(q k^T * scale + bias, masked) v."""
  logits = jnp.einsum('bthd,bshd->bhts', q, k) * scale + bias
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize('implementation', ['explicit', 'xla'])
@pytest.mark.parametrize('cross, batch_bias', [(False, True), (True, False)])
def test_attention_bias_and_its_gradient_match_autodiff_of_the_plain_form(implementation, cross,
                                                                        batch_bias):
  """T5's relative-position bias (shared over the batch: [1, heads, q, k]) or a per-row one, in
  self-attention with packed segments and in cross-attention over keys of another length."""
  b, t, s, h, d = 3, 12, 17 if cross else 12, 4, 8
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, s, h, d)) for key in keys[1:3])
  bias = jax.random.normal(keys[3], (b if batch_bias else 1, h, t, s))
  d_out = jax.random.normal(keys[4], (b, t, h, d))
  segments = np.ones((b, t), np.int32)
  segments[0, 5:] = 2  # Two examples in row 0 and padding in row 1, in both streams.
  segments[1, 9:] = 0
  kv_segments = None
  if cross:
    kv_segments = np.ones((b, s), np.int32)
    kv_segments[0, 8:] = 2
    kv_segments[1, 13:] = 0
  mask = attention.segment_mask(segments, t, not cross, kv_segments, s)

  def ours(q, k, v, bias):
    return attention.dot_product_attention(q, k, v, segments, not cross, implementation,
                                           bias=bias, scale=1.0, kv_segment_ids=kv_segments)

  def run(attend):
    out, vjp = jax.vjp(attend, q, k, v, bias)
    return (out,) + vjp(d_out)

  got = jax.jit(lambda: run(ours))()
  want = jax.jit(lambda: run(lambda *x: _plain_attention(*x, mask, 1.0)))()
  for got_grad, want_grad in zip(got, want):  # The output, then q, k, v and bias gradients.
    assert got_grad.shape == want_grad.shape
    np.testing.assert_allclose(got_grad, want_grad, atol=2e-5, rtol=0)
