"""The GELUs of research/models/activations.py against their formulas in float64, their gradients
against the derivatives of those formulas, and what their backward pass keeps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import activations

_X = np.linspace(-12.0, 12.0, 4001)  # Past where either form saturates, through 0.
_ERF = np.vectorize(math.erf)


def _gelu_erf(x):
  return x * 0.5 * (1.0 + _ERF(x / math.sqrt(2.0)))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _central_difference(f, x, h=1e-5):
  return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize('name, formula', [('gelu', _gelu_erf), ('gelu_tanh', _gelu_tanh)])
def test_gelu_and_its_gradient_equal_the_formula_in_float64(name, formula):
  activation = activations.ACTIVATIONS[name]
  value, grad = jax.vmap(jax.value_and_grad(activation))(jnp.asarray(_X, jnp.float32))
  np.testing.assert_allclose(value, formula(_X), rtol=1e-6, atol=2e-6)
  # 4e-6: tanh rounds to -1 in float32 from x = -5.4, where the derivative is still -3e-6 (so
  # does automatic differentiation of jax.nn.gelu).
  np.testing.assert_allclose(grad, _central_difference(formula, _X), rtol=1e-5, atol=4e-6)


def test_the_tanh_form_is_jax_s_and_the_erf_form_differs_from_it():
  """The tanh GELU's values are jax.nn.gelu's to the bit (checkpoints trained before the hand-
  written gradient give the same outputs); the exact one is not the approximation."""
  x = jnp.asarray(_X, jnp.float32)
  np.testing.assert_array_equal(activations.gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  assert np.max(np.abs(activations.gelu_erf(x) - activations.gelu_tanh(x))) > 1e-4


@pytest.mark.parametrize('name, formula', [('gelu', _gelu_erf), ('gelu_tanh', _gelu_tanh)])
def test_gelu_computes_a_bfloat16_input_in_bfloat16_to_its_precision(name, formula):
  """bfloat16 in, bfloat16 out, forward and backward (accelerator runs compute in it), within
  bfloat16's rounding of the float64 values."""
  activation = activations.ACTIVATIONS[name]
  x = jnp.linspace(-6.0, 6.0, 97, dtype=jnp.bfloat16)
  exact = np.asarray(x, np.float64)
  value, grad = activation(x), jax.vmap(jax.grad(activation))(x)
  assert value.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(value, np.float64), formula(exact), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(grad, np.float64), _central_difference(formula, exact),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('name', ['gelu', 'gelu_tanh'])
def test_the_backward_pass_keeps_only_the_input(name):
  """What jax.checkpoint is there for: the forward pass stores x alone for the backward pass
  (differentiated as written, the GELU stores the erf or tanh term as well)."""
  x = jnp.linspace(-3.0, 3.0, 64)
  _, residuals = jax.vjp(activations.ACTIVATIONS[name], x)
  stored = [leaf for leaf in jax.tree.leaves(residuals) if getattr(leaf, 'shape', ()) == x.shape]
  assert len(stored) == 1 and np.array_equal(stored[0], x)


@pytest.mark.parametrize('name', ['gelu', 'gelu_tanh'])
def test_forward_mode_gives_the_reverse_mode_derivative(name):
  """Keeping only the input must not cost a transformation: jax.jvp and jax.linearize (which a
  hand-written custom_vjp gradient would refuse) agree with jax.grad."""
  activation = activations.ACTIVATIONS[name]
  x = jnp.linspace(-4.0, 4.0, 33)
  reverse = jax.vmap(jax.grad(activation))(x)
  _, forward = jax.jvp(activation, (x,), (jnp.ones_like(x),))
  _, linear = jax.linearize(activation, x)
  np.testing.assert_allclose(forward, reverse, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(linear(jnp.ones_like(x)), reverse, rtol=1e-5, atol=1e-6)
