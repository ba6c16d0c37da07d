"""The decoder's torch peer is our GPT-2 (our parameters give our loss) and trains."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

import runs
from research import hf
from research import layout
from research.config import load_config_file
from research.models import decoder
from research.peers import torch_gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peer_tensors(hf_tensors):
  """GPT-2's Hugging Face tensors under the peer's (nanoGPT's) names; Linear holds [out, in]
  where GPT-2's Conv1D holds [in, out]."""
  renames = {'attn.c_attn': 'c_attn', 'attn.c_proj': 'c_proj', 'mlp.c_fc': 'c_fc',
             'mlp.c_proj': 'mlp_proj'}
  tensors = {}
  for name, value in hf_tensors.items():
    name = name.removeprefix('transformer.').replace('h.', 'blocks.', 1)
    for old, new in renames.items():
      if f'.{old}.' in name:
        name = name.replace(old, new)
        value = value.T if name.endswith('weight') else value
    tensors[name] = value
  return tensors


def test_peer_is_our_model_and_trains():
  config = load_config_file(os.path.join(REPO, 'configs', 'decoder.py:nanogpt_cpu'))
  m = config.model
  ours, params = runs.perturbed_params(decoder, m)
  stacked = layout.convert(jax.device_get(params), scan_layers=True)  # As convert to_hf does.
  tensors = _peer_tensors(hf.params_to_hf(stacked, m))
  peer = torch_gpt.TorchGPT(m.vocab_size, m.max_len, m.emb_dim, m.num_heads, m.num_layers,
                            m.mlp_dim)
  assert set(tensors) == {name for name, _ in peer.named_parameters()}  # lm_head is tied.
  runs.load_into_torch(peer, tensors)

  rng = np.random.default_rng(0)
  data = rng.integers(0, m.vocab_size, (2, 33))
  with torch.no_grad():
    want = float(peer(torch.tensor(data[:, :-1]), torch.tensor(data[:, 1:])))
  positions = np.broadcast_to(np.arange(32), (2, 32))
  logits = ours.apply({'params': params}, jnp.asarray(data[:, :-1]), jnp.asarray(positions),
                      method='language_model')
  logits = np.asarray(logits, np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  got = -np.take_along_axis(log_probs, data[:, 1:, None], -1).mean()
  assert abs(got - want) < 1e-6, (got, want)  # Exact GELU in the peer differs by 2e-5.

  run_steps = torch_gpt.make_trainer(config, batch_size=2, seq_len=16)
  assert run_steps(2) == 2 * 2 * 16
