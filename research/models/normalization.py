"""LayerNorm over the last axis in float32, with a hand-written gradient.

Differentiating the forward formula leaves XLA a backward pass of many small products, with
[rows, 1] statistics broadcast to full activations, which XLA:CPU runs as several passes over the
activations. The textbook gradient needs the normalised input, one [rows, 1] statistic and two
row means, as PyTorch's fused kernel computes it:

  dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sigma,   g = dy * scale

On CPU it makes `bert_tiny`'s and `nanogpt_cpu`'s steps 3-5% faster (timed in one process,
alternating). RMSNorm keeps automatic differentiation: the same treatment measured no faster.
"""

import functools

import jax
import jax.numpy as jnp


def _mean(x):
  return jnp.mean(x, axis=-1, keepdims=True)


def _sum_rows(x):
  """Sums over every axis but the last: a parameter's gradient from per-position terms."""
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, all float32; bias may be
  None."""
  return _forward(x, scale, bias, eps)[0]


def _forward(x, scale, bias, eps):
  centered = x - _mean(x)
  inv_sigma = jax.lax.rsqrt(_mean(jnp.square(centered)) + eps)
  x_hat = centered * inv_sigma
  y = x_hat * scale
  if bias is not None:
    y = y + bias
  return y, (x_hat, inv_sigma, scale, bias)


def _backward(eps, residuals, dy):
  del eps
  x_hat, inv_sigma, scale, bias = residuals
  g = dy * scale
  dx = (g - _mean(g) - x_hat * _mean(g * x_hat)) * inv_sigma
  return dx, _sum_rows(dy * x_hat), None if bias is None else _sum_rows(dy)


layer_norm.defvjp(_forward, _backward)
