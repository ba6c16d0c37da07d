"""Cross entropy in chunks (research/objectives/chunked_loss.py) equals the plain loss: its sums
and gradients, alone and through every objective that scores a vocabulary, sharded as on one
device; its compiled program holds no [batch, length, vocab] array; train.loss_chunk is checked."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from research import config as config_lib
from research import mesh as mesh_lib
from research import models
from research import objectives
from research import partitioning
from research.objectives import chunked_loss
from research.objectives import text_to_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _head(vocab_axis, with_bias, b=3, t=13, d=8, vocab=37):
  """Random features, kernel, bias, targets and weights (a third of them zero); a few targets are
  the argmax, so that 'correct' counts something."""
  keys = jax.random.split(jax.random.key(vocab_axis + 2 * with_bias), 5)
  features = jax.random.normal(keys[0], (b, t, d))
  kernel = jax.random.normal(keys[1], (vocab, d) if vocab_axis == 0 else (d, vocab))
  bias = jax.random.normal(keys[2], (vocab,)) if with_bias else None
  targets = jax.random.randint(keys[3], (b, t), 0, vocab)
  logits = _logits(features, kernel, bias, vocab_axis)
  targets = jnp.where(jnp.arange(t) % 3 == 0, jnp.argmax(logits, -1), targets)
  weights = (jax.random.uniform(keys[4], (b, t)) > 0.3).astype(jnp.float32)
  return features, kernel, bias, targets, weights


def _logits(features, kernel, bias, vocab_axis):
  logits = features @ (kernel.T if vocab_axis == 0 else kernel)
  return logits if bias is None else logits + bias


@pytest.mark.parametrize('vocab_axis,with_bias', [(0, True), (1, False)])
def test_sums_and_gradients_equal_the_plain_ones(vocab_axis, with_bias):
  features, kernel, bias, targets, weights = _head(vocab_axis, with_bias)

  def plain(f, k, b):
    return objectives.cross_entropy_sums(_logits(f, k, b, vocab_axis), targets, weights)

  def chunked(f, k, b):  # 13 positions: chunks of 4, the last padded.
    return chunked_loss.cross_entropy_sums(f, k, targets, weights, 4, b, vocab_axis)

  def sums_and_grads(f):
    return jax.jit(jax.grad(lambda *a: (f(*a)['loss'], f(*a)), argnums=(0, 1, 2), has_aux=True))(
        features, kernel, bias)

  (want_grads, want), (grads, got) = sums_and_grads(plain), sums_and_grads(chunked)
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
  assert float(want['correct']) > 0 and float(got['correct']) == float(want['correct'])
  for got_grad, want_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=0)
  assert len(jax.tree.leaves(grads)) == 2 + with_bias


def test_label_smoothing_and_z_loss_from_the_chunked_numbers_equal_those_of_the_logits():
  features, kernel, _, targets, weights = _head(1, False)

  def plain(f, k):
    loss, cross_entropy = text_to_text.token_terms(f @ k, targets, 1e-2, 0.1)
    return jnp.sum(loss * weights), jnp.sum(cross_entropy * weights)

  def chunked(f, k):
    stats = chunked_loss.position_stats(f, k, targets, 5)
    loss, cross_entropy = text_to_text.stats_terms(stats['log_z'], stats['target_logit'],
                                                   stats['logit_sum'], k.shape[1], 1e-2, 0.1)
    return jnp.sum(loss * weights), jnp.sum(cross_entropy * weights)

  def sums_and_grads(f):
    return jax.jit(jax.grad(lambda *a: (f(*a)[0], f(*a)), argnums=(0, 1), has_aux=True))(
        features, kernel)

  (want_grads, want), (grads, got) = sums_and_grads(plain), sums_and_grads(chunked)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for got_grad, want_grad in zip(grads, want_grads):
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-5, rtol=0)


def _decoder(**model):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'decoder.py:tiny'))
  config.data.source = 'markov'
  config.model.update(dict(dict(num_layers=1, num_heads=2, num_kv_heads=1, emb_dim=32,
                                mlp_dim=64, remat='none'), **model))
  config.train.batch_size, config.train.seq_len = 4, 14
  return config, 4


def _encoder():
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'encoder.py:bert_tiny'))
  config.model.update(dict(num_layers=1, num_heads=2, emb_dim=32, mlp_dim=64, remat='none'))
  config.objective.max_predictions = 6
  config.train.batch_size, config.train.seq_len = 4, 32
  return config, 4


def _encoder_decoder(**model):
  """T5 v1.0's head by default: tied, reading hidden states scaled by d_model ** -0.5."""
  config = config_lib.load_config_file(os.path.join(REPO, 'configs',
                                                    'encoder_decoder.py:t5_tiny'))
  config.model.update(dict(dict(num_layers=1, num_decoder_layers=1, emb_dim=32, mlp_dim=64,
                                remat='none', tie_embeddings=True, gated=False,
                                activation='relu'), **model))
  config.objective.z_loss, config.objective.label_smoothing = 1e-3, 0.1
  config.train.batch_size, config.train.seq_len, config.train.target_len = 4, 16, 10
  return config, 4


def _params(config, mesh=None):
  """Random parameters of the configured model (drawn on the host: nothing to compile), placed
  on `mesh` by the logical rules."""
  family = models.get(config.model.family)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
                        models.abstract_params(family, config.model))
  if mesh is None:
    return params
  return jax.device_put(params, jax.tree.map(
      lambda x: x.sharding, models.abstract_params_on(family, config.model, mesh)))


def _sums_and_grads(config, chunks, batch, mesh=None):
  """For each train.loss_chunk in `chunks`: the objective's sums and the gradient of their loss
  terms wrt the parameters, in one compiled program; on `mesh` with the parameters and
  activations sharded by the logical rules."""
  family = models.get(config.model.family)
  sharding = None if mesh is None else partitioning.ActivationSharding(mesh)
  model = family.build(config.model, sharding)
  built = []
  for chunk in chunks:
    config.train.loss_chunk = chunk
    built.append(objectives.build(config))

  def grads_and_sums(params):
    def loss(p, objective):
      sums = objective.sums(model, p, batch, None)
      return sum(term['loss'] for term in sums.values()), sums
    return [jax.grad(loss, has_aux=True)(params, objective) for objective in built]

  return jax.device_get(jax.jit(grads_and_sums)(_params(config, mesh)))


def _assert_equal(got, want):
  """Sums within 1e-5 relative (they add up every position), gradients within 1e-5."""
  (grads, sums), (want_grads, want_sums) = got, want
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), sums, want_sums)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, want_grads)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs


@pytest.mark.parametrize('make,head', [
    (lambda: _decoder(), 'logits'), (lambda: _decoder(tie_embeddings=False), 'logits'),
    (_encoder, 'mlm_logits'), (_encoder_decoder, 'logits'),
    (lambda: _encoder_decoder(tie_embeddings=False), 'logits'),
], ids=['decoder_tied', 'decoder_untied', 'encoder', 'encoder_decoder_tied',
        'encoder_decoder_untied'])
def test_head_inputs_give_the_logits_of_the_head(make, head):
  config, _ = make()
  model = models.get(config.model.family).build(config.model)
  variables = {'params': _params(config)}
  hidden = np.random.default_rng(0).standard_normal((2, 3, config.model.emb_dim), np.float32)
  inputs = model.apply(variables, hidden, method='head_inputs')
  kernel = inputs['kernel'].T if inputs['vocab_axis'] == 0 else inputs['kernel']
  want = inputs['features'] @ kernel + (0 if inputs['bias'] is None else inputs['bias'])
  # Up to the order of the float32 sums (numpy's product here, XLA's in the model).
  np.testing.assert_allclose(model.apply(variables, hidden, method=head), want, atol=1e-5,
                             rtol=0)


@pytest.mark.parametrize('make', [_encoder, _encoder_decoder], ids=['bert_mlm_nsp', 't5_v1_0'])
def test_each_objective_scores_the_same_in_chunks(make):
  config, chunk = make()
  batch = objectives.build(config).synthetic_batch(np.random.default_rng(0))
  plain, chunked = _sums_and_grads(config, (0, chunk), batch)
  _assert_equal(chunked, plain)


def test_chunks_sharded_over_vocabulary_and_sequence_match_the_plain_loss_on_one_device():
  config, chunk = _decoder()  # Llama, tied: the table's vocabulary axis over the tensor axis.
  batch = objectives.build(config).synthetic_batch(np.random.default_rng(1))
  shape = {axis: dict(data=2, sequence=2, tensor=2).get(axis, 1) for axis in mesh_lib.MESH_AXES}
  mesh = mesh_lib.make_mesh(shape, jax.devices()[:8])
  (chunked,) = _sums_and_grads(config, (chunk,), batch, mesh)
  (plain,) = _sums_and_grads(config, (0,), batch)
  _assert_equal(chunked, plain)


def test_compiled_gradient_holds_no_logits_of_every_position():
  b, t, d, vocab = 2, 256, 64, 8192
  features = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  kernel = jax.ShapeDtypeStruct((vocab, d), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
  weights = jax.ShapeDtypeStruct((b, t), jnp.float32)

  def temp_bytes(sums):
    step = jax.jit(jax.value_and_grad(lambda f, k, y, w: sums(f, k, y, w)['loss'], (0, 1)))
    return step.lower(features, kernel, targets, weights).compile().memory_analysis(
        ).temp_size_in_bytes

  logits_bytes = b * t * vocab * 4
  plain = temp_bytes(lambda f, k, y, w: objectives.cross_entropy_sums(f @ k.T, y, w))
  chunked = temp_bytes(lambda f, k, y, w: chunked_loss.cross_entropy_sums(f, k, y, w, 32,
                                                                          vocab_axis=0))
  assert chunked < logits_bytes < plain, (chunked, logits_bytes, plain)


def test_auto_chunks_only_a_large_vocabulary(decoder_config):
  config = decoder_config('tiny')
  assert chunked_loss.chunk_size(config, 128) == 0  # 264 entries: the plain logits.
  config.model.vocab_size = chunked_loss.AUTO_VOCAB
  assert chunked_loss.chunk_size(config, 2048) == chunked_loss.AUTO_CHUNK
  assert chunked_loss.chunk_size(config, 100) == 100
  config.train.loss_chunk = 0
  assert chunked_loss.chunk_size(config, 2048) == 0


@pytest.mark.parametrize('value,message', [(-2, 'must be an integer'), (1.5, 'must be an integer'),
                                           (129, 'exceeds the 128 positions')])
def test_a_bad_loss_chunk_is_a_config_error(decoder_config, value, message):
  config = decoder_config('tiny')
  # A ConfigDict made anew takes any type (as one read from a run's config.json).
  config = ml_collections.ConfigDict(dict(config.to_dict(), train=dict(config.train.to_dict(),
                                                                        loss_chunk=value)))
  with pytest.raises(config_lib.ConfigError, match=f'train.loss_chunk={value}.*{message}'):
    config_lib.validate(config, 1)


@pytest.mark.parametrize('variant', ['rnn.py:lstm_tiny', 'rnn_seq2seq.py', 'ngram.py'])
def test_a_loss_chunk_for_a_family_without_a_vocabulary_head_is_a_config_error(variant):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', variant))
  config.train.loss_chunk = 8
  with pytest.raises(config_lib.ConfigError,
                     match='loss_chunk=8 needs a vocabulary head.*loss_chunk=0 or -1'):
    config_lib.validate(config, 1)
  config.train.loss_chunk = -1  # Automatic: the plain loss where there is no head.
  config_lib.validate(config, 1)
