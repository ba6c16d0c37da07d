"""Decoder-only language model: GPT-2 style and Llama style, chosen by `style`.

gpt2:  learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
llama: rotary positions (configurable theta), RMSNorm, SwiGLU MLP, grouped-query attention,
       no biases, tied or untied output embedding.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from research.models import layers
from research.partitioning import constrain

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  """Everything the network needs, translated once from `config.model`."""
  style: str
  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  emb_dim: int
  mlp_dim: int
  max_len: int
  rope_theta: float
  tie_embeddings: bool
  norm_eps: float
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  scan_layers: bool
  remat: str
  attention: str  # See research/models/attention.py.
  num_labels: int  # > 0: a sequence-classification head (fine-tuning).

  @classmethod
  def from_config(cls, model):
    return cls(style=model.style, vocab_size=model.vocab_size, num_layers=model.num_layers,
               num_heads=model.num_heads, num_kv_heads=model.num_kv_heads or model.num_heads,
               head_dim=model.head_dim or model.emb_dim // model.num_heads,
               emb_dim=model.emb_dim, mlp_dim=model.mlp_dim, max_len=model.max_len,
               rope_theta=model.rope_theta,
               tie_embeddings=model.tie_embeddings or model.style == 'gpt2',
               norm_eps=model.norm_eps, dropout_rate=model.dropout_rate,
               dtype=_DTYPES[model.dtype], param_dtype=_DTYPES[model.param_dtype],
               scan_layers=model.scan_layers, remat=model.remat,
               attention=model.attention, num_labels=model.num_labels)

  @property
  def is_gpt2(self):
    return self.style == 'gpt2'


def _norm(spec, name):
  if spec.is_gpt2:
    return layers.LayerNorm(eps=spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype,
                            name=name)
  return layers.RMSNorm(eps=spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype,
                        name=name)


class DecoderBlock(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  spec: DecoderSpec
  deterministic: bool = True
  sharding: Optional[Callable] = None
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    spec = self.spec
    # GPT-2 scales residual-output projections by 1/sqrt(2 * layers) at init.
    out_std = 0.02 / math.sqrt(2 * spec.num_layers) if spec.is_gpt2 else 0.02
    dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    h = layers.Attention(
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        use_bias=spec.is_gpt2, rope_theta=None if spec.is_gpt2 else spec.rope_theta,
        init_std=0.02, out_init_std=out_std, implementation=spec.attention, dtype=spec.dtype,
        param_dtype=spec.param_dtype, sharding=self.sharding, decode=self.decode, name='attn',
    )(_norm(spec, 'attn_norm')(x), positions, segment_ids)
    x = x + dropout(h)
    h = layers.Mlp(hidden_dim=spec.mlp_dim, gated=not spec.is_gpt2, use_bias=spec.is_gpt2,
                   init_std=0.02, out_init_std=out_std, dtype=spec.dtype,
                   param_dtype=spec.param_dtype, sharding=self.sharding,
                   activation='gelu_tanh' if spec.is_gpt2 else 'silu',
                   name='mlp')(_norm(spec, 'mlp_norm')(x))
    x = x + dropout(h)
    x = constrain(x, self.sharding, ('batch', 'length', 'act_embed'))
    return x, None  # (carry, per-layer output) so that nn.scan can stack the block.


class Decoder(nn.Module):
  """tokens [batch, length] -> hidden states [batch, length, emb_dim] (after the final norm).

  `logits(hidden)` applies the output head (tied or not) to hidden states of any leading shape,
  so that an objective projects only the positions it needs; `language_model` does both.
  decode=True runs against the 'cache' collection (see layers.Attention); `init` with a
  [batch, cache_length] input allocates it.
  """
  spec: DecoderSpec
  sharding: Optional[Callable] = None
  deterministic: bool = True  # False: dropout on (needs a 'dropout' rng).
  decode: bool = False

  def setup(self):
    spec = self.spec
    self.token_embed = layers.Embed(spec.vocab_size, spec.emb_dim, dtype=spec.dtype,
                                    param_dtype=spec.param_dtype, sharding=self.sharding)
    if spec.is_gpt2:
      self.position_embed = layers.Embed(spec.max_len, spec.emb_dim, axes=('positions', 'embed'),
                                         init_std=0.02, dtype=spec.dtype,
                                         param_dtype=spec.param_dtype, sharding=self.sharding)
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    block = DecoderBlock
    if spec.remat != 'none' and not self.decode:  # Remat only matters for gradients.
      block = nn.remat(block, policy=layers.REMAT_POLICIES[spec.remat],
                       prevent_cse=not spec.scan_layers)
    args = (spec, self.deterministic, self.sharding, self.decode)
    if spec.scan_layers:
      self.layers = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                            split_rngs={'params': True, 'dropout': True},
                            in_axes=(nn.broadcast, nn.broadcast), length=spec.num_layers,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(*args)
    else:
      self.layers = [block(*args) for _ in range(spec.num_layers)]  # layers_0, layers_1...
    self.final_norm = _norm(spec, None)
    if not spec.tie_embeddings:
      self.lm_head = layers.DenseGeneral((spec.vocab_size,), ('embed', 'vocab'), dtype=spec.dtype,
                                         param_dtype=spec.param_dtype)
    if spec.num_labels:  # No bias, as transformers' ...ForSequenceClassification `score`.
      self.classifier = layers.DenseGeneral((spec.num_labels,), ('embed', None),
                                            dtype=spec.dtype, param_dtype=spec.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None):
    spec = self.spec
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = self.token_embed(tokens)
    if spec.is_gpt2:
      x = x + self.position_embed(positions)
    x = self.dropout(x)
    x = constrain(x, self.sharding, ('batch', 'length', 'act_embed'))
    if spec.scan_layers:
      x, _ = self.layers(x, positions, segment_ids)
    else:
      for block in self.layers:
        x, _ = block(x, positions, segment_ids)
    return self.final_norm(x)

  def logits(self, hidden):
    """float32 logits [..., vocab] of hidden states [..., emb_dim]."""
    if self.spec.tie_embeddings:
      logits = self.token_embed.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    if logits.ndim == 3:
      logits = constrain(logits, self.sharding, ('batch', 'length', 'act_vocab'))
    return logits.astype(jnp.float32)

  def head_inputs(self, hidden):
    """The output head as a product, for a loss that computes logits in chunks
    (research/objectives/chunked_loss.py): logits(hidden) == features @ kernel, the kernel's
    vocab_axis being its vocabulary axis (0: the tied table [vocab, emb_dim])."""
    spec = self.spec
    if spec.tie_embeddings:
      kernel, vocab_axis = self.token_embed.embedding, 0
    else:
      kernel, vocab_axis = nn.meta.unbox(self.lm_head.variables['params']['kernel']), 1
    return dict(features=hidden.astype(spec.dtype), kernel=kernel.astype(spec.dtype), bias=None,
                vocab_axis=vocab_axis)

  def language_model(self, tokens, positions=None, segment_ids=None):
    """Next-token logits at every position."""
    return self.logits(self(tokens, positions, segment_ids))

  def classify(self, hidden, segment_ids=None):
    """float32 class logits [batch, num_labels] from the hidden state of each row's last real
    token (the only one that has seen the whole text); rows hold one right-padded example."""
    if segment_ids is None:
      last = jnp.full((hidden.shape[0],), hidden.shape[1] - 1)
    else:
      last = jnp.maximum(jnp.sum(segment_ids > 0, axis=1) - 1, 0)
    summary = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return self.classifier(summary).astype(jnp.float32)

  def initialize(self, tokens, positions=None, segment_ids=None):
    """The body and every head (what `init` calls to create every parameter)."""
    hidden = self(tokens, positions, segment_ids)
    outputs = dict(logits=self.logits(hidden))
    if self.spec.num_labels:
      outputs['class_logits'] = self.classify(hidden, segment_ids)
    return outputs


HF_MODEL_TYPES = ('gpt2', 'llama')  # Converted by research/hf.py.
GENERATES_TEXT = True  # research/decode.py samples from it.
TORCH_PEER = 'research.peers.torch_gpt'  # research.bench --peer=torch.
# The config variant whose training defaults a converted model of each type takes.
HF_BASE_VARIANTS = {'gpt2': 'gpt2_small', 'llama': 'llama_1b'}


def hf_converter():
  """The module that converts this family to and from Hugging Face tensors and configs."""
  from research import hf  # Imported on use: only conversion needs safetensors.
  return hf


STYLES = ('gpt2', 'llama')


def spec_from_config(model_config):
  return DecoderSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build."""
  m = model_config
  if m.style not in STYLES:
    raise ValueError(f'config.model.style={m.style!r} is not one of {list(STYLES)}.')
  if m.head_dim == 0 and m.emb_dim % m.num_heads:
    raise ValueError(f'model.num_heads={m.num_heads} must divide model.emb_dim={m.emb_dim} '
                     '(or set model.head_dim explicitly).')
  kv_heads = m.num_kv_heads or m.num_heads
  if m.num_heads % kv_heads:
    raise ValueError(f'model.num_kv_heads={kv_heads} must divide model.num_heads={m.num_heads}.')
  if m.num_labels < 0 or m.num_labels == 1:
    raise ValueError(f'model.num_labels={m.num_labels} must be 0 (no classification head) or '
                     'at least 2.')
  if m.style == 'gpt2' and m.num_kv_heads not in (0, m.num_heads):
    raise ValueError('GPT-2 style uses multi-head attention; set model.num_kv_heads=0 or use '
                     "model.style='llama' for grouped-query attention.")


def param_layers(model_config):
  """The length of the parameter tree's 'layers' axis (research/layout.py)."""
  return model_config.num_layers


def sharded_heads(model_config):
  """Head counts that mesh.tensor must divide."""
  return {'model.num_heads': model_config.num_heads,
          'the KV heads': model_config.num_kv_heads or model_config.num_heads}


def build(model_config, sharding=None):
  return Decoder(DecoderSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `Decoder.initialize` for abstract or real initialisation."""
  return dict(tokens=jnp.zeros((1, seq_len), jnp.int32))



# Model FLOPs for MFU (training = 3x forward, a multiply-add = 2 FLOPs), split so that an
# objective adds the heads it applies at the positions it applies them.

def body_flops_per_token(spec, seq_len):
  """6 * (attention and MLP weights) + 6 * L * T * heads * head_dim: attention scores and
  weighted values cost 12 * L * T * A for full attention, halved because causal attention needs
  only half the products."""
  attention = spec.emb_dim * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
  mlp = (2 if spec.is_gpt2 else 3) * spec.emb_dim * spec.mlp_dim
  return 6 * spec.num_layers * (attention + mlp) + 6 * spec.num_layers * seq_len * (
      spec.num_heads * spec.head_dim)


def lm_head_flops_per_position(spec):
  return 6 * spec.emb_dim * spec.vocab_size
