"""The encoder-decoder family: sharded == one device, packed == unpacked, cached decoding ==
the full forward pass, beam search (one beam == greedy; a constructed case where it beats
greedy)."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import runs
from research import config as config_lib
from research import decode
from research import models
from research.data import packing
from research.models import encoder_decoder
from research.objectives import text_to_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, TARGET_LEN = 24, 16


def _config(**model):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs',
                                                    'encoder_decoder.py:t5_tiny'))
  config.train.batch_size, config.train.seq_len, config.train.target_len = 8, SEQ_LEN, TARGET_LEN
  config.optim.warmup_steps, config.optim.lr = 1, 1e-2
  config.model.update(model)
  return config


def _examples(rng, count):
  """Random examples of varied lengths, each ending with EOS (2)."""
  out = []
  for _ in range(count):
    inputs = rng.integers(3, 250, int(rng.integers(3, 12)))
    targets = rng.integers(3, 250, int(rng.integers(2, 8)))
    out.append(dict(inputs=np.r_[inputs, 2], targets=np.r_[targets, 2]))
  return out


def _packed_batch(rng, rows, per_row=2):
  """Rows of `per_row` packed examples each, with padding after them."""
  fields = text_to_text.fields(SEQ_LEN, TARGET_LEN)
  packed = [packing.pack_pairs(_examples(rng, per_row), SEQ_LEN, TARGET_LEN, fields)
            for _ in range(rows)]
  return {name: np.concatenate([p[name] for p in packed]) for name in fields}


def _init(config):
  model = encoder_decoder.build(config.model)
  params = model.init(jax.random.key(0), **encoder_decoder.init_inputs(8), method='initialize')
  return model, nn.meta.unbox(params['params'])


@pytest.mark.slow
def test_sharded_training_matches_one_device():
  rng = np.random.default_rng(0)
  batches = [_packed_batch(rng, 8) for _ in range(3)]
  want_losses, want_params = runs.train_steps(_config(), dict(data=1), batches)
  # Parameters over fsdp and tensor, activations over the sequence too, in one mesh.
  losses, params = runs.train_steps(_config(), dict(fsdp=2, sequence=2, tensor=2), batches)
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, want_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs


@functools.partial(jax.jit, static_argnums=2)
def _losses(params, batch, model):
  """Per-position cross entropy of a batch."""
  hidden = model.apply({'params': params}, batch['encoder_tokens'], batch['decoder_tokens'],
                       batch['encoder_segment_ids'], batch['decoder_segment_ids'])
  logits = model.apply({'params': params}, hidden, method='logits')
  return text_to_text.token_terms(logits, batch['decoder_targets'])[1]


@pytest.mark.parametrize('scan_layers', [True, False])
def test_packed_rows_give_each_example_its_own_losses(scan_layers):
  model, params = _init(_config(scan_layers=scan_layers))
  examples = _examples(np.random.default_rng(1), 3)
  fields = text_to_text.fields(SEQ_LEN, TARGET_LEN)
  packed = packing.pack_pairs(examples, SEQ_LEN, TARGET_LEN, fields)
  assert packed['decoder_segment_ids'].max() == 3  # All three share the row.
  together = np.asarray(_losses(params, packed, model))[0]
  for segment, example in enumerate(examples, 1):
    alone = np.asarray(_losses(params, packing.pack_pairs([example], SEQ_LEN, TARGET_LEN, fields),
                               model))[0]
    where = packed['decoder_segment_ids'][0] == segment
    np.testing.assert_allclose(together[where], alone[:where.sum()], atol=1e-5, rtol=0)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_cached_decoding_matches_the_full_forward_pass_at_every_step(scan_layers):
  model, params = _init(_config(scan_layers=scan_layers))
  inputs = [[5, 6, 7, 8, 9, 10, 2], [11, 12, 2]]  # Of different lengths: one is padded.
  generated, step_logits = decode.generate(model, params, inputs,
                                           decode.SamplingConfig(max_new_tokens=9),
                                           return_logits=True)
  for row, ids in enumerate(inputs):
    decoder_tokens = jnp.asarray([[0] + generated[row][:-1]], jnp.int32)
    hidden = model.apply({'params': params}, jnp.asarray([ids]), decoder_tokens)
    full = np.asarray(model.apply({'params': params}, hidden, method='logits'))[0]
    np.testing.assert_allclose(step_logits[row, :len(generated[row])], full, atol=1e-5, rtol=0)
    assert generated[row] == np.argmax(full, axis=-1).tolist()


def test_one_beam_is_greedy_decoding():
  """Also when rows stop early: the stop token is one the model produces mid-sequence."""
  model, params = _init(_config())
  inputs = [[5, 6, 7, 8, 9, 10, 2], [11, 12, 2], [40, 41, 42, 2]]
  free = decode.generate(model, params, inputs, decode.SamplingConfig(max_new_tokens=10))
  stop = int(np.bincount(np.asarray(free)[:, 2:6].ravel()).argmax())
  greedy = decode.generate(model, params, inputs,
                           decode.SamplingConfig(max_new_tokens=10, stop_tokens=(stop,)))
  assert any(len(row) < 10 for row in greedy)
  beam = decode.generate(model, params, inputs, decode.SamplingConfig(
      max_new_tokens=10, stop_tokens=(stop,), num_beams=1))
  assert beam == greedy


class _Chain:
  """A fixed next-token distribution per previous token (the cache holds the last token):
  start -> a 0.55, b 0.45; a -> EOS 0.34, a 0.33, b 0.33; b -> EOS 0.9, a 0.05, b 0.05.
  Greedy takes a, then EOS (0.55 * 0.34 = 0.187); the best sequence is b, EOS (0.405)."""
  START, EOS, A, B = 0, 1, 2, 3
  TABLE = np.log(np.asarray([[1e-9, 1e-9, 0.55, 0.45], [1e-9, 1.0, 1e-9, 1e-9],
                             [1e-9, 0.34, 0.33, 0.33], [1e-9, 0.9, 0.05, 0.05]], np.float32))

  def step(self, cache, token, i):
    del i
    return jnp.asarray(self.TABLE)[token], dict(last=token)


def test_beam_search_finds_a_better_sequence_than_greedy():
  chain, batch = _Chain(), 2
  sampling = decode.SamplingConfig(max_new_tokens=4, stop_tokens=(_Chain.EOS,), pad_id=0)
  start = jnp.full((batch,), _Chain.START, jnp.int32)
  logits, cache = chain.step(None, start, 0)
  greedy = decode._sample_loop(cache, logits, chain.step, sampling, jax.random.key(0), 4)[0]
  assert np.asarray(greedy)[0, :2].tolist() == [_Chain.A, _Chain.EOS]
  beams = 3
  sampling = decode.SamplingConfig(max_new_tokens=4, stop_tokens=(_Chain.EOS,), pad_id=0,
                                   num_beams=beams)
  start = jnp.full((batch * beams,), _Chain.START, jnp.int32)
  logits, cache = chain.step(None, start, 0)
  tokens, scores, _ = decode._beam_loop(cache, logits, chain.step, dict(last=0), sampling, 4)
  assert np.asarray(tokens)[:, :2].tolist() == [[_Chain.B, _Chain.EOS]] * batch
  # log p / length, with length_penalty 1 and the EOS counted.
  np.testing.assert_allclose(scores, [np.log(0.45 * 0.9) / 2] * batch, rtol=1e-5)


def test_relative_buckets_are_exact_then_logarithmic():
  distances = jnp.arange(-200, 201)
  one_way = np.asarray(encoder_decoder.relative_buckets(distances, False, 32, 128))
  # Causal: later keys share bucket 0; earlier ones 0..15 exactly, then log-spaced up to 31.
  assert (one_way[distances > 0] == 0).all()
  assert one_way[200 - 15:201].tolist() == list(range(15, -1, -1))
  assert one_way[0] == 31 and one_way[200 - 127] == 31 and one_way[200 - 100] < 31
  two_way = np.asarray(encoder_decoder.relative_buckets(distances, True, 32, 128))
  assert two_way[200 + 1] == 17 and two_way[200 - 1] == 1 and two_way[200] == 0
  assert two_way.max() == 31 and two_way[distances < 0].max() == 15


def test_loss_options_and_sequence_accuracy():
  logits = jnp.asarray([[[2.0, 0.5, -1.0, 0.0], [0.1, 3.0, 0.2, -0.5], [1.0, 1.0, 4.0, 0.0]]])
  targets = jnp.asarray([[0, 1, 3]])
  plain, cross_entropy = text_to_text.token_terms(logits, targets)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  np.testing.assert_allclose(cross_entropy, log_z - jnp.take_along_axis(
      logits, targets[..., None], -1)[..., 0], rtol=1e-6)
  np.testing.assert_allclose(plain, cross_entropy)
  with_z = text_to_text.token_terms(logits, targets, z_loss=1e-2)[0]
  np.testing.assert_allclose(with_z - plain, 1e-2 * log_z ** 2, rtol=1e-5)
  # Label smoothing: the smoothed distribution itself costs 0, anything else more.
  smoothing, vocab = 0.1, 4
  smoothed = np.full((1, 1, vocab), smoothing / (vocab - 1))
  smoothed[0, 0, 2] = 1 - smoothing
  best = text_to_text.token_terms(jnp.log(jnp.asarray(smoothed)), jnp.asarray([[2]]),
                                  label_smoothing=smoothing)[0]
  np.testing.assert_allclose(best, 0.0, atol=1e-6)
  assert (text_to_text.token_terms(logits, targets, label_smoothing=smoothing)[0] > 0).all()
  # Two examples in row 0 (one all right, one not), one in row 1 (right), padding after.
  correct = jnp.asarray([[1, 1, 0, 1, 0], [1, 1, 0, 0, 0]], jnp.float32)
  weights = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], jnp.float32)
  segments = jnp.asarray([[1, 1, 2, 2, 0], [1, 1, 0, 0, 0]])
  examples, right = text_to_text.sequence_counts(correct, weights, segments)
  assert (float(examples), float(right)) == (3.0, 2.0)


@pytest.mark.parametrize('variant', ['t5_tiny', 't5_small'])  # Gated and untied; plain and tied.
def test_flops_per_row_count_every_applied_weight(variant):
  """6 FLOPs per kernel weight and the token it reads (the cross-attention's keys and values read
  the inputs), plus the attention products: full in the encoder, causal (half) in the decoder's
  self-attention, and targets x inputs across; the output layer once per target."""
  config = config_lib.load_config_file(os.path.join(REPO, 'configs',
                                                    f'encoder_decoder.py:{variant}'))
  m = config.model
  spec = encoder_decoder.spec_from_config(m)
  params = models.abstract_params(encoder_decoder, m)
  inputs, targets = 20, 7
  reads_inputs = lambda path: 'cross' in path and path[-2] in ('key', 'value')
  weights = (inputs * runs.kernel_size(params['encoder'])
             + targets * runs.kernel_size(params['decoder'], lambda p: not reads_inputs(p))
             + inputs * runs.kernel_size(params['decoder'], reads_inputs))
  inner = spec.inner_dim
  products = (spec.num_layers * inputs * 2 * inputs * inner
              + spec.num_decoder_layers * targets * (targets * inner + 2 * inputs * inner))
  head = targets * math.prod(params['token_embed']['embedding'].shape)
  assert encoder_decoder.flops_per_row(spec, inputs, targets) == 6 * (weights + products + head)
