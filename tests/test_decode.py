"""KV-cache decoding equals full forward passes; sampling filters; ragged prompts in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import decode
from research.models import decoder


def _model(decoder_config, style, max_len=64):
  config = decoder_config('tiny')
  m = config.model
  m.style, m.num_layers, m.emb_dim, m.mlp_dim, m.max_len = style, 2, 64, 128, max_len
  m.num_kv_heads = 2 if style == 'llama' else 0
  model = decoder.build(m)
  params = model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32),
                      method='initialize')['params']
  # Larger weights than at init make the next-token choice depend on the whole prefix.
  params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)
  return model, params


PROMPTS = [[5, 9, 200, 31, 7, 7, 150], [42], [3, 4, 5, 6]]  # Ragged: left padded together.


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_cached_logits_equal_full_forward_over_the_same_prefix(decoder_config, style):
  model, params = _model(decoder_config, style)
  sampling = decode.SamplingConfig(max_new_tokens=10)
  generated, logits = decode.generate(model, params, PROMPTS, sampling, return_logits=True)
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens, method='language_model'))
  for row, prompt in enumerate(PROMPTS):
    assert len(generated[row]) == 10
    sequence = prompt + generated[row]
    for step in range(10):
      prefix = jnp.asarray([sequence[:len(prompt) + step]], jnp.int32)
      full = np.asarray(forward(prefix))[0, -1]
      np.testing.assert_allclose(logits[row, step], full, atol=1e-5, rtol=0)
      assert generated[row][step] == int(np.argmax(full))  # Greedy == repeated forward argmax.


def test_stop_tokens_end_rows_independently(decoder_config):
  model, params = _model(decoder_config, 'llama')
  free = decode.generate(model, params, PROMPTS, decode.SamplingConfig(max_new_tokens=8))
  stop = free[0][3]
  stopped = decode.generate(model, params, PROMPTS,
                            decode.SamplingConfig(max_new_tokens=8, stop_tokens=(stop,)))
  for row in range(len(PROMPTS)):
    expected = free[row][:free[row].index(stop)] if stop in free[row] else free[row]
    assert stopped[row] == expected


def test_sampling_filters_and_seeds(decoder_config):
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  top_k = decode.filter_logits(logits, 1.0, top_k=2, top_p=1.0)
  assert np.isfinite(np.asarray(top_k)).tolist() == [[True, True, False, False]]
  top_p = decode.filter_logits(logits, 1.0, top_k=0, top_p=0.7)
  assert np.isfinite(np.asarray(top_p)).tolist() == [[True, True, False, False]]
  top_p = decode.filter_logits(logits, 1.0, top_k=0, top_p=0.1)
  assert np.isfinite(np.asarray(top_p)).tolist() == [[True, False, False, False]]

  model, params = _model(decoder_config, 'llama')
  sampling = decode.SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
  a = decode.generate(model, params, PROMPTS, sampling, rng=jax.random.key(1))
  b = decode.generate(model, params, PROMPTS, sampling, rng=jax.random.key(1))
  c = decode.generate(model, params, PROMPTS, sampling, rng=jax.random.key(2))
  assert a == b and a != c
  greedy = decode.generate(model, params, PROMPTS, decode.SamplingConfig(max_new_tokens=12))
  cold = decode.generate(model, params, PROMPTS, decode.SamplingConfig(max_new_tokens=12,
                                                                        temperature=1.0, top_k=1))
  assert cold == greedy  # top-k of one is greedy.


def test_decode_step_compiles_once(decoder_config):
  model, params = _model(decoder_config, 'llama')
  sampling = decode.SamplingConfig(max_new_tokens=6)
  decode.generate(model, params, PROMPTS, sampling)
  before = decode._generate._cache_size()
  decode.generate(model, params, [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10]], sampling)  # Same shapes.
  assert decode._generate._cache_size() == before


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_generation_uses_every_position_up_to_max_len_and_no_more(decoder_config, style):
  model, params = _model(decoder_config, style, max_len=16)
  prompt = [5, 9, 200, 31]
  generated = decode.generate(model, params, [prompt], decode.SamplingConfig(max_new_tokens=12))[0]
  assert len(generated) == 12
  # Every token, the last at position 15 included, is the argmax of a full forward pass.
  logits = model.apply({'params': params}, jnp.asarray([prompt + generated[:-1]], jnp.int32),
                       method='language_model')
  assert generated == np.argmax(np.asarray(logits)[0, len(prompt) - 1:], axis=-1).tolist()
  with pytest.raises(ValueError, match=r'needs 17 positions but the model has max_len=16'):
    decode.generate(model, params, [prompt], decode.SamplingConfig(max_new_tokens=13))


@pytest.mark.parametrize('prompts, sampling, message', [
    ([[1]], dict(max_new_tokens=0), 'max_new_tokens=0 must be a positive integer.'),
    ([[1]], dict(temperature=-0.5), 'temperature=-0.5 must be 0 (greedy) or'),
    ([[1]], dict(temperature=float('nan')), 'temperature=nan must be 0 (greedy) or'),
    ([[1]], dict(temperature=1.0, top_p=0.0), 'top_p=0.0 must lie in (0, 1]'),
    ([[1]], dict(temperature=1.0, top_p=1.5), 'top_p=1.5 must lie in (0, 1]'),
    ([[1]], dict(temperature=1.0, top_k=257), 'top_k=257 must lie in [0, 256]'),
    ([[1]], dict(temperature=1.0, top_k=-1), 'top_k=-1 must lie in [0, 256]'),
    ([[1]], dict(top_k=40), 'Greedy decoding (temperature=0) takes the most likely token: '
                            'top_k=40 and top_p=1.0 have no use with it'),
    ([[1]], dict(top_p=0.5), 'Greedy decoding (temperature=0) takes the most likely token: '
                             'top_k=0 and top_p=0.5 have no use'),
    ([[1]], dict(length_penalty=2.0), 'length_penalty=2.0 scores beams and has no use without '
                                      'num_beams'),
    ([[1], [3, 256]], {}, 'Prompt 1 holds token id 256, outside the vocabulary of 256 ids'),
    ([[-1]], {}, 'Prompt 0 holds token id -1, outside the vocabulary'),
    ([[1, 2.0]], {}, 'Prompt 0 holds token id 2.0, outside the vocabulary'),
    ([[1], []], {}, 'Prompt 1 is empty'),
    ([], {}, 'No prompt given'),
])
def test_bad_inputs_are_refused_before_any_compute(decoder_config, prompts, sampling, message):
  config = decoder_config('tiny')
  config.model.vocab_size = 256
  spec = decoder.DecoderSpec.from_config(config.model)
  with pytest.raises(ValueError) as error:
    decode.check_inputs(spec, prompts, decode.SamplingConfig(**sampling))
  assert str(error.value).startswith(message) and str(error.value).endswith('.')


def test_a_tiny_top_p_keeps_the_most_likely_token():
  # Near-ties, ties, and a temperature so small that unshifted logits overflow to inf.
  logits = jnp.asarray([[100.0, 99.0, 0.0, 99.5], [3.0, 7.0, 7.0, 1.0], [1e-3, 0.0, 2e-3, 0.0]])
  for temperature in (1.0, 1e-37):
    kept = np.isfinite(np.asarray(decode.filter_logits(logits, temperature, 0, 1e-9)))
    assert kept.tolist() == [[True, False, False, False], [False, True, True, False],
                             [False, False, True, False]], temperature


def test_generation_from_parameters_sharded_over_a_mesh_equals_one_device(decoder_config):
  """FSDP x tensor sharded parameters (as `research.sample --mesh` loads them): the same tokens
  and logits, and replicated outputs that every process can read."""
  from flax import linen as nn
  from research import mesh as mesh_lib
  from research import partitioning
  model, params = _model(decoder_config, 'llama')
  mesh = mesh_lib.make_mesh(dict(fsdp=4, tensor=2), jax.devices()[:8])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(3), jnp.zeros((1, 8), jnp.int32),
                                            method='initialize'))['params']
  params = nn.meta.unbox(params)
  sharded = jax.device_put(params, partitioning.tree_shardings(boxed, mesh))
  assert tuple(sharded['layers']['attn']['query']['kernel'].sharding.spec)[1:3] == (
      'fsdp', 'tensor')
  sampling = decode.SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20)
  key = jax.random.key(5)
  want, want_logits = decode.generate(model, params, PROMPTS, sampling, rng=key,
                                      return_logits=True)
  got, got_logits = decode.generate(model, sharded, PROMPTS, sampling, rng=key,
                                    return_logits=True, mesh=mesh)
  assert got == want
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)


def test_beam_search_serves_decoders_with_ragged_prompts(decoder_config):
  """One beam is greedy decoding; more beams return sequences of their own length whose scores
  are the model's (sum of log probabilities / length, no stop token here), at least greedy's."""
  model, params = _model(decoder_config, 'llama')
  greedy = decode.generate(model, params, PROMPTS, decode.SamplingConfig(max_new_tokens=6))
  one = decode.generate(model, params, PROMPTS, decode.SamplingConfig(max_new_tokens=6,
                                                                      num_beams=1))
  assert one == greedy
  beams, scores = decode.generate(model, params, PROMPTS,
                                  decode.SamplingConfig(max_new_tokens=6, num_beams=3),
                                  return_logits=True)
  forward = jax.jit(lambda tokens: model.apply({'params': params}, tokens, method='language_model'))

  def score(prompt, continuation):
    log_p = jax.nn.log_softmax(forward(jnp.asarray([prompt + continuation], jnp.int32))[0])
    steps = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
    return sum(float(log_p[i, t]) for i, t in zip(steps, continuation)) / len(continuation)

  for row, prompt in enumerate(PROMPTS):
    assert len(beams[row]) == 6
    np.testing.assert_allclose(scores[row], score(prompt, beams[row]), atol=1e-4)
    assert scores[row] >= score(prompt, greedy[row]) - 1e-5  # The search keeps the better.
  assert beams != greedy  # Random weights: it finds other sequences than greedy decoding.
