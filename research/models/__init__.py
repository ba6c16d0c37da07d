"""Model families, chosen by `config.model.family`: one module per family.

A family module provides
  spec_from_config(model_config)      the network's explicit arguments
  check_config(model_config)          ValueError in one sentence for what it cannot build
  sharded_heads(model_config)         head counts that mesh.tensor must divide
  build(model_config, sharding)       the linen module: __call__ returns hidden states, heads are
                                      methods, `initialize` creates every parameter; a
                                      vocabulary head also has `head_inputs(hidden)` ->
                                      {features, kernel, bias, vocab_axis}, its logits being
                                      features @ kernel (+ bias), so that a loss can compute
                                      them in chunks (objectives/chunked_loss.py)
  init_inputs(seq_len)                arguments of `initialize` for abstract initialisation
  FLOPs of its body and heads, for MFU (what its objectives call)
  HF_MODEL_TYPES                      Hugging Face model types its converter reads (optional)
  GENERATES_TEXT                      True when research.decode can sample from it (optional)
  vectors(params, objective_name)     the [vocab, dim] word vectors research.word_vectors
                                      evaluates and exports (optional)
  TORCH_PEER                          the PyTorch module research.bench --peer=torch times

From `build` and `init_inputs`, this module derives every family's parameter tree without
allocating it (`abstract_params(family, model_config)`, `abstract_params_on` for a mesh) and its
exact size (`count_params(family, model_config)`).
"""

import importlib
import math

FAMILIES = {
    'decoder': 'research.models.decoder',
    'encoder': 'research.models.encoder',
    'encoder_decoder': 'research.models.encoder_decoder',
    'rnn': 'research.models.rnn',
    'rnn_seq2seq': 'research.models.rnn_seq2seq',
    'ngram': 'research.models.ngram',
    'word_vectors': 'research.models.word_vectors',
}


def _boxed_params(family, model_config):
  """The parameter tree of family module `family`'s network for `model_config` as
  ShapeDtypeStructs, boxed with their logical axes (nothing is allocated)."""
  import jax  # Imported on use: the registry itself stays light.
  model = family.build(model_config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), **family.init_inputs(8),
                                           method='initialize'))['params']


def abstract_params(family, model_config):
  """The parameter tree of family module `family`'s network for `model_config` as
  ShapeDtypeStructs (nothing is allocated)."""
  from flax import linen as nn
  return nn.meta.unbox(_boxed_params(family, model_config))


def count_params(family, model_config):
  """The exact parameter count of family module `family`'s network for `model_config`."""
  return size(abstract_params(family, model_config))


def count_embedding_params(family, model_config):
  """The parameters indexed by the vocabulary or by position (token and position embeddings,
  untied output layers): what scaling laws leave out of a model's size (Kaplan et al. 2020)."""
  import jax
  from flax import linen as nn
  boxed = jax.tree.leaves(_boxed_params(family, model_config),
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return sum(leaf.value.size for leaf in boxed
             if isinstance(leaf, nn.Partitioned) and {'vocab', 'positions'} & set(leaf.names))


def abstract_params_on(family, model_config, mesh):
  """The parameter tree as ShapeDtypeStructs carrying each parameter's NamedSharding on `mesh`
  (by its logical axes; see research/partitioning.py): the target of a sharded restore."""
  import jax
  from flax import linen as nn
  from research import partitioning
  boxed = _boxed_params(family, model_config)
  shardings = partitioning.tree_shardings(boxed, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def size(tree):
  """The number of parameters in a tree of arrays or ShapeDtypeStructs."""
  import jax
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def get(name):
  """The family module called `name`; an unknown name is a ValueError listing the families."""
  if name not in FAMILIES:
    raise ValueError(f'config.model.family={name!r} is not one of {sorted(FAMILIES)}.')
  return importlib.import_module(FAMILIES[name])
