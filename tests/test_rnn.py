"""Recurrent language models: packed rows equal their documents alone, cached decoding equals the
full forward, sharded training equals one device, exact parameter counts, and the command lines
train and sample."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
from research import config as config_lib
from research import decode
from research import mesh as mesh_lib
from research import models
from research import train
from research.data import global_batch
from research.data import pipeline as pipeline_lib
from research.models import rnn

CELLS = ('rnn', 'lstm', 'gru')
CONFIG = os.path.join(runs.REPO, 'configs', 'rnn.py')


def _config(variant='lstm_tiny', **model):
  config = config_lib.load_config_file(f'{CONFIG}:{variant}')
  config.data.source, config.train.sample_tokens = 'markov', 0
  config.model.update({**dict(num_layers=2, emb_dim=16, hidden_dim=16), **model})
  return config


def _model(cell, **model):
  config = _config(cell=cell, **model)
  module = rnn.build(config.model)
  params = module.init(jax.random.key(1), **rnn.init_inputs(8), method='initialize')['params']
  return module, jax.tree.map(lambda x: x.value, params, is_leaf=lambda x: hasattr(x, 'names'))


@pytest.mark.parametrize('cell', CELLS)
def test_a_packed_row_gives_each_document_its_logits_alone(cell):
  module, params = _model(cell)
  first, second = [5, 17, 200, 31, 7], [42, 9, 9, 120, 3, 77]
  packed = first + second + [0, 0, 0]
  # One batch: the packed row with its segment ids; each document alone (what follows a
  # document cannot change its logits); the packed row as if it were one document.
  tokens = [packed, first + [0] * 9, second + [0] * 8, packed]
  segments = [[1] * 5 + [2] * 6 + [0] * 3] + [[1] * 14] * 3
  logits = np.asarray(module.apply({'params': params}, jnp.asarray(tokens), None,
                                   jnp.asarray(segments), method='language_model'))
  np.testing.assert_allclose(logits[0, :5], logits[1, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[0, 5:11], logits[2, :6], atol=1e-5, rtol=0)
  # Without the reset the second document sees the first.
  assert np.abs(logits[3, 5:11] - logits[0, 5:11]).max() > 1e-3


@pytest.mark.parametrize('cell', CELLS)
def test_one_token_at_a_time_with_the_cache_equals_the_full_forward(cell):
  module, params = _model(cell)
  tokens = jnp.asarray([[5, 17, 200, 31, 7, 42, 9], [1, 2, 3, 4, 5, 6, 250]], jnp.int32)
  full = module.apply({'params': params}, tokens, method='language_model')
  decoder = module.clone(decode=True)
  cache = decoder.init(jax.random.key(0), tokens[:, :1], method='language_model')['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)

  @jax.jit
  def step(cache, token):
    logits, variables = decoder.apply({'params': params, 'cache': cache}, token, None,
                                      jnp.ones_like(token), method='language_model',
                                      mutable=['cache'])
    return logits[:, 0], variables['cache']

  for t in range(tokens.shape[1]):
    logits, cache = step(cache, tokens[:, t:t + 1])
    np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0)


PROMPTS = [[5, 9, 200, 31, 7, 7, 150], [42], [3, 4, 5, 6]]  # Ragged: left padded together.


def _full_forward(module, params, sequences):
  """Logits of each sequence alone: right-padded into one batch, which cannot change the
  logits of the positions before the padding."""
  length = max(len(s) for s in sequences)
  tokens = jnp.asarray([s + [0] * (length - len(s)) for s in sequences], jnp.int32)
  return np.asarray(module.apply({'params': params}, tokens, method='language_model'))


def test_generation_greedy_and_beam_search_follow_the_full_forward():
  module, params = _model('lstm', num_layers=1, emb_dim=32, hidden_dim=32)
  new = 5
  greedy, logits = decode.generate(module, params, PROMPTS,
                                   decode.SamplingConfig(max_new_tokens=new), return_logits=True)
  # The full forward over prompt + continuation, each prompt alone and unpadded: its logits at
  # each prompt end and generated token are the ones the cached, left-padded batch chose from,
  # and each choice is their argmax (an argmax loop over full forwards gives the same tokens).
  full = _full_forward(module, params, [p + g for p, g in zip(PROMPTS, greedy)])
  for row, prompt in enumerate(PROMPTS):
    assert len(greedy[row]) == new
    at = full[row, len(prompt) - 1:len(prompt) - 1 + new]
    np.testing.assert_allclose(logits[row], at, atol=1e-5, rtol=0)
    assert greedy[row] == np.argmax(at, axis=-1).tolist()
  assert len({tuple(g) for g in greedy}) > 1  # The prompts matter.

  one_beam = decode.generate(module, params, PROMPTS,
                             decode.SamplingConfig(max_new_tokens=new, num_beams=1))
  assert one_beam == greedy
  # Three beams reorder the cache rows; the score of what comes back (no length penalty) is the
  # log-probability of exactly that continuation under the full forward.
  beams, scores = decode.generate(
      module, params, PROMPTS, decode.SamplingConfig(max_new_tokens=new, num_beams=3,
                                                     length_penalty=0.0), return_logits=True)
  full = jax.nn.log_softmax(_full_forward(module, params, [p + b for p, b in zip(PROMPTS, beams)]))
  greedy_full = jax.nn.log_softmax(_full_forward(module, params,
                                                 [p + g for p, g in zip(PROMPTS, greedy)]))
  for row, prompt in enumerate(PROMPTS):
    want = sum(float(full[row, len(prompt) - 1 + i, t]) for i, t in enumerate(beams[row]))
    assert len(beams[row]) == new and abs(scores[row] - want) < 1e-4, (scores[row], want)
    greedy_score = sum(float(greedy_full[row, len(prompt) - 1 + i, t])
                       for i, t in enumerate(greedy[row]))
    assert scores[row] >= greedy_score - 1e-5  # The search keeps the better.
  assert beams != greedy  # Random weights: it finds other sequences than greedy decoding.


def _train(config, mesh_shape, steps=2):
  """(losses, initial params, final params) of `steps` train steps on `mesh_shape`."""
  mesh_shape = {axis: mesh_shape.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  for axis, size in mesh_shape.items():
    config.mesh[axis] = size
  count = int(np.prod(list(mesh_shape.values())))
  config_lib.validate(config, count)
  trainer = train.setup(config, mesh_lib.make_mesh(mesh_shape, jax.devices()[:count]))
  state, losses = trainer.state, []
  initial = jax.device_get(state.params)  # Before the step donates it.
  for step in range(steps):
    batch = global_batch.to_global(trainer.pipeline.train_batch(step), trainer.batch_shardings)
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
    losses.append(float(metrics['loss']))
  return losses, initial, state.params


def _largest_difference(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def test_a_sharded_train_step_equals_one_device():
  def config():
    c = _config(num_layers=1, emb_dim=32, hidden_dim=32)
    c.train.batch_size, c.train.seq_len = 8, 8
    c.optim.warmup_steps, c.optim.lr = 1, 1e-2
    return c

  want_losses, initial, want_params = _train(config(), dict(data=1))
  losses, _, params = _train(config(), dict(data=2, fsdp=2, tensor=2))
  # The embedding is sharded as the rules say; the cells are replicated (models/recurrent.py).
  assert tuple(params['token_embed']['embedding'].sharding.spec) == ('tensor', 'fsdp')
  assert tuple(params['layers_0']['cell']['ii']['kernel'].sharding.spec) in ((), (None, None))
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  assert _largest_difference(params, want_params) <= 1e-5
  assert _largest_difference(want_params, initial) > 1e-3  # The steps really changed them.


@pytest.mark.parametrize('cell', CELLS)
@pytest.mark.parametrize('tie', [True, False])
def test_parameter_count_equals_the_hand_formula(cell, tie):
  v, layers, e, h = 264, 3, (24 if tie else 12), 24
  config = _config(cell=cell, num_layers=layers, emb_dim=e, hidden_dim=h, tie_embeddings=tie)

  def cell_count(d):  # flax.linen.recurrent: kernels per gate, their biases.
    return {'rnn': d * h + h * h + h,  # W_i x + b_i + W_h h
            'lstm': 4 * (d * h + h * h + h),  # Four gates, one bias each (recurrent side).
            'gru': 3 * (d * h + h) + 3 * h * h + h}[cell]  # r, z, n; n's recurrent bias.

  want = v * e + cell_count(e) + (layers - 1) * cell_count(h) + (0 if tie else h * v)
  assert models.count_params(rnn, config.model) == want
  spec = rnn.spec_from_config(config.model)
  gates = {'rnn': 1, 'lstm': 4, 'gru': 3}[cell]
  assert rnn.body_flops_per_token(spec, 128) == 6 * gates * ((e + h) * h + (layers - 1) * 2 * h * h)
  assert rnn.lm_head_flops_per_position(spec) == 6 * h * v


@pytest.mark.parametrize('change, message', [
    (dict(cell='lstn'), "config.model.cell='lstn' is not one of ['rnn', 'lstm', 'gru']."),
    (dict(emb_dim=64, hidden_dim=128, tie_embeddings=True),
     'model.tie_embeddings=True needs model.emb_dim (64) equal to model.hidden_dim (128); make '
     'them equal or set model.tie_embeddings=False.'),
    (dict(hidden_dim=0), 'config.model.hidden_dim must be positive, got 0.'),
])
def test_bad_settings_are_one_sentence_errors(change, message):
  config = _config()
  config.model.update(change)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert str(error.value) == message


@pytest.mark.slow
def test_command_line_trains_past_a_unigram_model_and_samples(tmp_path):
  workdir, data_dir = tmp_path / 'lstm', tmp_path / 'tfds'
  steps = 150
  runs.ok(runs.command(
      'research.train', '--config', 'configs/rnn.py:lstm_tiny', '--workdir', str(workdir),
      f'--config.data.data_dir={data_dir}', f'--config.train.num_steps={steps}',
      '--config.train.eval_every=150', '--config.checkpoint.every_steps=150',
      '--config.train.sample_tokens=20', '--config.train.progress_bar=False', '--cpu_devices=1'))
  config = config_lib.load_config_file(f'{CONFIG}:lstm_tiny')
  config.data.data_dir = str(data_dir)
  unigram = pipeline_lib.build(config).unigram_cross_entropy(config.train.eval_batches)
  final = [json.loads(line) for line in open(workdir / 'metrics.jsonl')][-1]
  assert final['step'] == steps
  assert final['eval_loss'] < unigram - 0.8, (final['eval_loss'], unigram)

  result = runs.ok(runs.command('research.sample', '--workdir', str(workdir), '--prompt', 'def ',
                                '--max_new_tokens=16', '--num_beams=2', '--cpu_devices=1'))
  assert result.stdout.startswith('def ') and len(result.stdout.strip()) > len('def ')
