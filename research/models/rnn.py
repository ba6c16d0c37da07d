"""Recurrent language models: stacked Elman RNN, LSTM or GRU layers over token embeddings.

tokens -> embedding -> num_layers recurrent layers (research/models/recurrent.py, dropout after
each) -> output head, tied to the embedding (needs emb_dim == hidden_dim) or its own matrix.
It trains with the causal-LM objective and samples through research/decode.py like the
decoder: packed rows restart the state at each document (segment ids), and every row starts
from a zero state, so backpropagation through time is truncated at train.seq_len. Positions
are accepted and unused; max_len only bounds generation for the shared checks.
"""

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from research.models import layers
from research.models import recurrent

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Unit-variance embeddings: at the transformers' 0.02 the inputs barely move the gates (whose
# kernels are scaled for unit inputs) and training sits at the unigram loss for hundreds of steps.
EMBED_INIT_STD = 1.0


@dataclasses.dataclass(frozen=True)
class RnnSpec:
  """Everything the network needs, translated once from `config.model`."""
  cell: str
  vocab_size: int
  num_layers: int
  emb_dim: int
  hidden_dim: int
  max_len: int
  tie_embeddings: bool
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @classmethod
  def from_config(cls, model):
    return cls(cell=model.cell, vocab_size=model.vocab_size, num_layers=model.num_layers,
               emb_dim=model.emb_dim, hidden_dim=model.hidden_dim, max_len=model.max_len,
               tie_embeddings=model.tie_embeddings, dropout_rate=model.dropout_rate,
               dtype=_DTYPES[model.dtype], param_dtype=_DTYPES[model.param_dtype])


class RnnLM(nn.Module):
  """tokens [batch, length] -> hidden states [batch, length, hidden_dim] of the last layer
  (after dropout); `logits(hidden)` applies the output head to any leading shape.

  decode=True keeps each layer's carry in the 'cache' collection (see recurrent.Recurrent);
  `init` with method='language_model' allocates it.
  """
  spec: RnnSpec
  # Unused, kept for the family protocol: the activations follow the batch and the parameters
  # (see recurrent.Recurrent for why its cells are replicated; constraints on the embeddings or
  # logits were part of the same wrong-gradient failure on a 2x2x2 mesh).
  sharding: Optional[Callable] = None
  deterministic: bool = True  # False: dropout on (needs a 'dropout' rng).
  decode: bool = False

  def setup(self):
    spec = self.spec
    self.token_embed = layers.Embed(spec.vocab_size, spec.emb_dim, init_std=EMBED_INIT_STD,
                                    dtype=spec.dtype, param_dtype=spec.param_dtype)
    self.layers = [recurrent.Recurrent(spec.cell, spec.hidden_dim, dtype=spec.dtype,
                                       param_dtype=spec.param_dtype, decode=self.decode)
                   for _ in range(spec.num_layers)]  # layers_0, layers_1...
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    if not spec.tie_embeddings:
      self.lm_head = layers.DenseGeneral((spec.vocab_size,), ('embed', 'vocab'), dtype=spec.dtype,
                                         param_dtype=spec.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None):
    del positions  # The state carries the order.
    x = self.token_embed(tokens)
    for layer in self.layers:
      _, x = layer(x, segment_ids)
      x = self.dropout(x)  # Between layers, and before the head after the last.
    return x

  def logits(self, hidden):
    """float32 logits [..., vocab] of hidden states [..., hidden_dim]."""
    if self.spec.tie_embeddings:
      logits = self.token_embed.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return logits.astype(jnp.float32)

  def language_model(self, tokens, positions=None, segment_ids=None):
    """Next-token logits at every position."""
    return self.logits(self(tokens, positions, segment_ids))

  def initialize(self, tokens, positions=None, segment_ids=None):
    """The body and the head (what `init` calls to create every parameter)."""
    return dict(logits=self.language_model(tokens, positions, segment_ids))


GENERATES_TEXT = True  # research/decode.py samples from it.


def spec_from_config(model_config):
  return RnnSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build."""
  m = model_config
  if m.cell not in recurrent.CELLS:
    raise ValueError(f'config.model.cell={m.cell!r} is not one of {list(recurrent.CELLS)}.')
  if m.tie_embeddings and m.emb_dim != m.hidden_dim:
    raise ValueError(f'model.tie_embeddings=True needs model.emb_dim ({m.emb_dim}) equal to '
                     f'model.hidden_dim ({m.hidden_dim}); make them equal or set '
                     'model.tie_embeddings=False.')


def sharded_heads(model_config):
  """No attention heads: any tensor axis size works (a dimension it does not divide stays
  replicated)."""
  del model_config
  return {}


def build(model_config, sharding=None):
  return RnnLM(RnnSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `RnnLM.initialize` for abstract or real initialisation."""
  return dict(tokens=jnp.zeros((1, seq_len), jnp.int32))



# Model FLOPs for MFU (training = 3x forward, a multiply-add = 2 FLOPs), as the decoder counts.

def body_flops_per_token(spec, seq_len):
  """6 * the cells' weight multiply-adds per position; the state makes no per-length term."""
  del seq_len
  in_dims = [spec.emb_dim] + [spec.hidden_dim] * (spec.num_layers - 1)
  return 6 * sum(recurrent.cell_multiply_adds(spec.cell, d, spec.hidden_dim) for d in in_dims)


def lm_head_flops_per_position(spec):
  return 6 * spec.hidden_dim * spec.vocab_size
