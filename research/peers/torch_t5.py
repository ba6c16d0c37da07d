"""Our encoder-decoder (T5 v1.0, v1.1, ByT5) as eager Hugging Face transformers, for benchmark
ratios.

The model is transformers' T5ForConditionalGeneration of `config.model`, float32, in train mode
with the config's dropout and transformers' default attention implementation, so that the ratio
measures us against how transformers trains. It holds exactly our parameters (`parameter_count`
equals research.models.count_params of the encoder_decoder family): transformers 5 ties lm_head
to the shared embedding whatever the config says, so an untied model gets an lm_head of its own
here, drawn as ours is. Like ours it drops out hidden states but not attention probabilities
(T5's own attention would, at the same rate).
A row is train.seq_len random encoder tokens and train.target_len random targets, the decoder
reading them shifted right from id 0: the full rows every objective of ours trains on (they
differ in how inputs and targets are made, not in the compute), so every objective is accepted.
transformers projects every target onto the vocabulary, as ours does.
AdamW with the config's settings and no decay on norms, at a constant learning rate, with
global-norm clipping. Needs torch and transformers (`pip install -r requirements-bench.txt`);
never imported by the framework itself.
"""

import torch
import transformers
from transformers.models.t5 import modeling_t5

# AdamW with no decay on norms or biases, and one step of a transformers model's own loss.
from research.peers.torch_bert import _optimizer
from research.peers.torch_bert import _train_step

_FIRST_ID = 3  # Random ids start above the special tokens (padding, which also starts decoding).
# (model.gated, model.activation) -> transformers' feed_forward_proj (research/hf_t5.py's names).
_FEED_FORWARD = {(False, 'relu'): 'relu', (True, 'relu'): 'gated-relu',
                 (False, 'gelu_tanh'): 'gelu_new', (True, 'gelu_tanh'): 'gated-gelu'}


def _untie(model, emb_dim):
  """A separate lm_head, initialised as ours (normal, std d_model ** -0.5)."""
  if model.lm_head.weight is model.shared.weight:
    weight = torch.empty_like(model.shared.weight).normal_(0.0, emb_dim ** -0.5)
    model.lm_head.weight = torch.nn.Parameter(weight)


def _build(model_config):
  """The transformers model of `config.model`, in train mode."""
  m = model_config
  proj = _FEED_FORWARD.get((m.gated, m.activation))
  if proj is None:
    raise ValueError(f'transformers\' T5 has no MLP of model.activation={m.activation!r}; use '
                     'relu or gelu_tanh.')
  hf_config = transformers.T5Config(
      vocab_size=m.vocab_size, d_model=m.emb_dim, d_kv=m.head_dim or m.emb_dim // m.num_heads,
      d_ff=m.mlp_dim, num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers or
      m.num_layers, num_heads=m.num_heads, relative_attention_num_buckets=m.relative_buckets,
      relative_attention_max_distance=m.relative_max_distance, dropout_rate=m.dropout_rate,
      layer_norm_epsilon=m.norm_eps, feed_forward_proj=proj,
      tie_word_embeddings=bool(m.tie_embeddings), decoder_start_token_id=0, pad_token_id=0)
  model = transformers.T5ForConditionalGeneration(hf_config)
  if not m.tie_embeddings:
    _untie(model, m.emb_dim)
  for module in model.modules():
    if isinstance(module, modeling_t5.T5Attention):
      module.dropout = 0.0  # Of attention probabilities, which ours does not drop.
  return model.float().train()


def parameter_count(config):
  """Trainable parameters of the peer (tied tensors once), to check it is our model."""
  torch.manual_seed(0)
  return sum(p.numel() for p in _build(config.model).parameters() if p.requires_grad)


def _random_batch(config, batch_size, seq_len):
  """Full rows of random ids: `seq_len` encoder tokens and train.target_len targets."""
  ids = torch.arange(_FIRST_ID, config.model.vocab_size)
  inputs = ids[torch.randint(len(ids), (batch_size, seq_len))]
  labels = ids[torch.randint(len(ids), (batch_size, config.train.target_len))]
  return dict(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels)


def make_trainer(config, batch_size, seq_len):
  """Returns run_steps(n) -> encoder and decoder tokens trained, like research.bench's JAX
  side."""
  torch.manual_seed(0)
  model = _build(config.model)
  optimizer = _optimizer(model, config.optim)
  row = seq_len + config.train.target_len

  def run_steps(count):
    for _ in range(count):
      loss = _train_step(model, optimizer, _random_batch(config, batch_size, seq_len),
                         config.optim.clip_norm)
    loss.item()  # Wait for the last step.
    return float(count * batch_size * row)  # Full rows: no padding.

  return run_steps
