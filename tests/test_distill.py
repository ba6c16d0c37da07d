"""Knowledge distillation (research/objectives/distill.py): the loss by hand, the frozen teacher,
resume, sharding, hidden-state matching, config errors, and a distilled student that beats the
same student trained from scratch."""

import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import runs
from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import mesh as mesh_lib
from research import models
from research import objectives
from research import train
from research.data import global_batch
from research.data import tokenizer as tokenizer_lib
from research.models import decoder
from research.objectives import causal_lm
from research.objectives import distill


# Small and unscanned, without remat: compiling dominates these tests.
SMALL = dict(max_len=64, remat='none', scan_layers=False)
STUDENT = dict(SMALL, num_layers=1, emb_dim=32, mlp_dim=64, num_heads=4, num_kv_heads=2)
# Sizes no student array has, so that a teacher array in the student's checkpoint would show.
TEACHER = dict(SMALL, num_layers=2, emb_dim=48, mlp_dim=96, num_heads=4, num_kv_heads=2)
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


def _config(decoder_config, teacher, mesh=ONE_DEVICE, **objective):
  config = decoder_config('tiny')
  config.model.update(STUDENT)
  config.train.batch_size, config.train.seq_len, config.train.num_steps = 8, 16, 4
  config.optim.warmup_steps = 1
  for axis in mesh_lib.MESH_AXES:
    config.mesh[axis] = mesh.get(axis, 1)
  config.objective.update(dict(dict(name='distill', teacher=str(teacher)), **objective))
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A decoder run of other sizes with random weights (every prediction depends on them)."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py:tiny'))
  config.model.update(TEACHER)
  config.train.seq_len, config.train.sample_tokens = 16, 0
  return runs.random_run(tmp_path_factory.mktemp('distill') / 'teacher', config)


def _setup(config, mesh=ONE_DEVICE):
  devices = jax.devices()[:math.prod(mesh.values())]
  shape = {axis: mesh.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  config_lib.validate(config, len(devices))
  return train.setup(config, mesh_lib.make_mesh(shape, devices))


@pytest.fixture(scope='module')
def trainer(teacher):
  """One device, hidden-state matching on; tests copy its state before a step (it is donated)."""
  from conftest import REPO, _fast
  decoder_config = lambda variant: _fast(config_lib.load_config_file(
      os.path.join(REPO, 'configs', f'decoder.py:{variant}')))
  return _setup(_config(decoder_config, teacher, alpha=1.0, temperature=2.0, hidden_weight=2.0))


def _batch(trainer, step=0):
  return global_batch.to_global(trainer.pipeline.train_batch(step), trainer.batch_shardings)


def _fresh(trainer):
  return jax.tree.map(jnp.copy, trainer.state)


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_sum_by_hand():
  # At T = 2 the teacher's logits 2 * (0, ln 3) give (1/4, 3/4), the student's (0, 0) give
  # (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) per weighted position.
  teacher = jnp.asarray([[0.0, 2 * math.log(3)], [5.0, -5.0], [0.0, 2 * math.log(3)]])
  student = jnp.zeros((3, 2))
  weights = jnp.asarray([1.0, 0.0, 2.0])
  by_hand = 3 * (0.25 * math.log(0.5) + 0.75 * math.log(1.5))
  assert float(distill.kl_sum(student, teacher, weights, 2.0)) == pytest.approx(by_hand, rel=1e-6)
  assert float(distill.kl_sum(teacher, teacher, weights, 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_loss_is_soft_and_hard_terms_over_the_scored_positions(trainer):
  batch = dict(_batch(trainer))
  batch['weights'] = batch['weights'].at[:, ::3].set(0.0)  # Some positions are not scored.
  params, frozen, objective = trainer.state.params, trainer.frozen, trainer.objective
  sums = objective.sums(trainer.model, params, batch, None, frozen)['lm']
  count = float(objective.counts(batch)['lm'])

  # By hand: T^2 * sum over weighted positions of p_t (log p_t - log p_s), over the count.
  student_params = {k: v for k, v in params.items() if k != distill.PROJECTION}
  inputs = (batch['tokens'], batch['positions'], batch['segment_ids'])
  student = trainer.model.apply({'params': student_params}, *inputs, method='language_model')
  teacher = objective.teacher_model.apply({'params': frozen}, *inputs, method='language_model')
  log_p, log_q = _log_softmax(teacher / 2.0), _log_softmax(student / 2.0)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
  by_hand = 4.0 * np.sum(kl * np.asarray(batch['weights'])) / count
  assert count < batch['weights'].size
  np.testing.assert_allclose(float(sums['loss']) / count, by_hand, rtol=1e-5)

  # alpha = 0: exactly the base objective's loss (and its hard loss is reported either way).
  base = causal_lm.Objective(objective.config).sums(trainer.model, student_params, batch, None)
  objective.alpha = 0.0
  try:
    hard = objective.sums(trainer.model, params, batch, None, frozen)['lm']
  finally:
    objective.alpha = 1.0
  assert float(hard['loss']) == float(base['lm']['loss']) == float(sums['hard_loss'])
  assert float(hard['correct']) == float(base['lm']['correct'])


def test_teacher_gets_no_gradient_and_stays_out_of_the_state(trainer):
  batch = _batch(trainer)

  def loss(params, frozen):
    sums = trainer.objective.sums(trainer.model, params, batch, None, frozen)
    counts = trainer.objective.counts(batch)
    return sum(sums[t]['loss'] / counts[t] for t in counts)

  student_grads, teacher_grads = jax.grad(loss, argnums=(0, 1))(trainer.state.params,
                                                                trainer.frozen)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(teacher_grads))
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(student_grads['layers_0']))
  # Parameters and optimizer state: the student's and its projection's, nothing of the teacher.
  student = models.count_params(decoder, trainer.objective.config.model)
  projection = STUDENT['emb_dim'] * TEACHER['emb_dim']
  assert models.size(trainer.state.params) == student + projection
  teacher_sizes = {TEACHER['emb_dim'], TEACHER['mlp_dim']}
  for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.state):
    if distill.PROJECTION not in jax.tree_util.keystr(path):
      assert not teacher_sizes & set(leaf.shape), (path, leaf.shape)
  before = jax.device_get(trainer.frozen)
  trainer.train_step(_fresh(trainer), batch, trainer.dropout_rng)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), before)
  # The bound step lowers (for the benchmark's analyses) with the teacher as arguments.
  lowered = trainer.train_step.lower(trainer.state, batch, trainer.dropout_rng)
  leaves = [len(jax.tree.leaves(x)) for x in (trainer.state, batch, trainer.frozen)]
  assert len(jax.tree.leaves(lowered.args_info)) == sum(leaves) + 1  # And the rng.


def test_resumed_distillation_continues_identically_and_saves_only_the_student(
    decoder_config, teacher, tmp_path):
  config = _config(decoder_config, teacher, mesh=dict(data=-1))
  config.checkpoint.every_steps = config.train.eval_every = config.train.log_every = 2
  config.train.progress_bar = config.train.tensorboard = False
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  train.run(config, str(straight))
  config.train.stop_at_step = 2
  train.run(config, str(resumed))
  config.train.stop_at_step = -1
  train.run(config, str(resumed))
  for workdir in (straight, resumed):
    assert {r['step'] for r in runs.metrics(workdir) if 'loss' in r} == {2, 4}
  assert runs.losses(straight) == runs.losses(resumed)
  assert runs.metrics(straight)[-1]['eval_kl'] == runs.metrics(resumed)[-1]['eval_kl'] > 0
  a, b = runs.params(straight, 4), runs.params(resumed, 4)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=str(name))
  checkpointer = checkpoint_lib.Checkpointer(str(straight / 'checkpoints'), keep=None)
  saved = checkpointer.read_record(4)['structure']
  checkpointer.close()
  assert {re.match(r'\.(\w+)', name).group(1) for name in saved} == {'step', 'params', 'opt_state'}
  student = checkpoint_lib.structure(models.abstract_params(decoder, config.model))
  assert {k[len('.params'):]: v for k, v in saved.items() if k.startswith('.params')} == student
  teacher_sizes = {TEACHER['emb_dim'], TEACHER['mlp_dim']}
  assert not any(teacher_sizes & set(shape) for shape, _ in saved.values())


def test_sharded_distillation_matches_one_device(decoder_config, teacher, trainer):
  mesh = dict(data=2, fsdp=2, tensor=2)
  sharded = _setup(_config(decoder_config, teacher, mesh, alpha=1.0, temperature=2.0,
                           hidden_weight=2.0), mesh)

  def steps(trainer):
    state, losses = _fresh(trainer), []
    for step in range(2):
      state, metrics = trainer.train_step(state, _batch(trainer, step), trainer.dropout_rng)
      losses.append(float(metrics['loss']))
    return losses, jax.device_get(state.params)

  (sharded_losses, sharded_params), (losses, params) = steps(sharded), steps(trainer)
  np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), sharded_params, params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs
  # The teacher is sharded over the run's mesh by the logical rules that shard the student.
  expected = models.abstract_params_on(decoder, sharded.objective.teacher().model, sharded.mesh)
  for got, want in zip(jax.tree.leaves(sharded.frozen), jax.tree.leaves(expected)):
    assert got.sharding == want.sharding
  assert not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.frozen))


def test_hidden_states_are_matched_through_a_learned_projection(trainer):
  params, objective = trainer.state.params, trainer.objective
  assert params[distill.PROJECTION]['kernel'].shape == (STUDENT['emb_dim'], TEACHER['emb_dim'])
  # The student starts exactly as it would without the projection (same seed, same keys).
  student = {k: v for k, v in params.items() if k != distill.PROJECTION}
  init_rng = jax.random.split(jax.random.key(objective.config.seed))[0]
  alone = jax.jit(lambda key: trainer.model.init(key, **decoder.init_inputs(16),
                                                 method='initialize'))(init_rng)['params']
  jax.tree.map(np.testing.assert_array_equal, student, nn.meta.unbox(alone))

  batch = _batch(trainer)
  sums = objective.sums(trainer.model, params, batch, None, trainer.frozen)
  inputs = (batch['tokens'], batch['positions'], batch['segment_ids'])
  hidden = trainer.model.apply({'params': student}, *inputs)
  teacher_hidden = objective.teacher_model.apply({'params': trainer.frozen}, *inputs)
  projected = np.asarray(hidden) @ np.asarray(params[distill.PROJECTION]['kernel'])
  error = np.mean((projected - np.asarray(teacher_hidden)) ** 2, -1)
  by_hand = np.sum(error * (np.asarray(batch['weights']) > 0))
  np.testing.assert_allclose(float(sums[distill.HIDDEN]['squared']), by_hand, rtol=1e-4)
  np.testing.assert_allclose(float(sums[distill.HIDDEN]['loss']), 2.0 * by_hand, rtol=1e-4)

  kernel = np.asarray(params[distill.PROJECTION]['kernel'])
  state, metrics = trainer.train_step(_fresh(trainer), batch, trainer.dropout_rng)
  state, _ = trainer.train_step(state, batch, trainer.dropout_rng)  # Warm-up: step 0 has lr 0.
  assert np.any(np.asarray(state.params[distill.PROJECTION]['kernel']) != kernel)
  reported = objective.metrics(objectives.host_totals(metrics['totals']))
  assert set(reported) == {'loss', 'accuracy', 'perplexity', 'kl', 'hidden_mse'}
  assert reported['hidden_mse'] == pytest.approx(by_hand / float(batch['weights'].sum()),
                                                 rel=1e-4)


def test_a_bfloat16_teacher_is_cast_once(decoder_config, teacher):
  config = _config(decoder_config, teacher, teacher_dtype='bfloat16')
  objective = objectives.build(config)
  mesh = mesh_lib.make_mesh({axis: 1 for axis in mesh_lib.MESH_AXES}, jax.devices()[:1])
  frozen, _ = objective.frozen(mesh)
  saved = runs.params(teacher, 0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
  assert len(jax.tree.leaves(frozen)) == len(saved)
  embedding = np.asarray(frozen['token_embed']['embedding'], np.float32)
  np.testing.assert_array_equal(embedding, saved[('token_embed', 'embedding')].astype(
      jnp.bfloat16).astype(np.float32))


def test_config_errors_are_one_sentence(decoder_config, teacher, tmp_path):
  (tmp_path / 'a_file').write_text('')
  cases = [
      (dict(teacher=str(tmp_path / 'nowhere')), 'does not exist'),
      (dict(teacher=str(tmp_path / 'a_file')), 'a_file is a file; point it at the workdir'),
      (dict(teacher=str(tmp_path)), 'holds no finished checkpoint'),
      (dict(alpha=1.5), 'objective.alpha=1.5 must lie in [0, 1]'),
      (dict(temperature=0.0), 'objective.temperature=0.0 must be positive'),
      (dict(base='word_salad'), "objective.base='word_salad' is not one of"),
      (dict(teacher_dtype='float16'), "objective.teacher_dtype='float16' is not one of"),
  ]
  for overrides, fragment in cases:
    config = _config(decoder_config, **dict(dict(teacher=teacher), **overrides))
    with pytest.raises(config_lib.ConfigError) as error:
      config_lib.validate(config, 1)
    message = str(error.value)
    assert fragment in message and message.endswith('.'), message
  config = _config(decoder_config, teacher)
  config.model.vocab_size = 300
  with pytest.raises(config_lib.ConfigError, match='vocab_size=264 but this run 300'):
    config_lib.validate(config, 1)


@pytest.mark.parametrize('family, spec, sentence', [
    # Refused before the vocabulary check, which would send the student to match its size first.
    ('encoder_decoder', 'encoder_decoder.py:t5_tiny',
     'cannot take part: objective.name=causal_lm needs a family that predicts the next token; '
     'distill from a teacher'),
    ('rnn_seq2seq', 'rnn_seq2seq.py:gru_attention_tiny',
     'cannot take part: objective.name=causal_lm needs a family that predicts the next token; '
     'distill from a teacher'),
    ('ngram', 'ngram.py', 'which is counted and has no network to teach with'),
])
def test_a_teacher_that_cannot_predict_the_next_token_is_refused_first(
    decoder_config, tmp_path, family, spec, sentence):
  teacher = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', spec))
  (tmp_path / 'config.json').write_text(teacher.to_json())
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)  # As a finished neural run holds.
  config = _config(decoder_config, tmp_path)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert sentence in str(error.value) and str(error.value).endswith('.'), str(error.value)
  assert 'vocab_size' not in str(error.value)


@pytest.mark.parametrize('spec', ['ngram.py:kn3', 'word_vectors.py:glove_tiny'])
def test_a_student_config_without_distillation_settings_is_one_sentence(spec):
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', spec))
  with config.unlocked():
    config.objective.name = 'distill'
  with pytest.raises(config_lib.ConfigError, match=' has no distillation settings .*, so '
                     'objective.name=distill cannot train it; distill into a config of '):
    config_lib.validate(config, 1)


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_from_scratch(tmp_path):
  def command(workdir, *overrides):
    return runs.ok(runs.command(
        'research.train', '--config', 'configs/decoder.py:tiny', '--workdir', str(workdir),
        '--cpu_devices=1', '--config.train.progress_bar=False', '--config.train.sample_tokens=0',
        '--config.train.tensorboard=False', f'--config.data.data_dir={tmp_path / "tfds"}',
        '--config.train.seq_len=64', '--config.train.log_every=1000',
        '--config.optim.warmup_steps=10', *overrides))

  def final_eval_loss(result):
    return float(re.search(r'eval_loss=(\S+)', result.stdout).group(1))

  command(tmp_path / 'teacher', '--config.model.num_layers=2', '--config.model.emb_dim=96',
          '--config.model.mlp_dim=256', '--config.train.batch_size=16',
          '--config.train.num_steps=150', '--config.train.eval_every=150',
          '--config.train.eval_batches=1')
  # Few, small batches: the teacher's full distributions carry more than their one-hot labels.
  student = ('--config.model.num_layers=1', '--config.model.emb_dim=64',
             '--config.model.mlp_dim=128', '--config.train.batch_size=4',
             '--config.train.num_steps=60', '--config.train.eval_every=60',
             '--config.train.eval_batches=8')
  scratch = final_eval_loss(command(tmp_path / 'scratch', *student))
  distilled = final_eval_loss(command(
      tmp_path / 'distilled', *student, '--config.objective.name=distill',
      f'--config.objective.teacher={tmp_path / "teacher"}', '--config.objective.alpha=0.9',
      '--config.objective.temperature=1.0'))
  print(f'eval_loss from scratch {scratch:.4f}, distilled {distilled:.4f}')
  assert distilled < scratch - 0.03, (distilled, scratch)


# An encoder and an encoder-decoder pair: a wider teacher, a narrower student of the same family.
FAMILY_PAIRS = {
    'mlm': ('encoder.py:bert_tiny', dict(emb_dim=64, mlp_dim=128), dict(emb_dim=32, mlp_dim=64)),
    'span_corruption': ('encoder_decoder.py:t5_tiny', dict(emb_dim=64, mlp_dim=128),
                        dict(emb_dim=32, mlp_dim=64)),
}


@pytest.mark.parametrize('base', sorted(FAMILY_PAIRS) + ['seq2seq'])
def test_bert_and_t5_students_learn_from_their_teachers_through_the_base_objective(base, tmp_path,
                                                                                    monkeypatch):
  spec, teacher_sizes, student_sizes = FAMILY_PAIRS.get(base, FAMILY_PAIRS['span_corruption'])
  if base == 'seq2seq':  # Fine-tuning pairs: the run reads the base objective's labelled data.
    pairs = tmp_path / 'pairs.jsonl'
    pairs.write_text(''.join(f'{{"input": "{w}", "target": "{w[::-1]}"}}\n'
                             for w in ('abc', 'defgh', 'ijkl', 'mnopq') * 8))
    spec = 'finetune.py:pairs'

  def config_of(sizes):
    config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', spec))
    config.model.update(sizes)
    if base == 'seq2seq':
      config.data.train_path = config.data.validation_path = str(pairs)
    config.model.num_layers = 1
    config.train.batch_size, config.train.seq_len, config.train.sample_tokens = 8, 32, 0
    if base in ('span_corruption', 'seq2seq'):
      config.model.num_decoder_layers, config.train.target_len = 1, 16
    return config

  teacher = runs.random_run(tmp_path / 'teacher', config_of(teacher_sizes))
  config = config_of(student_sizes)
  config.objective.update(dict(name='distill', base=base, teacher=str(teacher), alpha=1.0,
                               temperature=2.0))
  trainer = _setup(config)
  assert trainer.objective.metric_names()[:len(objectives.get(base).Objective(config)
                                               .metric_names())] == \
      objectives.get(base).Objective(config).metric_names()
  batch = _batch(trainer)
  objective, base_objective = trainer.objective, objectives.get(base).Objective(config)

  @jax.jit  # One program: both objectives' sums, and the gradients of the distillation loss.
  def compute(params, frozen, batch):
    def loss(params, frozen):
      sums = objective.sums(trainer.model, params, batch, None, frozen)
      counts = objective.counts(batch)
      return sum(sums[t]['loss'] / counts[t] for t in counts), sums
    grads, sums = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, frozen)
    return sums, base_objective.sums(trainer.model, params, batch, None), grads

  sums, base_sums, (student_grads, teacher_grads) = jax.device_get(
      compute(trainer.state.params, trainer.frozen, batch))
  term = next(iter(base_sums))
  # alpha = 1: the soft term alone, positive (the teacher differs), over the base's positions.
  assert float(sums[term]['loss']) > 0 and float(sums[term]['loss']) != float(
      base_sums[term]['loss'])
  # By hand, from the logits each model returns to the base objective: T^2 * sum of
  # w * KL(teacher || student), w the field that weighs the vocabulary term's positions (every
  # row once for a second term, the masked LM's sentence-pair head).
  outputs, apply = [], objectives.apply

  def recording_apply(*args, **kwargs):
    outputs.append(apply(*args, **kwargs))
    return outputs[-1]

  monkeypatch.setattr(objectives, 'apply', recording_apply)
  student_params = {k: v for k, v in trainer.state.params.items() if k != distill.PROJECTION}
  base_objective.sums(trainer.model, student_params, batch, None)
  base_objective.sums(objective.teacher_model, trainer.frozen, batch, None)
  monkeypatch.undo()
  student, teacher = ({term: out} if not isinstance(out, dict) else out for out in outputs)
  scored = dict(mlm='mlm_weights', span_corruption='decoder_weights',
                seq2seq='decoder_weights')[base]
  for i, name in enumerate(base_sums):
    log_p, log_q = _log_softmax(teacher[name] / 2.0), _log_softmax(student[name] / 2.0)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), -1)
    weights = np.asarray(batch[scored]) if i == 0 else np.ones(kl.shape)
    np.testing.assert_allclose(float(sums[name]['loss']), 4.0 * np.sum(kl * weights),
                               rtol=1e-4)
  # The hard-label loss reported is exactly the base objective's.
  assert float(sums[term]['hard_loss']) == float(base_sums[term]['loss'])
  # The student learns; the teacher gets no gradient.
  assert any(np.any(g) for g in jax.tree.leaves(student_grads))
  assert not any(np.any(g) for g in jax.tree.leaves(teacher_grads))


def test_a_teacher_that_read_text_with_another_tokenizer_is_refused(decoder_config, teacher,
                                                                    tmp_path):
  other = tmp_path / 'teacher'
  shutil.copytree(teacher, other)
  tokenizer_lib.save(tokenizer_lib.get('bytes', extra_ids=5), str(other / 'tokenizer'))
  config = _config(decoder_config, other)
  config.data.source = 'stdlib'  # Text (synthetic tokens have no tokenizer to compare).
  with pytest.raises(config_lib.ConfigError,
                     match=r'reads text with the tokenizer bytes \(5 sentinels\) and this run '
                           r'with bytes \(0\); distill with --config.data.tokenizer=bytes '
                           r'--config.data.extra_ids=5\.$'):
    config_lib.validate(config, 1)
  tokenizer_lib.save(tokenizer_lib.get('bytes'), str(other / 'tokenizer'))  # The same: accepted.
  config_lib.validate(config, 1)
