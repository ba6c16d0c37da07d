"""Static word embeddings: an input and an output (context) table, and GloVe's two bias vectors.

word2vec (skip-gram, CBOW) scores a word against a context word by the dot product of the first
word's input vector and the second's output vector; GloVe adds a bias per word and table. The
objectives (research/objectives/word2vec.py, glove.py) gather the rows they need through the
methods below; there is no body to run over a sequence.
"""

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from research.models import layers

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class WordVectorsSpec:
  """Everything the tables need, translated once from `config.model`."""
  vocab_size: int
  emb_dim: int
  biases: bool  # GloVe's b_i and b~_j.
  init_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @classmethod
  def from_config(cls, model):
    # word2vec draws its vectors from [-0.5 / dim, 0.5 / dim]: a normal of the same spread.
    return cls(vocab_size=model.vocab_size, emb_dim=model.emb_dim, biases=model.biases,
               init_std=0.5 / model.emb_dim / 3 ** 0.5, dtype=_DTYPES[model.dtype],
               param_dtype=_DTYPES[model.param_dtype])


class Bias(nn.Module):
  """One scalar per word; named `bias` so the optimiser treats it as one (no weight decay)."""
  vocab_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (self.vocab_size,), self.param_dtype)
    return jnp.take(bias, ids, axis=0).astype(self.dtype)


class WordVectors(nn.Module):
  """ids [...] -> vectors [..., emb_dim] of the input table (`__call__`) or the output table
  (`context`); `bias` / `context_bias` give the biases [...] of models that have them."""
  spec: WordVectorsSpec
  sharding: Optional[Callable] = None  # Nothing to constrain: the objectives gather rows.
  deterministic: bool = True  # No dropout; kept so that objectives.apply may clone it.

  def setup(self):
    spec = self.spec
    table = lambda: layers.Embed(spec.vocab_size, spec.emb_dim, init_std=spec.init_std,
                                 dtype=spec.dtype, param_dtype=spec.param_dtype)
    self.input, self.output = table(), table()
    if spec.biases:
      bias = lambda: Bias(spec.vocab_size, spec.dtype, spec.param_dtype)
      self.input_bias, self.output_bias = bias(), bias()

  def __call__(self, ids):
    return self.input(ids)

  def context(self, ids):
    return self.output(ids)

  def bias(self, ids):
    return self.input_bias(ids)

  def context_bias(self, ids):
    return self.output_bias(ids)

  def initialize(self, tokens):
    """Every table (what `init` calls to create every parameter)."""
    outputs = dict(input=self(tokens), output=self.context(tokens))
    if self.spec.biases:
      outputs.update(bias=self.bias(tokens), context_bias=self.context_bias(tokens))
    return outputs


def spec_from_config(model_config):
  return WordVectorsSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build."""
  if model_config.dropout_rate:
    raise ValueError(f'model.dropout_rate={model_config.dropout_rate}: word vectors have no '
                     'dropout; set model.dropout_rate=0.')


def sharded_heads(model_config):
  """No heads: any mesh.tensor that divides the devices will do."""
  del model_config
  return {}


def build(model_config, sharding=None):
  return WordVectors(WordVectorsSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `WordVectors.initialize` for abstract or real initialisation."""
  return dict(tokens=jnp.zeros((1, seq_len), jnp.int32))



def dot_flops(spec):
  """Training FLOPs of one score (a dot product of two vectors): forward and backward."""
  return 6 * spec.emb_dim


def vectors(params, objective_name):
  """The [vocab, emb_dim] vectors a run exports: GloVe's input plus output vectors (as its
  paper), word2vec's input vectors (as its code)."""
  vectors = params['input']['embedding']
  if objective_name == 'glove':
    vectors = vectors + params['output']['embedding']
  return vectors
