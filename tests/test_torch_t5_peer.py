"""The encoder-decoder's torch peer is our model (our parameters give our logits) and trains."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import runs
from research import hf_t5
from research import layout
from research import models
from research.config import load_config_file
from research.models import encoder_decoder
from research.peers import torch_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant):
  return load_config_file(os.path.join(REPO, 'configs', f'encoder_decoder.py:{variant}'))


def _t5_tiny():
  """v1.1: gated tanh GELU, untied output layer."""
  return _config('t5_tiny')


def _t5_small_shrunk():
  """t5_small (v1.0: ReLU, tied and scaled output layer) at a test's size, with a decoder
  deeper than the encoder and the AdamW settings of t5_tiny."""
  config = _config('t5_small')
  config.model.update(dict(num_layers=2, num_decoder_layers=3, num_heads=4, head_dim=8,
                           emb_dim=32, mlp_dim=64, vocab_size=300, dtype='float32'))  # As the peer.
  config.optim.update(dict(name='adamw', lr=3e-3, weight_decay=0.1, clip_norm=1.0))
  config.train.target_len = 16
  return config


@pytest.mark.parametrize('make_config', [_t5_tiny, _t5_small_shrunk], ids=['v1_1', 'v1_0'])
def test_peer_is_our_model_and_trains(make_config):
  config = make_config()
  assert torch_t5.parameter_count(config) == models.count_params(encoder_decoder, config.model)

  # Our parameters, off their initial values, give the peer our logits (without dropout).
  ours, params = runs.perturbed_params(encoder_decoder, config.model)
  stacked = layout.convert(jax.device_get(params), scan_layers=True)  # As convert to_hf does.
  peer = runs.load_into_torch(torch_t5._build(config.model).eval(),
                              hf_t5.params_to_hf(stacked, config.model))
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, config.model.vocab_size, (2, 16))
  targets = np.concatenate([np.zeros((2, 1), int),
                            rng.integers(3, config.model.vocab_size, (2, 7))], axis=1)
  with torch.no_grad():
    want = peer(input_ids=torch.tensor(inputs), decoder_input_ids=torch.tensor(targets)).logits
  masks = [jnp.ones(x.shape, jnp.int32) for x in (inputs, targets)]
  hidden = ours.apply({'params': params}, jnp.asarray(inputs), jnp.asarray(targets), *masks)
  got = ours.apply({'params': params}, hidden, method='logits')
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=0)

  # One batch, repeated: the loss must fall.
  torch.manual_seed(0)
  model = torch_t5._build(config.model)
  assert model.training
  assert (model.lm_head.weight is model.shared.weight) == config.model.tie_embeddings
  optimizer = torch_t5._optimizer(model, config.optim)
  batch = torch_t5._random_batch(config, 8, 32)
  assert batch['input_ids'].shape == (8, 32)
  assert batch['labels'].shape == (8, config.train.target_len)
  assert batch['input_ids'].min() >= 3 and batch['labels'].min() >= 3
  losses = [torch_t5._train_step(model, optimizer, batch, config.optim.clip_norm).item()
            for _ in range(15)]
  assert losses[-1] < 0.85 * losses[0], losses

  run_steps = torch_t5.make_trainer(config, batch_size=4, seq_len=32)
  assert run_steps(2) == 2 * 4 * (32 + config.train.target_len)
