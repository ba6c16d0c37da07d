"""Decoder-only language model: GPT-2 style and Llama style, chosen by `style`.

gpt2:  learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
llama: rotary positions (configurable theta), RMSNorm, SwiGLU MLP, grouped-query attention,
       no biases, tied or untied output embedding.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax
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
               attention=model.attention)

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
                   name='mlp')(_norm(spec, 'mlp_norm')(x))
    x = x + dropout(h)
    x = constrain(x, self.sharding, ('batch', 'length', 'act_embed'))
    return x, None  # (carry, per-layer output) so that nn.scan can stack the block.


_REMAT_POLICIES = {
    'full': None,  # Save nothing: recompute the whole block in the backward pass.
    # Save the outputs of weight matmuls; recompute attention and elementwise work. Fastest on
    # CPU too: stacking every saved activation per layer costs more than recomputing it.
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
  """tokens [batch, length] -> float32 logits [batch, length, vocab]."""
  spec: DecoderSpec
  sharding: Optional[Callable] = None

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic=True, decode=False):
    """decode=True runs against the 'cache' collection (see layers.Attention); `init` with a
    [batch, cache_length] input allocates it."""
    spec = self.spec
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = layers.Embed(spec.vocab_size, spec.emb_dim, dtype=spec.dtype,
                         param_dtype=spec.param_dtype, name='token_embed')
    x = embed(tokens)
    if spec.is_gpt2:
      x = x + layers.Embed(spec.max_len, spec.emb_dim, axes=('length', 'embed'), init_std=0.02,
                           dtype=spec.dtype, param_dtype=spec.param_dtype,
                           name='position_embed')(positions)
    x = nn.Dropout(spec.dropout_rate, deterministic=deterministic)(x)
    x = constrain(x, self.sharding, ('batch', 'length', 'act_embed'))

    block = DecoderBlock
    if spec.remat != 'none' and not decode:  # Remat only matters for gradients.
      block = nn.remat(block, policy=_REMAT_POLICIES[spec.remat], prevent_cse=not spec.scan_layers)
    if spec.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=spec.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(spec, deterministic, self.sharding, decode, name='layers')(
          x, positions, segment_ids)
    else:
      for i in range(spec.num_layers):
        x, _ = block(spec, deterministic, self.sharding, decode, name=f'layers_{i}')(
            x, positions, segment_ids)

    x = _norm(spec, 'final_norm')(x)
    if spec.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.DenseGeneral((spec.vocab_size,), ('embed', 'vocab'), dtype=spec.dtype,
                                   param_dtype=spec.param_dtype, name='lm_head')(x)
    logits = constrain(logits, self.sharding, ('batch', 'length', 'act_vocab'))
    return logits.astype(jnp.float32)


def build(model_config, sharding=None):
  return Decoder(DecoderSpec.from_config(model_config), sharding=sharding)


def abstract_params(model_config):
  """The parameter tree as ShapeDtypeStructs (no memory is allocated)."""
  model = build(model_config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return nn.meta.unbox(shapes)['params']


def count_params(model_config):
  """Exact parameter count."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(model_config)))
