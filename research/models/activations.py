"""The MLPs' activations, GELU with a hand-written gradient that keeps only its input.

Differentiated automatically, a GELU keeps its erf or tanh term for the backward pass: XLA then
computes the forward pass in two loops over the [tokens, mlp] activations (the term, then the
product), stores one more such array and reads it back. The backward pass below recomputes the
term from the input instead, so the forward pass is one loop and nothing but its input stays
alive; the optimisation barrier stops XLA from sharing the forward pass's term with it again.
On CPU `bert_tiny`'s and `t5_tiny`'s train steps take 2-6% less time; `nanogpt_cpu`'s, with
smaller activations, the same (docs/performance.md).

GELU comes as the tanh approximation ('gelu_new' of GPT-2, ALBERT and T5 v1.1) and the exact erf
form (BERT, RoBERTa): checkpoints are trained with one; the other shifts outputs.
"""

import math

import jax
from flax import linen as nn

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715  # x + 0.044715 x^3: the tanh approximation's argument, over sqrt(2 / pi).


def _input_only_gradient(function, derivative):
  """`function`, differentiated as dy * derivative(x) from its input x alone."""

  @jax.custom_vjp
  def activation(x):
    return function(x)

  def forward(x):
    return function(x), x

  def backward(x, dy):
    return (dy * derivative(jax.lax.optimization_barrier(x)),)

  activation.defvjp(forward, backward)
  return activation


def _erf_cdf(x):
  return 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)  # Python floats keep x's dtype.


def _gelu_erf(x):
  # jax.nn.gelu(approximate=False) takes erfc instead, which XLA:CPU evaluates with an exponential
  # and selects: twice the time of erf's one rational function. Both agree with float64 within
  # 2e-6 absolute, as PyTorch's float32 kernel, also erf's, does; below x = -5, where the GELU is
  # under 1.5e-6, erf's form loses its relative precision (it is 0 from x = -6).
  return x * _erf_cdf(x)


def _gelu_erf_derivative(x):
  return _erf_cdf(x) + x * jax.numpy.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _gelu_tanh(x):
  return nn.gelu(x, approximate=True)


def _gelu_tanh_derivative(x):
  t = jax.numpy.tanh(_SQRT_2_OVER_PI * (x + _TANH_CUBIC * x * x * x))
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
      1.0 + 3.0 * _TANH_CUBIC * x * x)


# The exact GELU, x (1 + erf(x / sqrt 2)) / 2, as PyTorch and transformers compute it.
gelu_erf = _input_only_gradient(_gelu_erf, _gelu_erf_derivative)
# The tanh approximation, x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2 (jax.nn.gelu's).
gelu_tanh = _input_only_gradient(_gelu_tanh, _gelu_tanh_derivative)

# Activations of the Mlp (of its gate, when gated), by config name.
ACTIVATIONS = {'gelu_tanh': gelu_tanh, 'gelu': gelu_erf, 'relu': nn.relu, 'silu': nn.silu}
