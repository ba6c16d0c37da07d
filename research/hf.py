"""Hugging Face <-> our decoder: configs and parameters (numpy), for GPT-2 and Llama.

Only safetensors and JSON are read or written (never pickle). Every mapping is a pure
relabelling, transposition or reshape, so conversions in either direction are exact. Incoming
files are checked before any conversion: malformed JSON, missing config fields, unreadable or
misplaced shards, and every tensor's name and shape against those the config implies.
"""

import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

SPECIAL_TOKENS = ('bos_token_id', 'eos_token_id', 'pad_token_id')
# Written by from_hf into our workdir: where the model came from and the special-token ids it came
# with, which our config has no place for. A file of its own, because environment.json is
# rewritten by every training run in the workdir and the ids must survive to to_hf.
SOURCE_FILE = 'huggingface.json'


class ConversionError(ValueError):
  """An unsupported or broken Hugging Face model, named in one sentence."""


def _unsupported(field, value, allowed):
  raise ConversionError(f'Hugging Face config field {field}={value!r} is not supported '
                        f'(supported: {allowed}).')


# --- configs -------------------------------------------------------------------------------

def _field(hf, field, default=None, kind=int):
  """hf[field], checked to be a positive `kind`; `default` when absent or null (None: required)."""
  value = hf.get(field)
  if value is None:
    if default is None:
      raise ConversionError(f'Hugging Face config.json lacks field {field}, which a '
                            f'{hf["model_type"]} model needs; use the complete config.json of '
                            'the model.')
    return default
  number = (int, float) if kind is float else int
  if not isinstance(value, number) or isinstance(value, bool) or value <= 0:
    raise ConversionError(f'Hugging Face config field {field}={value!r} must be a positive '
                          f'{"number" if kind is float else "integer"}.')
  return kind(value)


def _dropout(hf):
  """Our model.dropout_rate from GPT-2's rates (transformers' default 0.1 where absent).

  Our model drops out at the embeddings and on each residual branch, as embd_pdrop and
  resid_pdrop do; it has no dropout of attention probabilities, so attn_pdrop is not read. When
  the two rates differ the residual one is taken: it applies at two places in every layer.
  """
  rates = {field: hf.get(field, 0.1) for field in ('resid_pdrop', 'embd_pdrop')}
  for field, rate in rates.items():
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
      raise ConversionError(f'Hugging Face config field {field}={rate!r} must lie in [0, 1).')
  return float(rates['resid_pdrop'])


def model_overrides_from_hf(hf):
  """Our `config.model` fields for a Hugging Face config.json dict."""
  kind = hf.get('model_type')
  if kind == 'gpt2':
    checks = {'activation_function': (hf.get('activation_function', 'gelu_new'),
                                      ('gelu_new', 'gelu_pytorch_tanh')),
              'scale_attn_weights': (hf.get('scale_attn_weights', True), (True,)),
              'scale_attn_by_inverse_layer_idx': (hf.get('scale_attn_by_inverse_layer_idx', False),
                                                  (False,)),
              'add_cross_attention': (hf.get('add_cross_attention', False), (False,)),
              'tie_word_embeddings': (hf.get('tie_word_embeddings', True), (True,))}
    for field, (value, allowed) in checks.items():
      if value not in allowed:
        _unsupported(field, value, list(allowed))
    width = _field(hf, 'n_embd')
    return dict(style='gpt2', vocab_size=_field(hf, 'vocab_size'), num_layers=_field(hf, 'n_layer'),
                num_heads=_field(hf, 'n_head'), num_kv_heads=0, head_dim=0, emb_dim=width,
                mlp_dim=_field(hf, 'n_inner', 4 * width), max_len=_field(hf, 'n_positions'),
                norm_eps=_field(hf, 'layer_norm_epsilon', 1e-5, float), tie_embeddings=True,
                dropout_rate=_dropout(hf))
  if kind == 'llama':
    rope = hf.get('rope_parameters') or {}
    if not isinstance(rope, dict):
      _unsupported('rope_parameters', rope, ['a dict'])
    rope_type = rope.get('rope_type', 'default')
    if rope_type != 'default':
      _unsupported('rope_parameters.rope_type', rope_type, ['default'])
    if hf.get('rope_scaling'):
      _unsupported('rope_scaling', hf['rope_scaling'], [None])
    for field in ('attention_bias', 'mlp_bias'):
      if hf.get(field, False):
        _unsupported(field, hf[field], [False])
    if hf.get('hidden_act', 'silu') != 'silu':
      _unsupported('hidden_act', hf['hidden_act'], ['silu'])
    if hf.get('pretraining_tp', 1) != 1:
      _unsupported('pretraining_tp', hf['pretraining_tp'], [1])
    heads, width = _field(hf, 'num_attention_heads'), _field(hf, 'hidden_size')
    head_dim = _field(hf, 'head_dim', width // heads)
    return dict(style='llama', vocab_size=_field(hf, 'vocab_size'),
                num_layers=_field(hf, 'num_hidden_layers'), num_heads=heads,
                num_kv_heads=_field(hf, 'num_key_value_heads', heads),
                head_dim=0 if head_dim * heads == width else head_dim, emb_dim=width,
                mlp_dim=_field(hf, 'intermediate_size'),
                max_len=_field(hf, 'max_position_embeddings', 2048),
                rope_theta=_field(rope, 'rope_theta', _field(hf, 'rope_theta', 10000.0, float),
                                  float),
                norm_eps=_field(hf, 'rms_norm_eps', 1e-6, float),
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  raise ConversionError(f'Hugging Face config field model_type={kind!r} is not supported '
                        "(supported: ['gpt2', 'llama']).")


def hf_config_from_model(m):
  """config.json contents for our `config.model` (parameters stored in m.param_dtype)."""
  head_dim = m.head_dim or m.emb_dim // m.num_heads
  # `dtype` for transformers 5, `torch_dtype` for older versions.
  dtype = dict(dtype=m.param_dtype, torch_dtype=m.param_dtype)
  if m.style == 'gpt2':
    # attn_pdrop is 0: our model has no dropout of attention probabilities (see _dropout).
    return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=m.vocab_size,
                n_positions=m.max_len, n_embd=m.emb_dim, n_layer=m.num_layers, n_head=m.num_heads,
                n_inner=m.mlp_dim, activation_function='gelu_new', layer_norm_epsilon=m.norm_eps,
                resid_pdrop=m.dropout_rate, embd_pdrop=m.dropout_rate, attn_pdrop=0.0,
                tie_word_embeddings=True, **dtype)
  return dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=m.vocab_size,
              hidden_size=m.emb_dim, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
              head_dim=head_dim, hidden_act='silu', max_position_embeddings=m.max_len,
              rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
              rope_parameters=dict(rope_type='default', rope_theta=m.rope_theta),
              tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False, mlp_bias=False,
              **dtype)


# --- parameters ----------------------------------------------------------------------------

def expected_shapes(names, m):
  """({tensor name: shape} that a Hugging Face checkpoint for our `config.model` holds, and
  {name: shape} of the tensors it may also hold and that are not read).

  The optional ones hold no parameters of their own: causal-mask and rotary buffers that older
  exports saved, and a copy of a tied output embedding (transformers ties it on load too).
  """
  L, D, F, V = m.num_layers, m.emb_dim, m.mlp_dim, m.vocab_size
  if m.style == 'gpt2':
    prefix = 'transformer.' if any(n.startswith('transformer.') for n in names) else ''
    per_layer = {'ln_1.weight': (D,), 'ln_1.bias': (D,),  # Conv1D weights are [in, out].
                 'attn.c_attn.weight': (D, 3 * D), 'attn.c_attn.bias': (3 * D,),
                 'attn.c_proj.weight': (D, D), 'attn.c_proj.bias': (D,),
                 'ln_2.weight': (D,), 'ln_2.bias': (D,),
                 'mlp.c_fc.weight': (D, F), 'mlp.c_fc.bias': (F,),
                 'mlp.c_proj.weight': (F, D), 'mlp.c_proj.bias': (D,)}
    required = {'wte.weight': (V, D), 'wpe.weight': (m.max_len, D), 'ln_f.weight': (D,),
                'ln_f.bias': (D,)}
    required.update({f'h.{i}.{k}': shape for i in range(L) for k, shape in per_layer.items()})
    optional = {f'h.{i}.attn.{k}': shape for i in range(L)
                for k, shape in (('bias', (1, 1, m.max_len, m.max_len)), ('masked_bias', ()))}
    required, optional = ({prefix + k: v for k, v in d.items()} for d in (required, optional))
    optional['lm_head.weight'] = (V, D)
    return required, optional
  H, KV = m.num_heads, m.num_kv_heads or m.num_heads
  hd = m.head_dim or D // H
  per_layer = {'input_layernorm': (D,), 'post_attention_layernorm': (D,),
               'self_attn.q_proj': (H * hd, D), 'self_attn.k_proj': (KV * hd, D),  # [out, in].
               'self_attn.v_proj': (KV * hd, D), 'self_attn.o_proj': (D, H * hd),
               'mlp.gate_proj': (F, D), 'mlp.up_proj': (F, D), 'mlp.down_proj': (D, F)}
  required = {'model.embed_tokens.weight': (V, D), 'model.norm.weight': (D,)}
  required.update({f'model.layers.{i}.{k}.weight': shape for i in range(L)
                   for k, shape in per_layer.items()})
  optional = {f'model.layers.{i}.self_attn.rotary_emb.inv_freq': (hd // 2,) for i in range(L)}
  (optional if m.tie_embeddings else required)['lm_head.weight'] = (V, D)
  return required, optional


def check_tensors(tensors, m):
  """Raises ConversionError naming the first tensor that is missing, unexpected, or of another
  shape than config.json implies: a reshape would fail on it, or silently scramble it."""
  check_shapes(tensors, *expected_shapes(tensors, m), m.style)


def check_shapes(tensors, required, optional, style):
  """The check behind every family's check_tensors: each required tensor present, none
  unknown, each of the shape config.json implies."""
  missing = sorted(set(required) - set(tensors))
  if missing:
    raise ConversionError(f'The Hugging Face weights lack tensor {missing[0]}; use the config.json '
                          'the weights were saved with.')
  for name in sorted(tensors):
    want = required.get(name, optional.get(name))
    if want is None:
      raise ConversionError(f'The Hugging Face weights hold tensor {name}, which a {style} '
                            'model of this config.json does not have; use the config.json the '
                            'weights were saved with.')
    if tuple(tensors[name].shape) != want:
      raise ConversionError(f'Hugging Face tensor {name} has shape {list(tensors[name].shape)} '
                            f'but config.json implies {list(want)}; use the config.json and '
                            'weights of one model, saved by transformers.')


def _gpt2_from_hf(w, m):
  w = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in w.items()}
  L, D, H = m.num_layers, m.emb_dim, m.num_heads
  hd = D // H
  stack = lambda name: np.stack([w[f'h.{i}.{name}'] for i in range(L)])
  qkv = np.split(stack('attn.c_attn.weight'), 3, -1)
  qkv_bias = np.split(stack('attn.c_attn.bias'), 3, -1)
  heads = lambda x: x.reshape(x.shape[:-1] + (H, hd))
  dense = lambda name, kernel=None: dict(
      kernel=stack(f'{name}.weight') if kernel is None else kernel, bias=stack(f'{name}.bias'))
  norm = lambda name: dict(scale=stack(f'{name}.weight'), bias=stack(f'{name}.bias'))
  return {
      'token_embed': {'embedding': w['wte.weight']},
      'position_embed': {'embedding': w['wpe.weight']},
      'layers': {
          'attn_norm': norm('ln_1'),
          'attn': {'query': dict(kernel=heads(qkv[0]), bias=heads(qkv_bias[0])),
                   'key': dict(kernel=heads(qkv[1]), bias=heads(qkv_bias[1])),
                   'value': dict(kernel=heads(qkv[2]), bias=heads(qkv_bias[2])),
                   'out': dense('attn.c_proj', stack('attn.c_proj.weight').reshape(L, H, hd, D))},
          'mlp_norm': norm('ln_2'),
          'mlp': {'fc': dense('mlp.c_fc'), 'proj': dense('mlp.c_proj')},
      },
      'final_norm': {'scale': w['ln_f.weight'], 'bias': w['ln_f.bias']},
  }


def _gpt2_to_hf(p, m):
  L, D = m.num_layers, m.emb_dim
  layers, w = p['layers'], {}
  w['transformer.wte.weight'] = p['token_embed']['embedding']
  w['transformer.wpe.weight'] = p['position_embed']['embedding']
  attn = layers['attn']
  qkv = np.concatenate([attn[n]['kernel'].reshape(L, D, D) for n in ('query', 'key', 'value')], -1)
  qkv_bias = np.concatenate([attn[n]['bias'].reshape(L, D) for n in ('query', 'key', 'value')], -1)
  per_layer = {
      'ln_1.weight': layers['attn_norm']['scale'], 'ln_1.bias': layers['attn_norm']['bias'],
      'attn.c_attn.weight': qkv, 'attn.c_attn.bias': qkv_bias,
      'attn.c_proj.weight': attn['out']['kernel'].reshape(L, D, D),
      'attn.c_proj.bias': attn['out']['bias'],
      'ln_2.weight': layers['mlp_norm']['scale'], 'ln_2.bias': layers['mlp_norm']['bias'],
      'mlp.c_fc.weight': layers['mlp']['fc']['kernel'],
      'mlp.c_fc.bias': layers['mlp']['fc']['bias'],
      'mlp.c_proj.weight': layers['mlp']['proj']['kernel'],
      'mlp.c_proj.bias': layers['mlp']['proj']['bias']}
  for name, stacked in per_layer.items():
    for i in range(L):
      w[f'transformer.h.{i}.{name}'] = stacked[i]
  w['transformer.ln_f.weight'] = p['final_norm']['scale']
  w['transformer.ln_f.bias'] = p['final_norm']['bias']
  return w


def _llama_from_hf(w, m):
  L, D, H = m.num_layers, m.emb_dim, m.num_heads
  KV, hd = m.num_kv_heads or H, m.head_dim or D // H
  stack = lambda name: np.stack([w[f'model.layers.{i}.{name}.weight'] for i in range(L)])
  t = lambda x: np.swapaxes(x, -1, -2)  # torch Linear stores [out, in].
  params = {
      'token_embed': {'embedding': w['model.embed_tokens.weight']},
      'layers': {
          'attn_norm': {'scale': stack('input_layernorm')},
          'attn': {'query': {'kernel': t(stack('self_attn.q_proj')).reshape(L, D, H, hd)},
                   'key': {'kernel': t(stack('self_attn.k_proj')).reshape(L, D, KV, hd)},
                   'value': {'kernel': t(stack('self_attn.v_proj')).reshape(L, D, KV, hd)},
                   'out': {'kernel': t(stack('self_attn.o_proj')).reshape(L, H, hd, D)}},
          'mlp_norm': {'scale': stack('post_attention_layernorm')},
          'mlp': {'gate': {'kernel': t(stack('mlp.gate_proj'))},
                  'up': {'kernel': t(stack('mlp.up_proj'))},
                  'proj': {'kernel': t(stack('mlp.down_proj'))}},
      },
      'final_norm': {'scale': w['model.norm.weight']},
  }
  if not m.tie_embeddings:
    params['lm_head'] = {'kernel': w['lm_head.weight'].T}
  return params


def _llama_to_hf(p, m):
  L, D, H = m.num_layers, m.emb_dim, m.num_heads
  KV, hd = m.num_kv_heads or H, m.head_dim or D // H
  layers, t = p['layers'], lambda x: np.swapaxes(x, -1, -2)
  attn, mlp = layers['attn'], layers['mlp']
  per_layer = {
      'input_layernorm': layers['attn_norm']['scale'],
      'self_attn.q_proj': t(attn['query']['kernel'].reshape(L, D, H * hd)),
      'self_attn.k_proj': t(attn['key']['kernel'].reshape(L, D, KV * hd)),
      'self_attn.v_proj': t(attn['value']['kernel'].reshape(L, D, KV * hd)),
      'self_attn.o_proj': t(attn['out']['kernel'].reshape(L, H * hd, D)),
      'post_attention_layernorm': layers['mlp_norm']['scale'],
      'mlp.gate_proj': t(mlp['gate']['kernel']), 'mlp.up_proj': t(mlp['up']['kernel']),
      'mlp.down_proj': t(mlp['proj']['kernel'])}
  w = {'model.embed_tokens.weight': p['token_embed']['embedding'],
       'model.norm.weight': p['final_norm']['scale']}
  for name, stacked in per_layer.items():
    for i in range(L):
      w[f'model.layers.{i}.{name}.weight'] = stacked[i]
  if not m.tie_embeddings:
    w['lm_head.weight'] = p['lm_head']['kernel'].T
  return w


def params_from_hf(weights, model_config):
  """Our (layer-stacked) parameter tree from Hugging Face tensors (name -> numpy array)."""
  check_tensors(weights, model_config)  # Before any reshape.
  convert = _gpt2_from_hf if model_config.style == 'gpt2' else _llama_from_hf
  return _contiguous(convert(weights, model_config))


def params_to_hf(params, model_config):
  """Hugging Face tensors (name -> numpy array) from our (layer-stacked) parameters."""
  convert = _gpt2_to_hf if model_config.style == 'gpt2' else _llama_to_hf
  return _contiguous(convert(params, model_config))


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)


# --- files ---------------------------------------------------------------------------------

def _first_line(error):
  return str(error).strip().split('\n')[0].rstrip('.')


def read_json(path):
  """A JSON object from `path`; a missing, unreadable or malformed file raises one sentence."""
  try:
    with open(path) as f:
      value = json.load(f)
  except OSError as error:
    raise ConversionError(f'{path} cannot be read ({error.strerror}); make it a readable '
                          'file.') from None
  except ValueError as error:  # Malformed JSON or not UTF-8.
    raise ConversionError(f'{path} is not valid JSON ({_first_line(error)}); repair it or '
                          'download it again.') from None
  if not isinstance(value, dict):
    raise ConversionError(f'{path} holds a JSON {type(value).__name__}, not an object; repair it '
                          'or download it again.')
  return value


def _shard_files(model_dir):
  """The safetensors files of `model_dir`, as transformers picks them (a single file first)."""
  if os.path.isfile(os.path.join(model_dir, 'model.safetensors')):
    return ['model.safetensors']
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if not os.path.exists(index):
    raise ConversionError(f'{model_dir} has no model.safetensors; only safetensors weights are '
                          'read (never pickle): convert the weights to safetensors first.')
  weight_map = read_json(index).get('weight_map')
  if not (isinstance(weight_map, dict) and weight_map
          and all(isinstance(v, str) for v in weight_map.values())):
    raise ConversionError(f'{index} has no weight_map from tensor names to shard files; download '
                          'it again.')
  files = sorted(set(weight_map.values()))
  for name in files:
    # Checked by name, not by resolved path: a hub cache links its files to blobs elsewhere.
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] in ('.', '..'):
      raise ConversionError(f'{index} names shard {name!r} outside {model_dir}; shard names must '
                            'be paths inside the model directory.')
    if not os.path.isfile(os.path.join(model_dir, name)):
      raise ConversionError(f'{index} names shard {name}, which is missing from {model_dir}; '
                            'download it.')
  return files


def read_model_dir(model_dir):
  """(config dict, tensors) from a Hugging Face model directory (safetensors only)."""
  if not os.path.isdir(model_dir):
    raise ConversionError(f'{model_dir} is not a directory; pass a Hugging Face model directory '
                          '(config.json and safetensors weights).')
  config_path = os.path.join(model_dir, 'config.json')
  if not os.path.exists(config_path):
    raise ConversionError(f'{model_dir} has no config.json; pass a Hugging Face model directory.')
  config = read_json(config_path)
  tensors = {}
  for name in _shard_files(model_dir):
    path = os.path.join(model_dir, name)
    try:
      shard = load_file(path)
    except (SafetensorError, OSError) as error:
      raise ConversionError(f'{path} is not a readable safetensors file ({_first_line(error)}); '
                            'download it again.') from None
    twice = sorted(set(shard) & set(tensors))
    if twice:
      raise ConversionError(f'Tensor {twice[0]} is stored twice, the second time in {path}; '
                            'download the model again.')
    tensors.update(shard)
  return config, tensors


def read_generation_config(model_dir):
  """generation_config.json of `model_dir` as a dict, or None when there is none."""
  path = os.path.join(model_dir, 'generation_config.json')
  return read_json(path) if os.path.exists(path) else None


def write_model_dir(out_dir, config, tensors, generation_config=None):
  """config.json, model.safetensors and, for models that generate text, generation_config.json."""
  os.makedirs(out_dir, exist_ok=True)
  for name, value in (('config.json', config), ('generation_config.json', generation_config)):
    if value is None:
      continue
    with open(os.path.join(out_dir, name), 'w') as f:
      json.dump(value, f, indent=2, sort_keys=True)
  path = os.path.join(out_dir, 'model.safetensors')
  save_file(tensors, path, metadata={'format': 'pt'})
  # safetensors creates its file private (0600); give it the permissions of the other files.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def write_source(workdir, model_dir, config, generation_config):
  """Records in our workdir where a model came from and its special-token ids (SOURCE_FILE)."""
  source = dict(model_dir=os.path.abspath(model_dir),
                special_tokens={k: config.get(k) for k in SPECIAL_TOKENS},
                generation_config=generation_config)
  with open(os.path.join(workdir, SOURCE_FILE), 'w') as f:
    json.dump(source, f, indent=2, sort_keys=True)


def read_source(workdir):
  """What write_source recorded in `workdir`, or None for a workdir not converted by from_hf."""
  path = os.path.join(workdir, SOURCE_FILE)
  return read_json(path) if os.path.exists(path) else None
