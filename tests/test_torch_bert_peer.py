"""The encoder's torch peer is our model (same parameter count) and trains."""

import os

import pytest
import torch

from research import models
from research.config import load_config_file
from research.models import encoder
from research.peers import torch_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bert_tiny():
  return load_config_file(os.path.join(REPO, 'configs', 'encoder.py:bert_tiny'))


def _albert_tiny():
  """albert_base at a test's size: factorised embeddings, one shared block, the SOP head."""
  config = load_config_file(os.path.join(REPO, 'configs', 'encoder.py:albert_base'))
  config.model.update(dict(num_layers=2, num_heads=2, emb_dim=64, embedding_dim=32, mlp_dim=128,
                           vocab_size=264, max_len=64))
  config.objective.max_predictions = 8
  config.optim.lr = 2e-3  # bert_tiny's: base's 1e-4 moves a tiny model too slowly to see.
  return config


@pytest.mark.parametrize('make_config', [_bert_tiny, _albert_tiny], ids=['bert', 'albert'])
def test_peer_is_our_model_and_trains(make_config):
  config = make_config()
  assert torch_bert.parameter_count(config) == models.count_params(encoder, config.model)

  # One batch, repeated: the loss (masked LM plus the pair task's) must fall.
  torch.manual_seed(0)
  model = torch_bert._build(config.model)
  optimizer = torch_bert._optimizer(model, config.optim)
  batch = torch_bert._random_batch(config, 8, 32)
  assert (batch['labels'] != -100).sum(dim=1).tolist() == [config.objective.max_predictions] * 8
  losses = [torch_bert._train_step(model, optimizer, batch, config.optim.clip_norm).item()
            for _ in range(15)]
  assert losses[-1] < 0.85 * losses[0], losses

  run_steps = torch_bert.make_trainer(config, batch_size=4, seq_len=32)
  assert run_steps(2) == 2 * 4 * 32
