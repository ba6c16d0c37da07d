"""Training objectives, chosen by `config.objective.name`: one module per objective.

An objective module provides `check_config(config, family)` (ValueError in one sentence for what
it cannot train) and a class `Objective(config)` with
  fields(seq_len) -> {name: Field}      the batch spec: it drives the batch shardings, the host
                                        assembly of global batches and padding
  transform(tokenizer)                  the data side (research/data/windows.py): documents ->
                                        examples, deterministic in the seed and the example's
                                        index (and the epoch where the objective wants it),
                                        packed into rows and finished into the batch fields;
                                        its span / capacity / positions size windows and the
                                        room each example takes in a row (per stream: an
                                        encoder-decoder row has inputs and targets), and its
                                        example / pack / finish_row make the row; for
                                        labelled data (DATA = 'labeled') row(example) makes
                                        one row of one example
  counts(batch) -> {term: count}        each loss term's denominator over the WHOLE global batch
  sums(model, params, batch, rng)       {term: {'loss': sum, 'correct': sum}} of a (micro-)batch
  tokens(batch)                         real input tokens, for throughput (host or device arrays)
  metrics(totals) -> {name: value}      what training and evaluation report, from summed totals
  metric_names()                        the names metrics() returns
  flops_per_token(family, spec)         model FLOPs per token position, for MFU
  synthetic_batch(rng)                  a batch of random tokens, for benchmarks
Optional, in the module: notes(config) -> sentences printed as a run starts, for settings that
train but waste work (prefix_lm.py). Optional in the class (distill.py): frozen(mesh) ->
(arrays, shardings) it reads but never trains, which the steps pass to sums(..., frozen);
init_model(model) -> what initialises the parameters, when the objective adds parameters of its
own.

The train step divides each term's sum by its global count before adding the terms, so
micro-batching, packing and the host count leave every term unchanged.
"""

import dataclasses
import importlib
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from research.data import sources

OBJECTIVES = {
    'causal_lm': 'research.objectives.causal_lm',
    'mlm': 'research.objectives.mlm',
    'classification': 'research.objectives.classification',
    'span_corruption': 'research.objectives.span_corruption',
    'prefix_lm': 'research.objectives.prefix_lm',
    'ul2': 'research.objectives.ul2',
    'seq2seq': 'research.objectives.seq2seq',
    'skipgram': 'research.objectives.word2vec',
    'cbow': 'research.objectives.word2vec',
    'glove': 'research.objectives.glove',
    'distill': 'research.objectives.distill',
}


def get(name):
  """The objective module called `name`; an unknown name is a ValueError listing them."""
  if name not in OBJECTIVES:
    raise ValueError(f'config.objective.name={name!r} is not one of {sorted(OBJECTIVES)}.')
  return importlib.import_module(OBJECTIVES[name])


# objective.* settings that shape no row, only the loss (distillation's teacher and weights): the
# data position of a checkpoint records the others, so that a resume may change these.
LOSS_SETTINGS = ('teacher', 'alpha', 'temperature', 'hidden_weight', 'teacher_dtype')


def data_settings(config):
  """The objective.* settings the rows of `config`'s run depend on."""
  return {k: v for k, v in config.objective.to_dict().items() if k not in LOSS_SETTINGS}


def data_module(config):
  """The objective module whose data `config`'s run reads (DATA, TARGETS): the configured
  objective's, or that of the objective it wraps (objective.wraps(config): distillation's base)."""
  module = get(config.objective.name)
  return module.wraps(config) if hasattr(module, 'wraps') else module


def settings_read(config):
  """The objective.* keys the configured objective reads (each module's SETTINGS, and those of
  the objective it wraps), name included."""
  module = get(config.objective.name)
  read = {'name', *module.SETTINGS}
  if hasattr(module, 'wraps') and config.objective.get('base') in OBJECTIVES:
    read.update(module.wraps(config).SETTINGS)
  return read


def notes(config):
  """The configured objective's notes on settings that train but waste work (those of the
  objective it wraps, for distillation)."""
  module = data_module(config)
  return list(module.notes(config)) if hasattr(module, 'notes') else []


def check_overrides(config, keys):
  """One sentence where a command line sets an objective.* key (of `keys`) that the configured
  objective does not read: a family's objective section holds the settings of all its
  objectives, and one set for another objective would change nothing."""
  if not keys or config.objective.name not in OBJECTIVES:
    return  # An unknown name is named by validation.
  read = settings_read(config)
  setting = 'objective.base' if config.objective.name == 'distill' else 'objective.name'
  for key in keys:
    if key in config.objective and key not in read:
      # Of the objectives this family's section serves (all their settings are in it).
      readers = sorted(name for name in OBJECTIVES if key in get(name).SETTINGS
                       and all(k in config.objective for k in get(name).SETTINGS))
      others = ', '.join(f'objective.{k}' for k in sorted(read - {'name'}))
      instead = (f'or set {setting} to one that reads it ({", ".join(readers)})' if readers
                 else 'as no objective of this family reads it')
      raise ValueError(
          f'objective.{key} is not read by objective.name={config.objective.name}, which reads '
          f'{others or "no objective setting besides its name"}; drop it, {instead}.')


def build(config):
  """The configured objective of `config`."""
  return get(config.objective.name).Objective(config)


@dataclasses.dataclass(frozen=True)
class Field:
  """One array of a batch: its shape, dtype and logical axis names per row (the batch dimension,
  logical name 'batch', comes first), and the value of its padding."""
  shape: Tuple[int, ...]
  dtype: type
  axes: Tuple[str, ...]
  pad: int = 0


def init_model(objective, model):
  """What initialises the parameters: the model, or the model with parameters of the
  objective's own beside its own (objective.init_model: distillation's projection)."""
  return objective.init_model(model) if hasattr(objective, 'init_model') else model


def frozen(objective, mesh, abstract=False):
  """(arrays, shardings) the objective reads but never trains (objective.frozen: a teacher's
  parameters, read again at every start; ShapeDtypeStructs when `abstract`), or (None, None)."""
  return objective.frozen(mesh, abstract) if hasattr(objective, 'frozen') else (None, None)


def token_fields(seq_len, names, pad_id=0):
  """Per-token fields: int32 ids (tokens padded with `pad_id`) and float32 `*weights`."""
  fields = {}
  for name in names:
    dtype = np.float32 if name.endswith('weights') else np.int32
    fields[name] = Field((seq_len,), dtype, ('length',), pad_id if name == 'tokens' else 0)
  return fields


def token_losses(logits, targets):
  """Per-position cross entropy in float32: logsumexp(logits) - logits[target]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def cross_entropy_sums(logits, targets, weights):
  """{'loss': weighted cross-entropy sum, 'correct': weighted count of correct argmaxes}."""
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(loss=jnp.sum(token_losses(logits, targets) * weights),
              correct=jnp.sum(correct * weights))


def check_word_documents(config, reads):
  """The word-vector objectives (word2vec, GloVe) read documents of words: a text source and a
  vocabulary of words, which the default 'bytes' tokenizer is not. `reads` says what the
  objective does with them, for the first sentence."""
  name, data = config.objective.name, config.data
  if data.source not in sources.KINDS:
    raise ValueError(f'objective.name={name} {reads}; set data.source to one of '
                     f'{list(sources.KINDS)} (it is {data.source!r}).')
  if data.tokenizer == 'bytes':
    raise ValueError(f'objective.name={name} learns a vector per word, and '
                     "data.tokenizer='bytes' gives bytes; build a vocabulary of words with "
                     '`python -m research.word_vectors vocab --source text:GLOB --out DIR` and '
                     'pass --config.data.tokenizer=hf:DIR.')


def token_types(model_config):
  """How many token types (sentence A/B) the model embeds: 0 for a family without them (the
  decoder). The second sentence of a pair takes type 1 only when there are two (RoBERTa has one,
  and gives both sentences type 0)."""
  return model_config.type_vocab_size if 'type_vocab_size' in model_config else 0


def apply(model, params, rng, *args, method=None):
  """model.apply with dropout when `rng` is given (training) and without it otherwise; `method`
  may be a function of the bound module (to run the body and several heads in one apply)."""
  if rng is None:
    return model.apply({'params': params}, *args, method=method)
  return model.clone(deterministic=False).apply({'params': params}, *args, method=method,
                                                rngs={'dropout': rng})


def ratio(total, count):
  return total / max(float(count), 1.0)


def host_totals(totals):
  """Device totals as nested dicts of Python floats."""
  return jax.tree.map(float, jax.device_get(totals))
