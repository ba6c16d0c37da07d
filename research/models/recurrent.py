"""A segment-aware recurrent layer: Flax's library cells (Elman, LSTM, GRU) scanned over time.

The carry is reset to zeros wherever `segment_ids` changes between neighbouring positions, so a
row packed with several documents gives each document exactly the outputs it would get alone.
A row starts from zeros (or the given initial carry): training truncates backpropagation
through time at the row, and no state flows from one row or batch to the next.

The scan is `nn.scan` over a step function rather than `nn.RNN`, because nn.RNN can only stop
a sequence early (seq_lengths), not restart the state in the middle of one. The carry stays in
float32 whatever the compute dtype: it accumulates over every step of a row. The LSTM is
nn.OptimizedLSTMCell (the parameters of nn.LSTMCell, its four gates in one matmul per step).

decode=True keeps the carry and the previous position's segment id in the 'cache' collection,
so that decoding feeds one token at a time (or a prompt at once) from where the last call
stopped; a left-padded prompt's padding (segment 0) is forgotten at its first real token.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

CELLS = ('rnn', 'lstm', 'gru')

# Weight matrices of each cell per input and recurrent connection (multiply-adds per position
# and parameters): Elman has one, the LSTM four gates, the GRU three.
GATES = {'rnn': 1, 'lstm': 4, 'gru': 3}


def cell_multiply_adds(cell, in_dim, hidden_dim):
  """Multiply-adds of one cell step per position (the weight matrices; gates are elementwise)."""
  return GATES[cell] * (in_dim + hidden_dim) * hidden_dim


def _step(cell, carry, inputs):
  """One position: the carry restarts from zeros where a new segment begins."""
  x, reset = inputs
  carry = jax.tree.map(lambda c: jnp.where(reset[:, None], jnp.zeros_like(c), c), carry)
  new, y = cell(carry, x)
  # Kept in the carry's dtype: the cells compute in `dtype` and would change it.
  return jax.tree.map(lambda n, c: n.astype(c.dtype), new, carry), y


class Recurrent(nn.Module):
  """inputs [batch, length, in_dim] -> (final carry, outputs [batch, length, hidden_dim]).

  The cell's kernels and biases are replicated (logical axes None): with any of them sharded
  over fsdp or tensor, on a (data=2, fsdp=2, tensor=2) CPU mesh (jax 0.10.2) the gradients
  differed from one device's (same loss, gradients off by O(1)) although every one- and two-axis
  mesh was right. Plain JAX shows the same: a lax.scan Elman network whose weights' output
  dimension is sharded over tensor while its batch spans data and fsdp gets gradients as large as
  the right ones wrong on (2, 2, 2), and right on (1, 4, 2); an XLA partitioning problem of
  loops, not of this layer. tests/test_rnn.py checks that mesh. The embedding and output head
  are sharded as usual.
  """
  cell: str  # One of CELLS.
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  decode: bool = False

  def _cell(self):
    if self.cell not in CELLS:
      raise ValueError(f'cell={self.cell!r} is not one of {list(CELLS)}.')
    kinds = {'rnn': nn.SimpleCell, 'lstm': nn.OptimizedLSTMCell, 'gru': nn.GRUCell}
    kernel_axes = (None, None)  # Replicated: see the class docstring.
    return kinds[self.cell](
        features=self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), kernel_axes),
        recurrent_kernel_init=nn.with_logical_partitioning(nn.initializers.orthogonal(),
                                                           kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name='cell')

  def zero_carry(self, batch):
    """The state of a row before its first token: zeros, (c, h) for the LSTM."""
    zeros = jnp.zeros((batch, self.hidden_dim), jnp.float32)
    return (zeros, zeros) if self.cell == 'lstm' else zeros

  @nn.compact
  def __call__(self, inputs, segment_ids=None, initial_carry=None):
    batch = inputs.shape[0]
    if segment_ids is None:
      segment_ids = jnp.ones(inputs.shape[:2], jnp.int32)
    carry = self.zero_carry(batch) if initial_carry is None else initial_carry
    if self.decode:
      cached_carry = self.variable('cache', 'carry', self.zero_carry, batch)
      cached_segment = self.variable('cache', 'segment', jnp.zeros, (batch,), jnp.int32)
      carry, before = cached_carry.value, cached_segment.value
    else:
      before = segment_ids[:, 0]  # The first position continues the given carry.
    previous = jnp.concatenate([before[:, None], segment_ids[:, :-1]], axis=1)
    resets = segment_ids != previous
    scan = nn.scan(_step, variable_broadcast='params', split_rngs={'params': False},
                   in_axes=1, out_axes=1)
    carry, outputs = scan(self._cell(), carry, (inputs, resets))
    if self.decode and not self.is_initializing():  # Initialisation only allocates the cache.
      cached_carry.value, cached_segment.value = carry, segment_ids[:, -1]
    return carry, outputs.astype(self.dtype)
