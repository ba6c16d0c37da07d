"""Hugging Face <-> our encoder: configs and parameters (numpy) for BERT, RoBERTa and ALBERT.

The rules of research/hf.py hold here too, and its file and error helpers are reused: only
safetensors and JSON, every mapping a pure relabelling, transposition or reshape (so conversions
in either direction are exact), and every incoming tensor's name and shape checked against
config.json before anything is converted.

One table (`_parameters`) lists each Hugging Face tensor beside our parameter, so that the
checks and both directions of the conversion cannot drift apart.
"""

import numpy as np

from research import models
from research.hf import ConversionError
from research.hf import check_shapes
from research.hf import _contiguous
from research.hf import _field
from research.hf import _unsupported

encoder = models.get('encoder')  # The family this module converts.

# transformers class -> (model_type, pooler, pair_head). The ...Model classes have no masked-LM
# head: their configs read, but their weights lack the head that pretraining trains.
ARCHITECTURES = {
    'BertForPreTraining': ('bert', True, 'nsp'),
    'BertForMaskedLM': ('bert', False, 'none'),
    'BertModel': ('bert', True, 'none'),
    'RobertaForMaskedLM': ('roberta', False, 'none'),
    'RobertaModel': ('roberta', True, 'none'),
    'AlbertForPreTraining': ('albert', True, 'sop'),
    'AlbertForMaskedLM': ('albert', False, 'none'),
    'AlbertModel': ('albert', True, 'none'),
}
_HEADLESS = ('BertModel', 'RobertaModel', 'AlbertModel')
# The class a config.json without `architectures` is read as.
_DEFAULT_ARCHITECTURE = {'bert': 'BertForPreTraining', 'roberta': 'RobertaForMaskedLM',
                         'albert': 'AlbertForPreTraining'}
# hidden_act of each style's checkpoints (both of transformers' names for the tanh GELU).
_ACTIVATIONS = {'bert': ('gelu',), 'roberta': ('gelu',),
                'albert': ('gelu_new', 'gelu_pytorch_tanh')}
# transformers' defaults where config.json leaves a field out.
_DEFAULTS = {'bert': dict(dropout=0.1, pad=0), 'roberta': dict(dropout=0.1, pad=1),
             'albert': dict(dropout=0.0, pad=0)}


# --- configs -------------------------------------------------------------------------------

def _same(value, allowed):
  """`value` in `allowed`, where True is not 1 (JSON keeps booleans and numbers apart)."""
  return any(value == a and type(value) is type(a) for a in allowed)


def _architecture(hf):
  """(model_type, pooler, pair_head) of the class config.json names first."""
  kind = hf['model_type']
  names = hf.get('architectures') or [_DEFAULT_ARCHITECTURE[kind]]
  name = names[0] if isinstance(names, list) else names
  if not isinstance(name, str) or ARCHITECTURES.get(name, (None,))[0] != kind:
    _unsupported('architectures', names,
                 [a for a, (model_type, _, _) in ARCHITECTURES.items() if model_type == kind])
  return ARCHITECTURES[name]


def _check_supported(hf):
  """ConversionError naming the first field whose value our encoder does not implement."""
  kind = hf['model_type']
  checks = {'hidden_act': (hf.get('hidden_act', _ACTIVATIONS[kind][0]), _ACTIVATIONS[kind]),
            'position_embedding_type': (hf.get('position_embedding_type', 'absolute'),
                                        ('absolute',)),
            'is_decoder': (hf.get('is_decoder', False), (False,)),
            'add_cross_attention': (hf.get('add_cross_attention', False), (False,)),
            'tie_word_embeddings': (hf.get('tie_word_embeddings', True), (True,))}
  if kind == 'albert':  # One group of one layer: every layer shares its parameters.
    checks.update(num_hidden_groups=(hf.get('num_hidden_groups', 1), (1,)),
                  inner_group_num=(hf.get('inner_group_num', 1), (1,)))
  for field, (value, allowed) in checks.items():
    if not _same(value, allowed):
      _unsupported(field, value, list(allowed))


def _rate(hf, field, default):
  rate = hf.get(field, default)
  if rate is None:
    return default
  if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
    raise ConversionError(f'Hugging Face config field {field}={rate!r} must lie in [0, 1).')
  return float(rate)


def _pad_id(hf, default):
  pad = hf.get('pad_token_id', default)
  if pad is None:
    return default
  if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
    raise ConversionError(f'Hugging Face config field pad_token_id={pad!r} must be a '
                          'non-negative integer.')
  return pad


def model_overrides_from_hf(hf):
  """Our `config.model` fields for a Hugging Face BERT, RoBERTa or ALBERT config.json dict.

  Our dropout_rate is hidden_dropout_prob: our blocks drop out where its dropout layers do, but
  not attention probabilities, so attention_probs_dropout_prob is not read.
  """
  kind = hf.get('model_type')
  if kind not in encoder.STYLES:
    _unsupported('model_type', kind, list(encoder.STYLES))
  _, pooler, pair_head = _architecture(hf)
  _check_supported(hf)
  defaults = _DEFAULTS[kind]
  pad = _pad_id(hf, defaults['pad'])
  positions = _field(hf, 'max_position_embeddings')
  offset = pad + 1 if kind == 'roberta' else 0  # See EncoderSpec.position_offset.
  if positions <= offset:
    raise ConversionError(f'Hugging Face config field max_position_embeddings={positions} leaves '
                          f'no position after the {offset} that RoBERTa skips (pad_token_id + 1).')
  return dict(family='encoder', style=kind, vocab_size=_field(hf, 'vocab_size'),
              num_layers=_field(hf, 'num_hidden_layers'),
              num_heads=_field(hf, 'num_attention_heads'), emb_dim=_field(hf, 'hidden_size'),
              embedding_dim=_field(hf, 'embedding_size', 128) if kind == 'albert' else 0,
              mlp_dim=_field(hf, 'intermediate_size'), max_len=positions - offset,
              type_vocab_size=_field(hf, 'type_vocab_size', 2), pad_id=pad,
              norm_eps=_field(hf, 'layer_norm_eps', 1e-12, float),
              dropout_rate=_rate(hf, 'hidden_dropout_prob', defaults['dropout']),
              share_layers=kind == 'albert', pooler=pooler, pair_head=pair_head)


def _masked_lm_classes(style):
  return [name for name, (kind, _, _) in ARCHITECTURES.items()
          if kind == style and name not in _HEADLESS]


def _check_convertible(m):
  """Settings whose parameters transformers has no names for: ALBERT (one group of one layer)
  always shares its layers, BERT and RoBERTa never do, and RoBERTa has no pair head."""
  if m.share_layers != (m.style == 'albert'):
    raise ConversionError(f'model.share_layers={m.share_layers} has no counterpart in the '
                          f'{m.style} models of transformers; set model.share_layers='
                          f'{m.style == "albert"} to convert.')
  if not _NAMES[m.style]['pair_head'] and m.pair_head != 'none':
    raise ConversionError(f'model.pair_head={m.pair_head!r} has no counterpart in the {m.style} '
                          "models of transformers; set model.pair_head='none' to convert.")


def _export_architecture(m):
  """The transformers class that holds exactly our parameters; ConversionError when none does."""
  _check_convertible(m)
  for name in _masked_lm_classes(m.style):
    if ARCHITECTURES[name] == (m.style, m.pooler, m.pair_head):
      return name
  options = [f'pooler={ARCHITECTURES[name][1]} with pair_head={ARCHITECTURES[name][2]!r}'
             for name in _masked_lm_classes(m.style)]
  raise ConversionError(f'model.pooler={m.pooler} with model.pair_head={m.pair_head!r} matches '
                        f'no {m.style} class of transformers with a masked-LM head; use '
                        f'{" or ".join(options)} to export.')


def hf_config_from_model(m):
  """config.json contents for our `config.model` (parameters stored in m.param_dtype).

  attention_probs_dropout_prob is 0: our model does not drop attention probabilities.
  """
  spec = encoder.EncoderSpec.from_config(m)
  config = dict(model_type=m.style, architectures=[_export_architecture(m)],
                vocab_size=m.vocab_size, hidden_size=m.emb_dim, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
                hidden_act=_ACTIVATIONS[m.style][0], hidden_dropout_prob=m.dropout_rate,
                attention_probs_dropout_prob=0.0, max_position_embeddings=spec.position_rows,
                type_vocab_size=m.type_vocab_size, layer_norm_eps=m.norm_eps,
                pad_token_id=m.pad_id, position_embedding_type='absolute', is_decoder=False,
                add_cross_attention=False, tie_word_embeddings=True,
                # `dtype` for transformers 5, `torch_dtype` for older versions.
                dtype=m.param_dtype, torch_dtype=m.param_dtype)
  if m.style == 'albert':
    config.update(embedding_size=spec.embedding_dim, num_hidden_groups=1, inner_group_num=1,
                  classifier_dropout_prob=0.0)  # Our pair head has no dropout of its own.
  return config


# --- parameters ----------------------------------------------------------------------------

# Hugging Face module names per style. `layer` prefixes each block's modules ({i}: its index;
# ALBERT's one shared block has none).
_NAMES = {
    'bert': dict(
        embeddings='bert.embeddings', layer='bert.encoder.layer.{i}.',
        query='attention.self.query', key='attention.self.key', value='attention.self.value',
        out='attention.output.dense', attn_norm='attention.output.LayerNorm',
        fc='intermediate.dense', proj='output.dense', mlp_norm='output.LayerNorm',
        mlm_transform='cls.predictions.transform.dense',
        mlm_norm='cls.predictions.transform.LayerNorm', mlm_bias='cls.predictions.bias',
        decoder='cls.predictions.decoder', pooler='bert.pooler.dense',
        pair_head='cls.seq_relationship'),
    'roberta': dict(
        embeddings='roberta.embeddings', layer='roberta.encoder.layer.{i}.',
        query='attention.self.query', key='attention.self.key', value='attention.self.value',
        out='attention.output.dense', attn_norm='attention.output.LayerNorm',
        fc='intermediate.dense', proj='output.dense', mlp_norm='output.LayerNorm',
        mlm_transform='lm_head.dense', mlm_norm='lm_head.layer_norm', mlm_bias='lm_head.bias',
        decoder='lm_head.decoder', pooler='roberta.pooler.dense', pair_head=None),
    'albert': dict(
        embeddings='albert.embeddings',
        layer='albert.encoder.albert_layer_groups.0.albert_layers.0.',
        embed_proj='albert.encoder.embedding_hidden_mapping_in',
        query='attention.query', key='attention.key', value='attention.value',
        out='attention.dense', attn_norm='attention.LayerNorm', fc='ffn', proj='ffn_output',
        mlp_norm='full_layer_layer_norm', mlm_transform='predictions.dense',
        mlm_norm='predictions.LayerNorm', mlm_bias='predictions.bias',
        decoder='predictions.decoder', pooler='albert.pooler',
        pair_head='sop_classifier.classifier'),
}


def _linear(hf_name, path, n_in, n_out, kernel=None, bias=None):
  """torch Linear (weight [out, in]) <-> our DenseGeneral (kernel [in..., out...])."""
  return [(f'{hf_name}.weight', path + ('kernel',), (n_out, n_in), kernel or (n_in, n_out), True),
          (f'{hf_name}.bias', path + ('bias',), (n_out,), bias or (n_out,), False)]


def _norm(hf_name, path, n):
  return [(f'{hf_name}.weight', path + ('scale',), (n,), (n,), False),
          (f'{hf_name}.bias', path + ('bias',), (n,), (n,), False)]


def _tensor(hf_name, path, shape):
  return [(hf_name, path, shape, shape, False)]


def _parameters(m):
  """(model-wide, per-block) lists of (Hugging Face tensor, our parameter path, its shape
  there, our shape, transposed). Per-block names hold {i}; their paths are inside a block."""
  spec, names = encoder.EncoderSpec.from_config(m), _NAMES[m.style]
  H, E, F, V = spec.emb_dim, spec.embedding_dim, spec.mlp_dim, spec.vocab_size
  heads, hd = spec.num_heads, spec.head_dim
  emb = names['embeddings']
  model = (_tensor(f'{emb}.word_embeddings.weight', ('token_embed', 'embedding'), (V, E))
           + _tensor(f'{emb}.position_embeddings.weight', ('position_embed', 'embedding'),
                     (spec.position_rows, E))
           + _tensor(f'{emb}.token_type_embeddings.weight', ('type_embed', 'embedding'),
                     (spec.type_vocab_size, E))
           + _norm(f'{emb}.LayerNorm', ('embed_norm',), E))
  if spec.factorised:
    model += _linear(names['embed_proj'], ('embed_proj',), E, H)
  model += (_linear(names['mlm_transform'], ('mlm_transform',), H, E)
            + _norm(names['mlm_norm'], ('mlm_norm',), E)
            + _tensor(names['mlm_bias'], ('mlm_bias', 'bias'), (V,)))
  if spec.pooler:
    model += _linear(names['pooler'], ('pooler',), H, H)
  if spec.pair_head != 'none':
    model += _linear(names['pair_head'], ('pair_head',), H, 2)
  block = (
      [entry for name in ('query', 'key', 'value')
       for entry in _linear(names[name], ('attn', name), H, H, (H, heads, hd), (heads, hd))]
      + _linear(names['out'], ('attn', 'out'), H, H, (heads, hd, H))
      + _norm(names['attn_norm'], ('attn_norm',), H)
      + _linear(names['fc'], ('mlp', 'fc'), H, F) + _linear(names['proj'], ('mlp', 'proj'), F, H)
      + _norm(names['mlp_norm'], ('mlp_norm',), H))
  block = [(names['layer'] + name, *rest) for name, *rest in block]
  return model, block


def _unused(m):
  """{name: shape} of tensors a checkpoint may hold that hold no parameters of ours: position and
  token-type id buffers that older exports saved, the tied copies of the output embedding and
  bias, and a pooler or pair head that our config leaves out (transformers drops them too)."""
  spec, names = encoder.EncoderSpec.from_config(m), _NAMES[m.style]
  H, E, V = spec.emb_dim, spec.embedding_dim, spec.vocab_size
  emb = names['embeddings']
  unused = {f'{emb}.position_ids': (1, spec.position_rows),
            f'{emb}.token_type_ids': (1, spec.position_rows),
            f'{names["decoder"]}.weight': (V, E), f'{names["decoder"]}.bias': (V,)}
  heads = [('pooler', H)] if not spec.pooler else []
  if spec.pair_head == 'none' and names['pair_head']:
    heads.append(('pair_head', 2))
  for head, n_out in heads:
    unused.update({name: shape for name, _, shape, _, _ in _linear(names[head], (), H, n_out)})
  return unused


def expected_shapes(names, m):
  """({tensor name: shape} that a Hugging Face checkpoint for our `config.model` holds, and
  {name: shape} of the tensors it may also hold and that are not read (see _unused))."""
  del names  # One naming per style: unlike GPT-2's optional prefix, nothing to detect.
  _check_convertible(m)
  model, block = _parameters(m)
  spec = encoder.EncoderSpec.from_config(m)
  required = {name: shape for name, _, shape, _, _ in model}
  required.update({name.format(i=i): shape for i in range(spec.param_layers)
                   for name, _, shape, _, _ in block})
  return required, _unused(m)


def _current_names(tensors):
  """Tensors with LayerNorm.gamma/beta (the names of early BERT exports, still on the hub)
  renamed to weight/bias, as transformers renames them when it loads."""
  renamed = {}
  for name, value in tensors.items():
    for old, new in (('LayerNorm.gamma', 'LayerNorm.weight'), ('LayerNorm.beta', 'LayerNorm.bias')):
      if name.endswith(old):
        name = name[:-len(old)] + new
    renamed[name] = value
  return renamed


def check_tensors(tensors, m):
  """Raises ConversionError naming the first tensor that is missing, unexpected, or of another
  shape than config.json implies: a reshape would fail on it, or silently scramble it."""
  tensors = _current_names(tensors)
  head = _NAMES[m.style]['mlm_bias']
  if head not in tensors:  # A headless ...Model checkpoint: say so, not which tensor is first.
    raise ConversionError(f'The Hugging Face weights hold no masked-LM head ({head} and the rest '
                          f'of it); convert a {" or ".join(_masked_lm_classes(m.style))} '
                          'checkpoint.')
  check_shapes(tensors, *expected_shapes(tensors, m), m.style)


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _to_ours(x, shape, transposed):
  return (x.T if transposed else x).reshape(shape)


def _to_hf(x, shape, transposed):
  return x.reshape(shape[::-1]).T if transposed else x.reshape(shape)


def params_from_hf(tensors, model_config):
  """Our parameter tree, blocks stacked on a leading 'layers' axis (of length 1 when shared),
  from Hugging Face tensors (name -> numpy array)."""
  tensors = _current_names(tensors)
  check_tensors(tensors, model_config)  # Before any reshape.
  model, block = _parameters(model_config)
  blocks = encoder.param_layers(model_config)
  params = {}
  for name, path, _, shape, transposed in model:
    _set(params, path, _to_ours(tensors[name], shape, transposed))
  for name, path, _, shape, transposed in block:
    _set(params, ('layers',) + path, np.stack([
        _to_ours(tensors[name.format(i=i)], shape, transposed) for i in range(blocks)]))
  return _contiguous(params)


def params_to_hf(params, model_config):
  """Hugging Face tensors (name -> numpy array) from our layer-stacked parameters."""
  _check_convertible(model_config)
  model, block = _parameters(model_config)
  tensors = {}
  for name, path, shape, _, transposed in model:
    tensors[name] = _to_hf(_get(params, path), shape, transposed)
  for name, path, shape, _, transposed in block:
    stacked = _get(params['layers'], path)
    for i in range(encoder.param_layers(model_config)):
      tensors[name.format(i=i)] = _to_hf(stacked[i], shape, transposed)
  return _contiguous(tensors)
