"""A nanoGPT-equivalent GPT-2 in PyTorch (eager, no torch.compile), for benchmark ratios.

The architecture and training step follow nanoGPT's model.py/train.py on CPU: learned positions,
pre-LayerNorm blocks with biases, fused QKV projection, `scaled_dot_product_attention` (causal),
tied embeddings, AdamW with no decay on biases and norms, global-norm clipping. The GELU is
GPT-2's tanh form, as ours (nanoGPT's nn.GELU() is the exact one), so that the peer computes our
model: our parameters give it our loss (tests/test_torch_gpt_peer.py).
Needs `pip install -r requirements-bench.txt` (torch); never imported by the framework itself.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class _Block(nn.Module):

  def __init__(self, width, heads, hidden):
    super().__init__()
    self.heads = heads
    self.ln_1 = nn.LayerNorm(width)
    self.c_attn = nn.Linear(width, 3 * width)
    self.c_proj = nn.Linear(width, width)
    self.ln_2 = nn.LayerNorm(width)
    self.c_fc = nn.Linear(width, hidden)
    self.mlp_proj = nn.Linear(hidden, width)

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
    q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
    return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate='tanh'))


class TorchGPT(nn.Module):

  def __init__(self, vocab_size, max_len, width, heads, layers, hidden):
    super().__init__()
    self.wte = nn.Embedding(vocab_size, width)
    self.wpe = nn.Embedding(max_len, width)
    self.blocks = nn.ModuleList(_Block(width, heads, hidden) for _ in range(layers))
    self.ln_f = nn.LayerNorm(width)
    self.lm_head = nn.Linear(width, vocab_size, bias=False)
    self.lm_head.weight = self.wte.weight  # Tied.
    for name, p in self.named_parameters():
      if name.endswith('weight') and p.dim() == 2:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith('proj.weight') else 0.02
        nn.init.normal_(p, 0.0, std)
      elif name.endswith('bias'):
        nn.init.zeros_(p)

  def forward(self, tokens, targets):
    positions = torch.arange(tokens.shape[1])
    x = self.wte(tokens) + self.wpe(positions)
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def make_trainer(config, batch_size, seq_len):
  """Returns run_steps(n) -> non-padding tokens trained, like research.bench's JAX side."""
  if config.model.style != 'gpt2':
    raise ValueError('The torch peer of the decoder implements the GPT-2 style only; use a gpt2 '
                     'variant such as nanogpt_cpu.')
  torch.manual_seed(0)
  m, o = config.model, config.optim
  lr, weight_decay, clip_norm = o.lr, o.weight_decay, o.clip_norm
  model = TorchGPT(m.vocab_size, m.max_len, m.emb_dim, m.num_heads, m.num_layers, m.mlp_dim)
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                                 dict(params=no_decay, weight_decay=0.0)],
                                lr=lr, betas=(0.9, 0.95))

  def run_steps(count):
    for _ in range(count):
      data = torch.randint(m.vocab_size, (batch_size, seq_len + 1))
      loss = model(data[:, :-1], data[:, 1:])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
    loss.item()  # Wait for the last step.
    return count * batch_size * seq_len

  return run_steps
