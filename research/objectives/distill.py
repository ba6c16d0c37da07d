"""Knowledge distillation (objective.name=distill): a student learns from a trained teacher.

The objective wraps the run's base objective (objective.base: causal_lm, mlm, span_corruption,
prefix_lm, ul2 or seq2seq), whose data, batch spec, hard-label loss and metrics it keeps. At every
position the base scores, with the base's weights and global denominators, the student's
distribution softened by T = objective.temperature is pulled towards the teacher's:

  loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the base objective's loss

(T^2 keeps the soft term's gradients on the hard term's scale whatever T; Hinton et al. 2015).
With objective.hidden_weight > 0 the student's hidden states (its body's output), through a
learned projection to the teacher's width (params['distill_projection'], trained with the
student), are pulled towards the teacher's too: hidden_weight * the mean over features of the
squared difference, averaged over the scored positions (every real token for the masked LM).

The teacher is the newest checkpoint of another run's workdir (objective.teacher), built by its
family from that run's config.json and restored sharded over this run's mesh by the same logical
rules as the student. Its parameters are frozen inputs of the train and eval steps (`frozen`),
never part of the train state: not trained, not in the optimizer state, not in the student's
checkpoints; every start reads them again. Reported metrics are the base objective's, of the
student on the hard labels (comparable with a run trained from scratch), plus `kl` (and
`hidden_mse`).

The base objective calls its model only through objectives.apply (model.apply, or
model.clone(...).apply with dropout), once per `sums`: the student and the teacher are handed to
it wrapped in a _Recorder that keeps what that call returns (the logits of each term) and, for
hidden-state matching, the output of the module's __call__.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import mesh as mesh_lib
from research import models
from research import objectives
from research import partitioning
from research import workdir as workdir_lib
from research.data import tokenizer as tokenizer_lib
from research.models import layers

# The base objectives, by the batch field that weighs the positions each scores (the vocabulary
# term; a term without one, the sentence-pair head, weighs every row once).
SCORED = {'causal_lm': 'weights', 'mlm': 'mlm_weights', 'span_corruption': 'decoder_weights',
          'prefix_lm': 'decoder_weights', 'ul2': 'decoder_weights', 'seq2seq': 'decoder_weights'}


# The objective.* keys it reads, besides name; the base objective's (wraps) are read too.
SETTINGS = ('base',) + objectives.LOSS_SETTINGS


def wraps(config):
  """The base objective's module: the run reads its data (documents, or seq2seq's pairs)."""
  return objectives.get(config.objective.base)

# The positions whose hidden states are matched (those > 0): the scored ones, except for the
# masked LM, which scores a few gathered positions: there every real token.
HIDDEN_POSITIONS = dict(SCORED, mlm='segment_ids')
TEACHER_DTYPES = ('float32', 'bfloat16')
PROJECTION = 'distill_projection'  # The student's parameters of the hidden-state projection.
HIDDEN = 'hidden'  # The loss term of hidden-state matching.
_PROJECTION_SALT = 0x44495354


def check_config(config, family):
  o = config.objective
  if 'base' not in o:  # Its config file gives no distillation settings (common.distill_defaults).
    raise ValueError(f'{config.variant} has no distillation settings (objective.base, alpha, '
                     'temperature, teacher), so objective.name=distill cannot train it; distill '
                     'into a config of configs/decoder.py, encoder.py, encoder_decoder.py, '
                     'rnn.py or finetune.py.')
  if o.get('base') not in SCORED:
    raise ValueError(f'objective.base={o.get("base")!r} is not one of {sorted(SCORED)} (the '
                     'objectives that distillation wraps).')
  objectives.get(o.base).check_config(config, family)
  if not 0 <= o.alpha <= 1:
    raise ValueError(f'objective.alpha={o.alpha} must lie in [0, 1] (the weight of the '
                     'teacher\'s soft targets).')
  if o.temperature <= 0:
    raise ValueError(f'objective.temperature={o.temperature} must be positive (2.0 is usual).')
  if o.hidden_weight < 0:
    raise ValueError(f'objective.hidden_weight={o.hidden_weight} must not be negative (0 turns '
                     'hidden-state matching off).')
  if o.teacher_dtype not in TEACHER_DTYPES:
    raise ValueError(f'objective.teacher_dtype={o.teacher_dtype!r} is not one of '
                     f'{list(TEACHER_DTYPES)}.')
  teacher = teacher_config(o.teacher)
  # The teacher answers the same batches through the same model call as the student: whether it
  # can comes first, before any setting the student would change to match it.
  as_teacher = ml_collections.ConfigDict(dict(config.to_dict(), model=teacher.model.to_dict()))
  try:
    objectives.get(o.base).check_config(as_teacher, models.get(teacher.model.family))
    if config.train.seq_len > teacher.model.max_len:
      raise ValueError(f'train.seq_len={config.train.seq_len} exceeds its model.max_len='
                       f'{teacher.model.max_len}')
  except ValueError as error:
    # The reason only: the advice after it would be for the teacher's run, not for this one.
    reason = str(error).split('; ')[0].rstrip('.')
    raise ValueError(f'The teacher in {o.teacher} cannot take part: {reason}; distill from a '
                     'teacher that the base objective can train.') from None
  if teacher.model.vocab_size != config.model.vocab_size:
    raise ValueError(f'The teacher in {o.teacher} has model.vocab_size={teacher.model.vocab_size} '
                     f'but this run {config.model.vocab_size}; distill into a student with '
                     f'--config.model.vocab_size={teacher.model.vocab_size}.')
  _check_same_tokenizer(config, o.teacher)


def _check_same_tokenizer(config, teacher):
  """Token ids mean the same to both: the teacher's saved tokenizer (absent from a run made
  by conversion) must be the student's, sentinels included."""
  saved = tokenizer_lib.load_saved(os.path.join(teacher, tokenizer_lib.SAVED_DIR))
  if saved is None or config.data.source == 'markov':
    return
  mine = tokenizer_lib.get(config.data.tokenizer, extra_ids=config.data.extra_ids)
  if saved.fingerprint != mine.fingerprint:
    extra = len(saved.sentinel_ids)
    raise ValueError(f'The teacher in {teacher} reads text with the tokenizer {saved.name} '
                     f'({extra} sentinels) and this run with {mine.name} '
                     f'({len(mine.sentinel_ids)}); distill with --config.data.tokenizer='
                     f'{saved.name} --config.data.extra_ids={extra}.')


def teacher_config(workdir):
  """The config of the teacher run in `workdir`, which must hold a finished checkpoint."""
  if not workdir:
    raise ValueError('objective.name=distill needs objective.teacher, the workdir of a trained '
                     'run.')
  if not os.path.isdir(workdir):
    what = 'is a file' if os.path.isfile(workdir) else 'does not exist'
    raise ValueError(f'objective.teacher={workdir} {what}; point it at the workdir of a trained '
                     'run.')
  if os.path.exists(os.path.join(workdir, 'config.json')):
    family = workdir_lib.load_config(workdir).model.family
    if getattr(models.get(family), 'COUNTED', False):  # It saves counts, never a checkpoint.
      raise ValueError(f'objective.teacher={workdir} holds a model.family={family} run, which is '
                       'counted and has no network to teach with; distill from a neural run.')
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder) or not any(name.isdigit() for name in os.listdir(folder)):
    raise ValueError(f'objective.teacher={workdir} holds no finished checkpoint; train the '
                     'teacher first, or point at a run that has saved one.')
  return workdir_lib.load_config(workdir)  # One sentence when config.json is missing.


def kl_sum(student_logits, teacher_logits, weights, temperature):
  """sum over positions of weights * KL(softmax(teacher / T) || softmax(student / T)), float32;
  logits [..., classes], weights [...]."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.sum(kl * weights.astype(jnp.float32))


def _is_body(context):
  return context.method_name == '__call__' and context.module.scope.path == ()


class _Recorder:
  """Stands in for a linen module where an objective calls it (see the module docstring): passes
  each apply on and keeps its output and, when `hidden`, the output of the module's __call__."""

  def __init__(self, module, hidden, calls=None):
    self.module, self.hidden = module, hidden
    self.calls = [] if calls is None else calls

  def clone(self, **kwargs):
    return _Recorder(self.module.clone(**kwargs), self.hidden, self.calls)

  def apply(self, *args, **kwargs):
    if not self.hidden:
      out = self.module.apply(*args, **kwargs)
      self.calls.append((out, None))
      return out
    bodies = []

    def keep_body(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      if _is_body(context):
        bodies.append(out)
      return out

    with nn.intercept_methods(keep_body):
      out = self.module.apply(*args, **kwargs)
    self.calls.append((out, bodies[-1] if bodies else None))
    return out

  def recorded(self, terms):
    """({term: logits}, hidden states) of the one call the objective made."""
    if len(self.calls) != 1:
      raise ValueError(f'Distillation needs a base objective that applies its model once per '
                       f'batch; this one applied it {len(self.calls)} times.')
    out, hidden = self.calls[0]
    return (out if isinstance(out, dict) else {terms[0]: out}), hidden


def body_width(model, init_inputs):
  """The feature size of the hidden states the model's __call__ returns (nothing allocated)."""
  widths = []

  def keep(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_body(context):
      widths.append(out.shape[-1])
    return out

  with nn.intercept_methods(keep):
    jax.eval_shape(lambda: model.init(jax.random.key(0), **init_inputs, method='initialize'))
  return widths[0]


class _WithProjection:
  """Initialises the student and, beside its parameters, the projection of its hidden states
  (under PROJECTION, from a key of its own: the student starts as it would without it). Used
  where the train state is created, which calls only `init`."""

  def __init__(self, model, projection, width):
    self.model, self.projection, self.width = model, projection, width

  def init(self, key, method, **inputs):
    variables = self.model.init(key, method=method, **inputs)
    extra = self.projection.init(jax.random.fold_in(key, _PROJECTION_SALT),
                                 jnp.zeros((1, self.width), jnp.float32))
    return dict(variables, params={**variables['params'], PROJECTION: extra['params']})


class Objective:

  def __init__(self, config):
    self.config = config
    o = config.objective
    self.base = objectives.get(o.base).Objective(config)
    self.scored, self.hidden_positions = SCORED[o.base], HIDDEN_POSITIONS[o.base]
    self.alpha, self.temperature = float(o.alpha), float(o.temperature)
    self.hidden_weight = float(o.hidden_weight)
    self._teacher_config = None
    self._projection_module = None
    self.teacher_model = None  # Built on the run's mesh by `frozen`.

  # The batch, the data and throughput are the base objective's.
  def fields(self, seq_len):
    return self.base.fields(seq_len)

  def transform(self, tokenizer):
    return self.base.transform(tokenizer)

  def tokens(self, batch):
    return self.base.tokens(batch)

  def synthetic_batch(self, rng):
    return self.base.synthetic_batch(rng)

  def teacher(self):
    """The teacher run's config, with its model computing in objective.teacher_dtype."""
    if self._teacher_config is None:
      config = teacher_config(self.config.objective.teacher).to_dict()
      config['model']['dtype'] = self.config.objective.teacher_dtype
      self._teacher_config = ml_collections.ConfigDict(config)
    return self._teacher_config

  def frozen(self, mesh, abstract=False):
    """(teacher parameters, their shardings) on `mesh`, by the logical rules that shard the
    student, cast to objective.teacher_dtype; ShapeDtypeStructs when `abstract` (planning)."""
    teacher = self.teacher()
    family = models.get(teacher.model.family)
    config_lib.check_tensor_axis(family, teacher.model, mesh.shape[mesh_lib.TENSOR])
    self.teacher_model = family.build(teacher.model, partitioning.ActivationSharding(mesh))
    dtype = jnp.dtype(teacher.model.dtype)
    cast = lambda x: dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    saved = models.abstract_params_on(family, teacher.model, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, saved)
    if abstract:
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, cast(x), sharding=x.sharding),
                          saved), shardings
    params, _ = checkpoint_lib.read_params(
        os.path.join(self.config.objective.teacher, 'checkpoints'), saved)
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cast(x)), p),
                     out_shardings=shardings)(params)
    return params, shardings

  def init_model(self, model):
    """The student alone, or with the hidden-state projection when hidden_weight > 0."""
    if not self.hidden_weight:
      return model
    family = models.get(self.config.model.family)
    width = body_width(model, family.init_inputs(8))
    return _WithProjection(model, self._projection(width), width)

  def _projection(self, width):
    """Student hidden states [..., width] -> the teacher's width."""
    if self._projection_module is None:
      teacher = self.teacher()
      family = models.get(teacher.model.family)
      teacher_width = body_width(family.build(teacher.model), family.init_inputs(8))
      self._projection_module = layers.DenseGeneral((teacher_width,), ('embed', None),
                                                    init_std=width ** -0.5)
    return self._projection_module

  def counts(self, batch):
    counts = self.base.counts(batch)
    if self.hidden_weight:
      counts[HIDDEN] = jnp.sum((batch[self.hidden_positions] > 0).astype(jnp.float32))
    return counts

  def sums(self, model, params, batch, rng, frozen=None):
    if frozen is None or self.teacher_model is None:
      raise ValueError('objective.name=distill needs the teacher: build the steps with '
                       'objective.frozen(mesh) as their frozen argument.')
    hidden = self.hidden_weight > 0
    terms = list(self.base.counts(batch))
    student = _Recorder(model, hidden)
    own = {k: v for k, v in params.items() if k != PROJECTION}
    hard = self.base.sums(student, own, batch, rng)
    teacher = _Recorder(self.teacher_model, hidden)
    self.base.sums(teacher, jax.lax.stop_gradient(frozen), batch, None)  # Only its logits count.
    student_logits, student_hidden = student.recorded(terms)
    teacher_logits, teacher_hidden = teacher.recorded(terms)
    sums = {}
    for term in terms:
      # The vocabulary term comes first (the masked LM lists its pair head second).
      weights = (batch[self.scored] if term == terms[0]
                 else jnp.ones(student_logits[term].shape[:-1], jnp.float32))
      kl = kl_sum(student_logits[term], jax.lax.stop_gradient(teacher_logits[term]), weights,
                  self.temperature)
      loss = ((1.0 - self.alpha) * hard[term]['loss']
              + self.alpha * self.temperature ** 2 * kl)
      sums[term] = dict(hard[term], loss=loss, hard_loss=hard[term]['loss'], kl=kl)
    if hidden:
      projected = self._projection(student_hidden.shape[-1]).apply(
          {'params': params[PROJECTION]}, student_hidden.astype(jnp.float32))
      target = jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)
      error = jnp.mean(jnp.square(projected - target), axis=-1)
      squared = jnp.sum(error * (batch[self.hidden_positions] > 0).astype(jnp.float32))
      sums[HIDDEN] = dict(loss=self.hidden_weight * squared, squared=squared)
    return sums

  def _terms(self):
    """The base objective's loss terms, vocabulary term first (from abstract batch shapes)."""
    fields = self.base.fields(self.config.train.seq_len)
    batch = {name: jax.ShapeDtypeStruct((1,) + f.shape, f.dtype) for name, f in fields.items()}
    return list(jax.eval_shape(self.base.counts, batch))

  def metric_names(self):
    pairs = tuple(f'{term}_kl' for term in self._terms()[1:])
    return (self.base.metric_names() + ('kl',) + pairs
            + (('hidden_mse',) if self.hidden_weight else ()))

  def metrics(self, totals):
    totals = dict(totals)
    hidden = totals.pop(HIDDEN, None)
    # The base reports the student's hard-label loss, as it would without a teacher.
    metrics = self.base.metrics({term: dict(total, loss=total['hard_loss'])
                                 for term, total in totals.items()})
    # The vocabulary term's (the first); a pair head's KL per row is reported on its own.
    terms = list(totals)
    metrics['kl'] = objectives.ratio(totals[terms[0]]['kl'], totals[terms[0]]['count'])
    for term in terms[1:]:
      metrics[f'{term}_kl'] = objectives.ratio(totals[term]['kl'], totals[term]['count'])
    if hidden is not None:
      metrics['hidden_mse'] = objectives.ratio(hidden['squared'], hidden['count'])
    return metrics

  def flops_per_token(self, family, spec):
    """The student's training plus the teacher's forward pass (a third of its training)."""
    teacher = self.teacher()
    teacher_family = models.get(teacher.model.family)
    return (self.base.flops_per_token(family, spec) + self.base.flops_per_token(
        teacher_family, teacher_family.spec_from_config(teacher.model)) / 3)
