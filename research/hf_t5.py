"""Hugging Face <-> our encoder-decoder: configs and parameters (numpy) for T5 v1.0, v1.1 and ByT5.

The rules of research/hf.py hold here too, and its file and error helpers are reused: only
safetensors and JSON, every mapping a pure relabelling, transposition or reshape (so conversions
in either direction are exact), and every incoming tensor's name and shape checked against
config.json before anything is converted.

One table (`_parameters`) lists each Hugging Face tensor beside our parameter, so that the
checks and both directions of the conversion cannot drift apart.

The output layer. Our model.tie_embeddings=True is T5 v1.0's output: the shared embedding read by
hidden states scaled by d_model ** -0.5; False is v1.1's: a separate lm_head, unscaled.
transformers 5 records the scaling as scale_decoder_outputs (older versions as
tie_word_embeddings, which version 5 now always sets) and ties lm_head to the shared embedding
unless the weights hold an lm_head of other values. So a checkpoint that scales must have no
lm_head of its own, and one that does not scale reads lm_head.weight, or the shared embedding
when the weights hold none.
"""

import numpy as np

from research import models
from research.hf import ConversionError
from research.hf import check_shapes
from research.hf import _contiguous
from research.hf import _field
from research.hf import _unsupported
from research.hf_encoder import _get
from research.hf_encoder import _rate
from research.hf_encoder import _same
from research.hf_encoder import _set
from research.hf_encoder import _to_hf
from research.hf_encoder import _to_ours

encoder_decoder = models.get('encoder_decoder')  # The family this module converts.

ARCHITECTURE = 'T5ForConditionalGeneration'  # The one class that holds an output layer.
# feed_forward_proj -> (our model.gated, model.activation); the first name of each pair is the
# one exported. transformers reads 'gated-gelu' as the tanh GELU (gelu_new), as T5 v1.1 trained.
FEED_FORWARD = {'relu': (False, 'relu'), 'gated-relu': (True, 'relu'),
                'gelu_new': (False, 'gelu_tanh'), 'gated-gelu': (True, 'gelu_tanh'),
                'gated-gelu_new': (True, 'gelu_tanh')}
# transformers' name (dense_act_fn) of each of our activations.
_ACT_FN = {'relu': 'relu', 'gelu_tanh': 'gelu_new'}


# --- configs -------------------------------------------------------------------------------

def _check_supported(hf):
  """ConversionError naming the first field whose value our model does not implement."""
  names = hf.get('architectures') or [ARCHITECTURE]
  if not isinstance(names, list) or names[0] != ARCHITECTURE:
    _unsupported('architectures', names, [ARCHITECTURE])
  if not _same(hf.get('is_encoder_decoder', True), (True,)):
    _unsupported('is_encoder_decoder', hf.get('is_encoder_decoder'), [True])
  proj = hf.get('feed_forward_proj', 'relu')
  if not isinstance(proj, str) or proj not in FEED_FORWARD:
    _unsupported('feed_forward_proj', proj, list(FEED_FORWARD))


def _flag(hf, field):
  value = hf.get(field)
  if value is not None and not isinstance(value, bool):
    raise ConversionError(f'Hugging Face config field {field}={value!r} must be true or false.')
  return value


def scales_outputs(hf):
  """Whether transformers scales the decoder's outputs by d_model ** -0.5 before lm_head (our
  model.tie_embeddings): scale_decoder_outputs where present, else tie_word_embeddings."""
  scale, tie = _flag(hf, 'scale_decoder_outputs'), _flag(hf, 'tie_word_embeddings')
  return scale if scale is not None else tie is not False


def _relative(hf):
  """(buckets, max distance) of the relative position bias, within what our model builds."""
  buckets = _field(hf, 'relative_attention_num_buckets', 32)
  distance = _field(hf, 'relative_attention_max_distance', 128)
  if buckets < 4 or buckets % 2:
    raise ConversionError(f'Hugging Face config field relative_attention_num_buckets={buckets} '
                          'is not supported (supported: even numbers of at least 4).')
  if distance <= buckets // 2:
    raise ConversionError(f'Hugging Face config field relative_attention_max_distance={distance} '
                          f'must exceed half of relative_attention_num_buckets={buckets}.')
  return buckets, distance


def model_overrides_from_hf(hf):
  """Our `config.model` fields for a Hugging Face T5 config.json dict (v1.0, v1.1, ByT5).

  max_len is n_positions where config.json keeps that field (T5's relative positions themselves
  have no limit), else our family's default.
  """
  kind = hf.get('model_type')
  if kind not in encoder_decoder.HF_MODEL_TYPES:
    _unsupported('model_type', kind, list(encoder_decoder.HF_MODEL_TYPES))
  _check_supported(hf)
  gated, activation = FEED_FORWARD[hf.get('feed_forward_proj', 'relu')]
  buckets, distance = _relative(hf)
  layers = _field(hf, 'num_layers')
  return dict(family='encoder_decoder', vocab_size=_field(hf, 'vocab_size'), num_layers=layers,
              num_decoder_layers=_field(hf, 'num_decoder_layers', layers),
              num_heads=_field(hf, 'num_heads'), head_dim=_field(hf, 'd_kv'),
              emb_dim=_field(hf, 'd_model'), mlp_dim=_field(hf, 'd_ff'), gated=gated,
              activation=activation, tie_embeddings=scales_outputs(hf),
              relative_buckets=buckets, relative_max_distance=distance,
              max_len=_field(hf, 'n_positions', 2048),
              norm_eps=_field(hf, 'layer_norm_epsilon', 1e-6, float),
              dropout_rate=_rate(hf, 'dropout_rate', 0.1))


def _feed_forward_proj(m):
  """transformers' name for our MLP; ConversionError for one it has no name for."""
  for name, kind in FEED_FORWARD.items():
    if kind == (m.gated, m.activation):
      return name
  raise ConversionError(f'model.activation={m.activation!r} has no counterpart in transformers\' '
                        f'T5; use one of {sorted(_ACT_FN)} to convert.')


def hf_config_from_model(m):
  """config.json contents for our `config.model` (parameters stored in m.param_dtype).

  The decoder's start id, pad and end-of-sequence ids are the tokenizer's (research.convert adds
  them). tie_word_embeddings and scale_decoder_outputs both say whether
  the output is tied and scaled, for transformers before and since version 5.
  """
  spec = encoder_decoder.EncoderDecoderSpec.from_config(m)
  proj = _feed_forward_proj(m)
  return dict(model_type='t5', architectures=[ARCHITECTURE], vocab_size=m.vocab_size,
              d_model=m.emb_dim, d_kv=spec.head_dim, d_ff=m.mlp_dim, num_layers=m.num_layers,
              num_decoder_layers=spec.num_decoder_layers, num_heads=m.num_heads,
              relative_attention_num_buckets=m.relative_buckets,
              relative_attention_max_distance=m.relative_max_distance,
              dropout_rate=m.dropout_rate, layer_norm_epsilon=m.norm_eps,
              feed_forward_proj=proj, dense_act_fn=_ACT_FN[m.activation],
              is_gated_act=m.gated, is_encoder_decoder=True,
              tie_word_embeddings=bool(m.tie_embeddings),
              scale_decoder_outputs=bool(m.tie_embeddings), n_positions=m.max_len,
              # `dtype` for transformers 5, `torch_dtype` for older versions.
              dtype=m.param_dtype, torch_dtype=m.param_dtype)


# --- parameters ----------------------------------------------------------------------------

SHARED = 'shared.weight'
LM_HEAD = 'lm_head.weight'


def _linear(hf_name, path, n_in, n_out, kernel=None):
  """torch Linear without bias (weight [out, in]) <-> our DenseGeneral (kernel [in..., out...])."""
  return [(f'{hf_name}.weight', path + ('kernel',), (n_out, n_in), kernel or (n_in, n_out), True)]


def _tensor(hf_name, path, shape):
  return [(hf_name, path, shape, shape, False)]


def _attention(hf_name, ours, spec):
  """T5's q, k, v, o (no biases) <-> our query, key, value, out of `ours`."""
  d, heads, hd = spec.emb_dim, spec.num_heads, spec.head_dim
  entries = []
  for theirs, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
    entries += _linear(f'{hf_name}.{theirs}', (ours, name), d, heads * hd, (d, heads, hd))
  return entries + _linear(f'{hf_name}.o', (ours, 'out'), heads * hd, d, (heads, hd, d))


def _mlp(hf_name, spec):
  d, f = spec.emb_dim, spec.mlp_dim
  if spec.gated:  # act(x wi_0) * (x wi_1): wi_0 is our gate, wi_1 our up.
    entries = (_linear(f'{hf_name}.wi_0', ('mlp', 'gate'), d, f)
               + _linear(f'{hf_name}.wi_1', ('mlp', 'up'), d, f))
  else:
    entries = _linear(f'{hf_name}.wi', ('mlp', 'fc'), d, f)
  return entries + _linear(f'{hf_name}.wo', ('mlp', 'proj'), f, d)


def _block(spec, is_decoder):
  """One block's entries; names hold {i}, paths are inside the block."""
  d = spec.emb_dim
  stack = 'decoder' if is_decoder else 'encoder'
  sublayers = [('SelfAttention', 'attn')] + ([('EncDecAttention', 'cross')] if is_decoder else [])
  entries = []
  for index, (theirs, ours) in enumerate(sublayers):
    entries += (_attention(f'layer.{index}.{theirs}', ours, spec)
                + _tensor(f'layer.{index}.layer_norm.weight', (f'{ours}_norm', 'scale'), (d,)))
  last = len(sublayers)
  entries += (_mlp(f'layer.{last}.DenseReluDense', spec)
              + _tensor(f'layer.{last}.layer_norm.weight', ('mlp_norm', 'scale'), (d,)))
  return [(f'{stack}.block.{{i}}.{name}', *rest) for name, *rest in entries]


def _relative_bias(stack):
  """Only the first block holds the table; every block of the stack uses it."""
  return f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'


def _parameters(m):
  """(model-wide, encoder block, decoder block) lists of (Hugging Face tensor, our parameter
  path, its shape there, our shape, transposed). Block names hold {i}; their paths are inside a
  block of ('encoder' | 'decoder', 'layers')."""
  spec = encoder_decoder.EncoderDecoderSpec.from_config(m)
  d, v = spec.emb_dim, spec.vocab_size
  model = _tensor(SHARED, ('token_embed', 'embedding'), (v, d))
  for stack in ('encoder', 'decoder'):
    model += (_tensor(_relative_bias(stack), (stack, 'relative_bias', 'embedding'),
                      (spec.relative_buckets, spec.num_heads))
              + _tensor(f'{stack}.final_layer_norm.weight', (stack, 'final_norm', 'scale'), (d,)))
  if not spec.tie_embeddings:
    model += [(LM_HEAD, ('lm_head', 'kernel'), (v, d), (d, v), True)]
  return model, _block(spec, False), _block(spec, True)


def _depths(m):
  spec = encoder_decoder.EncoderDecoderSpec.from_config(m)
  return {'encoder': spec.num_layers, 'decoder': spec.num_decoder_layers}


def expected_shapes(names, m):
  """({tensor name: shape} that a Hugging Face checkpoint for our `config.model` holds, and
  {name: shape} of the tensors it may also hold and that are not read: the stacks' tied copies
  of the shared embedding, the cross-attention position table that older exports saved and
  transformers ignores, and lm_head (see the module docstring)."""
  del names  # One naming: nothing to detect.
  model, encoder_block, decoder_block = _parameters(m)
  required = {name: shape for name, _, shape, _, _ in model if name != LM_HEAD}
  for stack, block in (('encoder', encoder_block), ('decoder', decoder_block)):
    required.update({name.format(i=i): shape for i in range(_depths(m)[stack])
                     for name, _, shape, _, _ in block})
  d, v = m.emb_dim, m.vocab_size
  optional = {'encoder.embed_tokens.weight': (v, d), 'decoder.embed_tokens.weight': (v, d),
              LM_HEAD: (v, d),
              'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight':
                  (m.relative_buckets, m.num_heads)}
  return required, optional


def check_tensors(tensors, m):
  """Raises ConversionError naming the first tensor that is missing, unexpected, or of another
  shape than config.json implies (a reshape would fail on it, or silently scramble it), and an
  lm_head of its own where config.json scales the outputs (only a tied output layer does)."""
  check_shapes(tensors, *expected_shapes(tensors, m), 't5')
  if m.tie_embeddings and LM_HEAD in tensors and not np.array_equal(tensors[LM_HEAD],
                                                                    tensors[SHARED]):
    raise ConversionError(f'Hugging Face tensor {LM_HEAD} differs from {SHARED} but config.json '
                          'scales the decoder outputs as only a tied output layer does; set '
                          'scale_decoder_outputs (and tie_word_embeddings) to false in '
                          'config.json if the model was trained untied.')


def params_from_hf(tensors, model_config):
  """Our parameter tree, each stack's blocks stacked on a leading 'layers' axis, from Hugging
  Face tensors (name -> numpy array)."""
  check_tensors(tensors, model_config)  # Before any reshape.
  if not model_config.tie_embeddings and LM_HEAD not in tensors:
    tensors = dict(tensors, **{LM_HEAD: tensors[SHARED]})  # transformers ties it (docstring).
  model, encoder_block, decoder_block = _parameters(model_config)
  params = {}
  for name, path, _, shape, transposed in model:
    _set(params, path, _to_ours(tensors[name], shape, transposed))
  for stack, block in (('encoder', encoder_block), ('decoder', decoder_block)):
    for name, path, _, shape, transposed in block:
      _set(params, (stack, 'layers') + path, np.stack([
          _to_ours(tensors[name.format(i=i)], shape, transposed)
          for i in range(_depths(model_config)[stack])]))
  return _contiguous(params)


def params_to_hf(params, model_config):
  """Hugging Face tensors (name -> numpy array) from our layer-stacked parameters."""
  _feed_forward_proj(model_config)
  model, encoder_block, decoder_block = _parameters(model_config)
  tensors = {}
  for name, path, shape, _, transposed in model:
    tensors[name] = _to_hf(_get(params, path), shape, transposed)
  for stack, block in (('encoder', encoder_block), ('decoder', decoder_block)):
    for name, path, shape, _, transposed in block:
      stacked = _get(params, (stack, 'layers') + path)
      for i in range(_depths(model_config)[stack]):
        tensors[name.format(i=i)] = _to_hf(stacked[i], shape, transposed)
  return _contiguous(tensors)
