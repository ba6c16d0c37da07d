"""layers.contract_last (the products of every dense layer) and normalization.layer_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import layers
from research.models import normalization

# (x shape, kernel shape, contracted dims, the same product as an einsum).
CASES = [
    ((2, 3, 5), (5, 4), 1, 'btd,df->btf'),  # A dense layer.
    ((2, 3, 5), (5, 2, 4), 1, 'btd,dhk->bthk'),  # Query projection: features into heads.
    ((2, 3, 2, 4), (2, 4, 5), 2, 'bthk,hkd->btd'),  # Attention output: heads contracted.
    ((3, 5), (5, 6), 1, 'nd,df->nf'),  # Already a matrix (gathered MLM positions).
]


def _operands(x_shape, kernel_shape):
  kx, kk, kw = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  return x, jax.random.normal(kk, kernel_shape), kw


def _dot_ranks(x, kernel, contract_dims):
  jaxpr = jax.make_jaxpr(lambda a, b: layers.contract_last(a, b, contract_dims))(x, kernel)
  return [tuple(v.aval.ndim for v in eqn.invars) for eqn in jaxpr.eqns
          if eqn.primitive.name == 'dot_general']


@pytest.mark.parametrize('x_shape, kernel_shape, contract_dims, spec', CASES)
@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_the_product_and_its_gradients_equal_the_einsum(monkeypatch, x_shape, kernel_shape,
                                                        contract_dims, spec, backend):
  # The backend only chooses the form of the product; both forms run here on the CPU.
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  x, kernel, kw = _operands(x_shape, kernel_shape)
  out_shape = jnp.einsum(spec, x, kernel).shape
  weights = jax.random.normal(kw, out_shape)

  def loss(product):
    return lambda a, b: jnp.sum(jnp.tanh(product(a, b)) * weights)

  ours = jax.value_and_grad(loss(lambda a, b: layers.contract_last(a, b, contract_dims)),
                            argnums=(0, 1))(x, kernel)
  want = jax.value_and_grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(ours[0], want[0], rtol=1e-5, atol=1e-5)
  for got, expected in zip(ours[1], want[1]):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers.contract_last(x, kernel, contract_dims),
                             jnp.einsum(spec, x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('x_shape, kernel_shape, contract_dims, spec', CASES)
def test_on_cpu_the_product_is_one_matrix_product_elsewhere_it_keeps_its_dimensions(
    monkeypatch, x_shape, kernel_shape, contract_dims, spec):
  del spec
  x, kernel, _ = _operands(x_shape, kernel_shape)
  assert _dot_ranks(x, kernel, contract_dims) == [(2, 2)]
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert _dot_ranks(x, kernel, contract_dims) == [(len(x_shape), len(kernel_shape))]


def _layer_norm_by_autodiff(x, scale, bias, eps):
  centered = x - jnp.mean(x, axis=-1, keepdims=True)
  y = centered * jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
  return y * scale if bias is None else y * scale + bias


@pytest.mark.parametrize('with_bias', [True, False])
def test_layer_norm_and_its_hand_written_gradients_equal_automatic_differentiation(with_bias):
  kx, ks, kb, kw = jax.random.split(jax.random.key(1), 4)
  x = 3.0 * jax.random.normal(kx, (2, 5, 16)) + 1.5  # Off-centre rows with a large spread.
  scale = jax.random.normal(ks, (16,))
  bias = jax.random.normal(kb, (16,)) if with_bias else None
  weights = jax.random.normal(kw, x.shape)

  def loss(norm):
    return lambda x, scale, bias: jnp.sum(jnp.sin(norm(x, scale, bias, 1e-5)) * weights)

  argnums = (0, 1, 2) if with_bias else (0, 1)
  ours = jax.value_and_grad(loss(normalization.layer_norm), argnums)(x, scale, bias)
  want = jax.value_and_grad(loss(_layer_norm_by_autodiff), argnums)(x, scale, bias)
  np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
  for got, expected in zip(ours[1], want[1]):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
