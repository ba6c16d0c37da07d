"""Bidirectional encoders for masked-LM pretraining: BERT, RoBERTa and ALBERT, chosen by `style`.

bert:    word + learned position + token-type embeddings, post-norm blocks (x = LN(x + f(x))),
         exact GELU, biases everywhere; a masked-LM head tied to the word embeddings, a pooler
         and a next-sentence head.
roberta: BERT's network with one token type and positions offset by pad_id + 1 (the original
         numbers its positions after the padding index); pretrained without pooler or pair head.
albert:  embeddings of a smaller size E projected to the hidden size H, one block's parameters
         applied num_layers times (cross-layer sharing), tanh GELU, a masked-LM head that projects
         back to E, and a sentence-order head.

`__call__` returns hidden states and the heads are methods, so that an objective applies the
masked-LM head only to the positions it predicts.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax.numpy as jnp
from flax import linen as nn

from research.models import activations
from research.models import layers
from research.partitioning import constrain

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
STYLES = ('bert', 'roberta', 'albert')
PAIR_HEADS = ('none', 'nsp', 'sop')  # Next-sentence (BERT) or sentence-order (ALBERT) prediction.


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Everything the network needs, translated once from `config.model`."""
  style: str
  vocab_size: int
  num_layers: int
  num_heads: int
  head_dim: int
  emb_dim: int  # Hidden size H.
  embedding_dim: int  # Embedding size E (= H unless ALBERT factorises it).
  mlp_dim: int
  max_len: int  # Usable positions.
  type_vocab_size: int
  pad_id: int
  norm_eps: float
  dropout_rate: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  scan_layers: bool
  remat: str
  attention: str  # See research/models/attention.py.
  share_layers: bool
  pooler: bool
  pair_head: str
  num_labels: int  # > 0: a sequence-classification head (fine-tuning).

  @classmethod
  def from_config(cls, model):
    return cls(style=model.style, vocab_size=model.vocab_size, num_layers=model.num_layers,
               num_heads=model.num_heads, head_dim=model.emb_dim // model.num_heads,
               emb_dim=model.emb_dim, embedding_dim=model.embedding_dim or model.emb_dim,
               mlp_dim=model.mlp_dim, max_len=model.max_len,
               type_vocab_size=model.type_vocab_size, pad_id=model.pad_id,
               norm_eps=model.norm_eps, dropout_rate=model.dropout_rate,
               dtype=_DTYPES[model.dtype], param_dtype=_DTYPES[model.param_dtype],
               scan_layers=model.scan_layers, remat=model.remat, attention=model.attention,
               share_layers=model.share_layers, pooler=model.pooler, pair_head=model.pair_head,
               num_labels=model.num_labels)

  @property
  def factorised(self):
    """ALBERT: embeddings of size E, projected to H at the input and back in the MLM head."""
    return self.style == 'albert'

  @property
  def activation(self):
    """A key of activations.ACTIVATIONS: the GELU each style's checkpoints were trained with."""
    return 'gelu_tanh' if self.style == 'albert' else 'gelu'

  @property
  def position_offset(self):
    """RoBERTa's position table starts after its padding index: rows 0..pad_id are unused."""
    return self.pad_id + 1 if self.style == 'roberta' else 0

  @property
  def position_rows(self):
    return self.max_len + self.position_offset

  @property
  def param_layers(self):
    """Blocks held in the parameter tree (the length of its 'layers' axis): one when shared."""
    return 1 if self.share_layers else self.num_layers


def _layer_norm(spec):
  return layers.LayerNorm(eps=spec.norm_eps, dtype=spec.dtype, param_dtype=spec.param_dtype)


def _dense(spec, features, axes):
  return layers.DenseGeneral((features,), axes, use_bias=True, init_std=0.02, dtype=spec.dtype,
                             param_dtype=spec.param_dtype)


class Bias(nn.Module):
  """A bias on its own (the masked-LM output bias); its leaf is named 'bias' so that the
  optimiser's rules for biases apply to it."""
  features: int
  axis: Optional[str]
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)),
                      (self.features,), self.param_dtype)
    return x + bias.astype(x.dtype)


class EncoderBlock(nn.Module):
  """Post-norm residual block: x = LN(x + attn(x)), then x = LN(x + mlp(x)).

  `repeats` applies the same parameters that many times in a row (ALBERT's cross-layer
  sharing). Each application is rematerialised on its own, so that the backward pass holds the
  activations of one layer at a time, however many times the block repeats.
  """
  spec: EncoderSpec
  deterministic: bool = True
  sharding: Optional[Callable] = None
  repeats: int = 1

  def setup(self):
    spec = self.spec
    self.attn = layers.Attention(
        num_heads=spec.num_heads, num_kv_heads=spec.num_heads, head_dim=spec.head_dim,
        use_bias=True, rope_theta=None, init_std=0.02, out_init_std=0.02,
        implementation=spec.attention, dtype=spec.dtype, param_dtype=spec.param_dtype,
        sharding=self.sharding, causal=False)
    self.attn_norm = _layer_norm(spec)
    self.mlp = layers.Mlp(hidden_dim=spec.mlp_dim, gated=False, use_bias=True, init_std=0.02,
                          out_init_std=0.02, dtype=spec.dtype, param_dtype=spec.param_dtype,
                          sharding=self.sharding, activation=spec.activation)
    self.mlp_norm = _layer_norm(spec)
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)

  def layer(self, x, segment_ids):
    x = self.attn_norm(x + self.dropout(self.attn(x, None, segment_ids)))
    x = self.mlp_norm(x + self.dropout(self.mlp(x)))
    return constrain(x, self.sharding, ('batch', 'length', 'act_embed'))

  def __call__(self, x, segment_ids):
    spec, layer = self.spec, EncoderBlock.layer
    if spec.remat != 'none':
      # One application per nn.scan step needs no barrier against common-subexpression
      # elimination; unrolled applications do.
      layer = nn.remat(layer, policy=layers.REMAT_POLICIES[spec.remat],
                       prevent_cse=not spec.scan_layers or self.repeats > 1)
    for _ in range(self.repeats):
      x = layer(self, x, segment_ids)
    return x, None  # (carry, per-layer output) so that nn.scan can stack the block.


class Encoder(nn.Module):
  """tokens [batch, length] -> hidden states [batch, length, emb_dim] (after the last block).

  The heads are methods applied to hidden states: `mlm_logits`, `pooled`, `pair_logits`;
  `initialize` applies the body and every head, so that `init` creates every parameter.
  """
  spec: EncoderSpec
  sharding: Optional[Callable] = None
  deterministic: bool = True  # False: dropout on (needs a 'dropout' rng).

  def setup(self):
    spec = self.spec
    embed = functools.partial(layers.Embed, features=spec.embedding_dim, init_std=0.02,
                              dtype=spec.dtype, param_dtype=spec.param_dtype,
                              sharding=self.sharding)
    self.token_embed = embed(spec.vocab_size)
    self.position_embed = embed(spec.position_rows, axes=('positions', 'embed'))
    self.type_embed = embed(spec.type_vocab_size, axes=(None, 'embed'))
    self.embed_norm = _layer_norm(spec)
    if spec.factorised:
      self.embed_proj = _dense(spec, spec.emb_dim, ('embed', 'embed'))
    self.dropout = nn.Dropout(spec.dropout_rate, deterministic=self.deterministic)
    self.layers = self._blocks()
    self.mlm_transform = _dense(spec, spec.embedding_dim, ('embed', 'embed'))
    self.mlm_norm = _layer_norm(spec)
    self.mlm_bias = Bias(spec.vocab_size, 'vocab', spec.param_dtype)
    if spec.pooler:
      self.pooler = _dense(spec, spec.emb_dim, ('embed', 'embed'))
    if spec.pair_head != 'none':
      self.pair_head = _dense(spec, 2, ('embed', None))
    if spec.num_labels and not spec.pooler:  # RoBERTa's head: its own dense + tanh first.
      self.classifier_dense = _dense(spec, spec.emb_dim, ('embed', 'embed'))
    if spec.num_labels:
      self.classifier = _dense(spec, spec.num_labels, ('embed', None))

  def _blocks(self):
    """nn.scan over the blocks ('layers', stacked on a 'layers' axis) or a list of them
    (layers_0, layers_1...), as the decoder; shared parameters make a stack of one block."""
    spec = self.spec
    args = (spec, self.deterministic, self.sharding, spec.num_layers // spec.param_layers)
    if spec.scan_layers:
      return nn.scan(EncoderBlock, variable_axes={'params': 0},
                     split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,),
                     length=spec.param_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})(*args)
    return [EncoderBlock(*args) for _ in range(spec.param_layers)]

  def __call__(self, tokens, positions=None, segment_ids=None, token_types=None):
    """positions: 0-based within each packed document (default: arange); segment_ids: document
    ids from 1, 0 on padding (default: one unpadded document per row); token_types: sentence A
    or B (default: all A)."""
    x = self.embed(tokens, positions, token_types)
    if self.spec.scan_layers:
      x, _ = self.layers(x, segment_ids)
    else:
      for block in self.layers:
        x, _ = block(x, segment_ids)
    return x

  def embed(self, tokens, positions=None, token_types=None):
    """Word + token-type + position embeddings, normalised; ALBERT then projects E -> H."""
    spec = self.spec
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if token_types is None:
      token_types = jnp.zeros_like(tokens)
    x = self.token_embed(tokens) + self.type_embed(token_types)
    x = x + self.position_embed(positions + spec.position_offset)
    x = self.dropout(self.embed_norm(x))
    if spec.factorised:
      x = self.embed_proj(x)
    return constrain(x, self.sharding, ('batch', 'length', 'act_embed'))

  def mlm_logits(self, hidden):
    """float32 masked-LM logits [..., vocab] of hidden states [..., emb_dim] (any leading
    shape: an objective gathers the predicted positions first). Dense, GELU, LayerNorm, then the
    word embeddings (tied) plus an output bias of its own."""
    features = self._mlm_features(hidden)
    logits = self.mlm_bias(self.token_embed.attend(features).astype(jnp.float32))
    leading = (('batch', 'length') + (None,) * logits.ndim)[:logits.ndim - 1]
    return constrain(logits, self.sharding, leading + ('act_vocab',))

  def _mlm_features(self, hidden):
    """The masked-LM head's transform of hidden states: dense, GELU, LayerNorm."""
    h = self.mlm_transform(hidden)
    return self.mlm_norm(activations.ACTIVATIONS[self.spec.activation](h))

  def head_inputs(self, hidden):
    """The masked-LM head as a product, for a loss that computes logits in chunks
    (research/objectives/chunked_loss.py): mlm_logits(hidden) == features @ kernel + bias, the
    kernel being the tied word embeddings [vocab, embedding_dim] (vocab_axis 0)."""
    dtype = self.spec.dtype
    return dict(features=self._mlm_features(hidden).astype(dtype),
                kernel=self.token_embed.embedding.astype(dtype),
                bias=nn.meta.unbox(self.mlm_bias.variables['params']['bias']), vocab_axis=0)

  def pooled(self, hidden):
    """tanh(dense(hidden of the first token)) [batch, emb_dim]: the sequence summary that the
    pair head reads."""
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def pair_logits(self, pooled):
    """float32 logits [batch, 2] of next-sentence (nsp) or sentence-order (sop) prediction."""
    return self.pair_head(pooled).astype(jnp.float32)

  def classify(self, hidden, segment_ids=None):
    """float32 class logits [batch, num_labels] from the first token ([CLS]): BERT and ALBERT
    read the pooled output, RoBERTa its own dense + tanh (as their sequence-classification
    models do); dropout before each projection."""
    del segment_ids  # The first token summarises the sequence.
    if self.spec.pooler:
      summary = self.pooled(hidden)
    else:
      summary = jnp.tanh(self.classifier_dense(self.dropout(hidden[:, 0])))
    return self.classifier(self.dropout(summary)).astype(jnp.float32)

  def initialize(self, tokens, positions=None, segment_ids=None, token_types=None):
    """The body and every head of the spec (what `init` calls to create every parameter)."""
    hidden = self(tokens, positions, segment_ids, token_types)
    outputs = dict(hidden=hidden, mlm_logits=self.mlm_logits(hidden))
    if self.spec.pooler:
      outputs['pooled'] = self.pooled(hidden)
      if self.spec.pair_head != 'none':
        outputs['pair_logits'] = self.pair_logits(outputs['pooled'])
    if self.spec.num_labels:
      outputs['class_logits'] = self.classify(hidden, segment_ids)
    return outputs


HF_MODEL_TYPES = STYLES  # Converted by research/hf_encoder.py.
GENERATES_TEXT = False
TORCH_PEER = 'research.peers.torch_bert'  # research.bench --peer=torch.
# The config variant whose training defaults a converted model of each type takes.
HF_BASE_VARIANTS = {'bert': 'bert_base', 'roberta': 'roberta_base', 'albert': 'albert_base'}


def hf_converter():
  """The module that converts this family to and from Hugging Face tensors and configs."""
  from research import hf_encoder  # Imported on use: only conversion needs safetensors.
  return hf_encoder


def spec_from_config(model_config):
  return EncoderSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot build.

  share_layers works with scan_layers either way (a scanned stack of one block, applied
  num_layers times within it), and with every style, though only ALBERT converts to Hugging Face
  with it.
  """
  m = model_config
  if m.style not in STYLES:
    raise ValueError(f'config.model.style={m.style!r} is not one of {list(STYLES)}.')
  if m.emb_dim % m.num_heads:
    raise ValueError(f'model.num_heads={m.num_heads} must divide model.emb_dim={m.emb_dim}.')
  if m.style != 'albert' and m.embedding_dim not in (0, m.emb_dim):
    raise ValueError(f'model.embedding_dim={m.embedding_dim} differs from model.emb_dim='
                     f'{m.emb_dim}, which only ALBERT factorises; set model.embedding_dim=0 or '
                     "model.style='albert'.")
  if m.embedding_dim < 0:
    raise ValueError(f'model.embedding_dim={m.embedding_dim} must be positive (or 0 for '
                     'model.emb_dim).')
  if m.pair_head not in PAIR_HEADS:
    raise ValueError(f'config.model.pair_head={m.pair_head!r} is not one of {list(PAIR_HEADS)}.')
  if m.pair_head != 'none' and not m.pooler:
    raise ValueError(f'model.pair_head={m.pair_head!r} reads the pooled first token; set '
                     "model.pooler=True or model.pair_head='none'.")
  if m.type_vocab_size < 1:
    raise ValueError(f'model.type_vocab_size={m.type_vocab_size} must be at least 1.')
  if m.max_len < 1:
    raise ValueError(f'model.max_len={m.max_len} must be positive.')
  if m.pad_id < 0:
    raise ValueError(f'model.pad_id={m.pad_id} must not be negative.')
  if m.num_labels < 0 or m.num_labels == 1:
    raise ValueError(f'model.num_labels={m.num_labels} must be 0 (no classification head) or '
                     'at least 2.')


def sharded_heads(model_config):
  """Head counts that mesh.tensor must divide."""
  return {'model.num_heads': model_config.num_heads}


def param_layers(model_config):
  """The length of the parameter tree's 'layers' axis (blocks layers_0.. when not scanned): what
  research/layout.py's stack and unstack take as num_layers for this family."""
  return EncoderSpec.from_config(model_config).param_layers


def build(model_config, sharding=None):
  return Encoder(EncoderSpec.from_config(model_config), sharding=sharding)


def init_inputs(seq_len):
  """Arguments of `Encoder.initialize` for abstract or real initialisation."""
  return dict(tokens=jnp.zeros((1, seq_len), jnp.int32))



# Model FLOPs for MFU (training = 3x forward, a multiply-add = 2 FLOPs), split so that an
# objective adds the heads it applies where it applies them. Embedding lookups are free.

def body_flops_per_token(spec, seq_len):
  """6 * W + 12 * L * T * H.

  W: weights applied to every token: per layer 4 H^2 (query, key, value, output) + 2 H F (MLP),
  over the L applied layers (ALBERT applies its one block L times: sharing saves parameters, not
  compute), plus ALBERT's E x H input projection. Attention scores and weighted values take
  2 * T * H multiply-adds per token and layer, 12 * T * H FLOPs in training: bidirectional
  attention computes every query-key product, so unlike a causal decoder nothing is halved.
  """
  attended = spec.num_heads * spec.head_dim
  per_layer = 4 * spec.emb_dim * attended + 2 * spec.emb_dim * spec.mlp_dim
  weights = spec.num_layers * per_layer
  if spec.factorised:
    weights += spec.embedding_dim * spec.emb_dim
  return 6 * weights + 12 * spec.num_layers * seq_len * attended


def mlm_head_flops_per_position(spec):
  """6 * (H * E transform + E * vocab projection), E = H except for ALBERT."""
  return 6 * (spec.emb_dim * spec.embedding_dim + spec.embedding_dim * spec.vocab_size)


def pair_head_flops_per_example(spec):
  """6 * (H * H pooler + H * 2 pair head), each where the spec has it."""
  pooler = spec.emb_dim * spec.emb_dim if spec.pooler else 0
  pair = 2 * spec.emb_dim if spec.pair_head != 'none' else 0
  return 6 * (pooler + pair)
