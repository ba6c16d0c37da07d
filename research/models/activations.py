"""The MLPs' activations; GELU keeps only its input for the backward pass.

Differentiated as written, a GELU keeps its erf or tanh term for the backward pass: XLA then
computes the forward pass in two loops over the [tokens, mlp] activations (the term, then the
product), stores one more such array and reads it back. Under jax.checkpoint the backward pass
recomputes the term from the input instead, so the forward pass is one loop and only its input
stays alive; `prevent_cse` stops XLA from sharing the forward pass's term with the recomputation
again. jax.checkpoint, unlike a hand-written gradient, keeps every transformation working
(forward mode, jax.linearize, higher derivatives). The CPU variants' compiled train steps hold
8-23% fewer bytes at their peak; their speed moves little (docs/performance.md).

GELU comes as the tanh approximation ('gelu_new' of GPT-2, ALBERT and T5 v1.1) and the exact erf
form (BERT, RoBERTa): checkpoints are trained with one; the other shifts outputs.
"""

import math

import jax
from flax import linen as nn


def _input_only(function):
  return jax.checkpoint(function, prevent_cse=True)


def _gelu_erf(x):
  # jax.nn.gelu(approximate=False) takes erfc instead, which XLA:CPU evaluates with an exponential
  # and selects: twice the time of erf's one rational function. Both agree with float64 within
  # 2e-6 absolute, as PyTorch's float32 kernel, also erf's, does; below x = -5, where the GELU is
  # under 1.5e-6, erf's form loses its relative precision (it is 0 from x = -6).
  return x * (0.5 + 0.5 * jax.lax.erf(x * math.sqrt(0.5)))  # Python floats keep x's dtype.


def _gelu_tanh(x):
  return nn.gelu(x, approximate=True)


# The exact GELU, x (1 + erf(x / sqrt 2)) / 2, as PyTorch and transformers compute it.
gelu_erf = _input_only(_gelu_erf)
# The tanh approximation, x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2 (jax.nn.gelu's).
gelu_tanh = _input_only(_gelu_tanh)

# Activations of the Mlp (of its gate, when gated), by config name.
ACTIVATIONS = {'gelu_tanh': gelu_tanh, 'gelu': gelu_erf, 'relu': nn.relu, 'silu': nn.silu}
