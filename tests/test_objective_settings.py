"""Each objective declares the objective.* settings it reads (SETTINGS), and a command line that
sets one its objective does not read is refused: a family's objective section holds the settings
of all its objectives, and one meant for another would silently change nothing."""

import os

import jax
import ml_collections
import numpy as np
import pytest

import runs
from research import config as config_lib
from research import models
from research import objectives
from research import word_vectors
from research.data import tokenizer as tokenizer_lib


class _Recording(ml_collections.ConfigDict):
  """An objective section that notes every key read from it."""

  def __init__(self, values):
    super().__init__(values)
    object.__setattr__(self, 'read', set())

  def __getattr__(self, name):
    if not name.startswith('_') and name != 'read':
      self.read.add(name)
    return super().__getattr__(name)

  def __getitem__(self, name):
    self.read.add(name)
    return super().__getitem__(name)

  def get(self, name, default=None):
    self.read.add(name)
    return super().get(name, default)

  def to_dict(self, *args, **kwargs):  # The whole section, as a checkpoint records it.
    read = set(self.read)
    try:
      return super().to_dict(*args, **kwargs)
    finally:
      self.read.intersection_update(read)


@pytest.mark.parametrize('spec, name, train', [
    ('decoder.py:tiny', 'causal_lm', {}),
    ('encoder.py:bert_tiny', 'mlm', {}),
    ('finetune.py:csv', 'classification', {}),
    ('encoder_decoder.py:t5_tiny', 'span_corruption', {}),
    ('encoder_decoder.py:t5_tiny', 'prefix_lm', {}),
    ('encoder_decoder.py:t5_tiny', 'ul2', dict(target_len=128)),
    ('finetune.py:pairs', 'seq2seq', {}),
    ('word_vectors.py:skipgram_tiny', 'skipgram', {}),
    ('word_vectors.py:skipgram_tiny', 'cbow', {}),
    ('word_vectors.py:glove_tiny', 'glove', {}),
])
def test_an_objective_reads_exactly_the_settings_it_declares(tmp_path, spec, name, train):
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', spec))
  if config.model.family == 'word_vectors':  # A vocabulary of words, which they need.
    corpus = runs.write_corpus(tmp_path / 'corpus')
    vocab = word_vectors.train_vocabulary([f.read_text() for f in sorted(corpus.iterdir())],
                                          str(tmp_path / 'vocab'), min_count=1)
    config.data.source, config.data.paths = 'text', str(corpus)
    config.data.tokenizer, config.data.data_dir = f'hf:{vocab}', str(tmp_path / 'tfds')
  recording = _Recording(dict(config.objective.to_dict(), name=name))
  with config.unlocked():
    config.objective = recording
    config.train.update(train)
  # Everything that reads the section: validation, the objective, its data side and its loss.
  config_lib.validate(config, 1)
  objective = objectives.build(config)
  if hasattr(objective, 'transform') and objectives.get(name).DATA != 'labeled':
    objective.transform(tokenizer_lib.get(config.data.tokenizer, config.data.extra_ids))
  batch = objective.synthetic_batch(np.random.default_rng(0))
  family = models.get(config.model.family)
  model = family.build(config.model)
  params = models.abstract_params(family, config.model)
  jax.eval_shape(lambda p: objective.sums(model, p, batch, jax.random.key(0)), params)
  assert recording.read - {'name'} == set(objectives.get(name).SETTINGS)


@pytest.mark.parametrize('spec, override, message', [
    ('encoder_decoder.py:t5_tiny', '--config.objective.denoisers=R:3:0.15=1',
     'objective.denoisers is not read by objective.name=span_corruption, which reads '
     'objective.label_smoothing, objective.mean_span_length, objective.noise_density, '
     'objective.z_loss; drop it, or set objective.name to one that reads it (ul2).'),
    ('decoder.py:tiny', '--config.objective.alpha=0.5',
     'objective.alpha is not read by objective.name=causal_lm, which reads no objective setting '
     'besides its name; drop it, or set objective.name to one that reads it (distill).'),
])
def test_a_setting_the_objective_does_not_read_is_refused(tmp_path, spec, override, message):
  result = runs.in_process('research.train', '--config', f'configs/{spec}', '--workdir',
                           str(tmp_path / 'run'), override)
  assert runs.error_line(result) == f'error: {message}'


def test_settings_of_the_objective_itself_and_of_the_one_it_wraps_are_taken():
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs',
                                                    'encoder_decoder.py:t5_tiny'))
  objectives.check_overrides(config, ['noise_density', 'z_loss', 'name'])
  config.objective.name, config.objective.base = 'distill', 'span_corruption'
  objectives.check_overrides(config, ['noise_density', 'alpha', 'teacher', 'base'])
  with pytest.raises(ValueError, match=r'^objective.denoisers is not read by '
                                       r'objective.name=distill, .*; drop it, or set '
                                       r'objective.base to one that reads it \(ul2\)\.$'):
    objectives.check_overrides(config, ['denoisers'])


def test_distillation_reads_its_settings_and_those_of_its_base(tmp_path):
  from research import mesh as mesh_lib
  from research import optim
  from research import partitioning
  from research import train_state
  load = lambda: config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py:tiny'))
  teacher = load()
  teacher.train.seq_len, teacher.train.sample_tokens = 16, 0
  runs.random_run(tmp_path / 'teacher', teacher)
  config = load()
  config.train.seq_len, config.train.batch_size = 16, 2
  config.mesh.data = 1
  recording = _Recording(dict(config.objective.to_dict(), name='distill', base='causal_lm',
                              teacher=str(tmp_path / 'teacher'), hidden_weight=1.0))
  with config.unlocked():
    config.objective = recording
  config_lib.validate(config, 1)
  objective = objectives.build(config)
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, sequence=1, tensor=1), jax.devices()[:1])
  frozen, _ = objectives.frozen(objective, mesh)
  family = models.get(config.model.family)
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  state, _ = train_state.abstract(objectives.init_model(objective, model), tx, mesh,
                                  family.init_inputs(config.train.seq_len))
  batch = objective.synthetic_batch(np.random.default_rng(0))
  jax.eval_shape(lambda p: objective.sums(model, p, batch, jax.random.key(0), frozen),
                 state.params)
  expected = set(objectives.get('distill').SETTINGS) | set(objectives.get('causal_lm').SETTINGS)
  assert recording.read - {'name'} == expected
