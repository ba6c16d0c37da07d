"""Causality and packing (segment) isolation of the decoder, both styles, and its FLOP count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
from research import models
from research.models import decoder


def _model_and_params(config, style):
  m = config.model
  m.style = style
  if style == 'gpt2':
    m.num_kv_heads = 0
  model = decoder.build(m)
  params = model.init(jax.random.key(1), jnp.zeros((1, 16), jnp.int32),
                      method='initialize')['params']
  return model, params


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_changing_a_future_token_never_changes_past_logits(decoder_config, style):
  model, params = _model_and_params(decoder_config('tiny'), style)
  tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 264)
  base = model.apply({'params': params}, tokens, method='language_model')
  for t in (0, 7, 22):
    changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 264)
    logits = model.apply({'params': params}, changed, method='language_model')
    np.testing.assert_array_equal(logits[:, :t + 1], base[:, :t + 1])
    assert not np.allclose(logits[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_packed_rows_equal_documents_run_separately(decoder_config, style):
  model, params = _model_and_params(decoder_config('tiny'), style)
  rng = np.random.default_rng(0)
  lengths = (9, 13, 6)
  docs = [rng.integers(0, 256, n) for n in lengths]
  tokens = np.concatenate(docs + [np.zeros(4, np.int64)])[None]  # 4 padding positions at the end.
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(4)])
  positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(4)])
  packed = model.apply({'params': params}, jnp.asarray(tokens, jnp.int32),
                       jnp.asarray(positions[None], jnp.int32),
                       jnp.asarray(segment_ids[None], jnp.int32), method='language_model')
  start = 0
  for doc in docs:
    alone = model.apply({'params': params}, jnp.asarray(doc[None], jnp.int32),
                        method='language_model')
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=1e-5, rtol=0)
    start += len(doc)


@pytest.mark.parametrize('variant', ['tiny', 'nanogpt_cpu'])  # Llama (grouped-query), GPT-2.
def test_flops_count_every_applied_weight(decoder_config, variant):
  """MFU's numerator from the parameters themselves: 6 FLOPs per kernel weight and token, plus
  causal attention's scores and weighted values (half of 12 * T * heads * head_dim a layer)."""
  m = decoder_config(variant).model
  spec, params = decoder.spec_from_config(m), models.abstract_params(decoder, m)
  assert variant != 'tiny' or 0 < spec.num_kv_heads < spec.num_heads
  body = runs.kernel_size({k: v for k, v in params.items() if k.startswith('layers')})
  seq_len = 20
  assert decoder.body_flops_per_token(spec, seq_len) == (
      6 * body + 6 * spec.num_layers * seq_len * spec.num_heads * spec.head_dim)
  assert decoder.lm_head_flops_per_position(spec) == 6 * math.prod(
      params['token_embed']['embedding'].shape)
