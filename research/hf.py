"""Hugging Face <-> our decoder: configs and parameters (numpy), for GPT-2 and Llama.

Only safetensors and config.json are read or written (never pickle). Every mapping is a pure
relabelling, transposition or reshape, so conversions in either direction are exact.
"""

import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file


class ConversionError(ValueError):
  """An unsupported Hugging Face configuration, named in one sentence."""


def _unsupported(field, value, allowed):
  raise ConversionError(f'Hugging Face config field {field}={value!r} is not supported '
                        f'(supported: {allowed}).')


# --- configs -------------------------------------------------------------------------------

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
    width = hf['n_embd']
    return dict(style='gpt2', vocab_size=hf['vocab_size'], num_layers=hf['n_layer'],
                num_heads=hf['n_head'], num_kv_heads=0, head_dim=0, emb_dim=width,
                mlp_dim=hf.get('n_inner') or 4 * width, max_len=hf['n_positions'],
                norm_eps=hf.get('layer_norm_epsilon', 1e-5), tie_embeddings=True)
  if kind == 'llama':
    rope = hf.get('rope_parameters') or {}
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
    heads = hf['num_attention_heads']
    head_dim = hf.get('head_dim') or hf['hidden_size'] // heads
    return dict(style='llama', vocab_size=hf['vocab_size'], num_layers=hf['num_hidden_layers'],
                num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
                head_dim=0 if head_dim * heads == hf['hidden_size'] else head_dim,
                emb_dim=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
                max_len=hf.get('max_position_embeddings', 2048),
                rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
                norm_eps=hf.get('rms_norm_eps', 1e-6),
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)))
  raise ConversionError(f'Hugging Face config field model_type={kind!r} is not supported '
                        "(supported: ['gpt2', 'llama']).")


def hf_config_from_model(m):
  """config.json contents for our `config.model`."""
  head_dim = m.head_dim or m.emb_dim // m.num_heads
  if m.style == 'gpt2':
    return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=m.vocab_size,
                n_positions=m.max_len, n_embd=m.emb_dim, n_layer=m.num_layers, n_head=m.num_heads,
                n_inner=m.mlp_dim, activation_function='gelu_new', layer_norm_epsilon=m.norm_eps,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                torch_dtype='float32')
  return dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=m.vocab_size,
              hidden_size=m.emb_dim, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
              head_dim=head_dim, hidden_act='silu', max_position_embeddings=m.max_len,
              rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
              rope_parameters=dict(rope_type='default', rope_theta=m.rope_theta),
              tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False, mlp_bias=False,
              torch_dtype='float32')


# --- parameters ----------------------------------------------------------------------------

def _gpt2_from_hf(w, m):
  w = {k[len('transformer.'):] if k.startswith('transformer.') else k: v for k, v in w.items()}
  L, D, H = m.num_layers, m.emb_dim, m.num_heads
  hd = D // H
  stack = lambda name: np.stack([w[f'h.{i}.{name}'] for i in range(L)])
  qkv, qkv_bias = np.split(stack('attn.c_attn.weight'), 3, -1), np.split(stack('attn.c_attn.bias'), 3, -1)
  heads = lambda x: x.reshape(x.shape[:-1] + (H, hd))
  dense = lambda name, kernel=None: dict(kernel=stack(f'{name}.weight') if kernel is None else kernel,
                                         bias=stack(f'{name}.bias'))
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
      'mlp.c_fc.weight': layers['mlp']['fc']['kernel'], 'mlp.c_fc.bias': layers['mlp']['fc']['bias'],
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
  convert = _gpt2_from_hf if model_config.style == 'gpt2' else _llama_from_hf
  try:
    params = convert(weights, model_config)
  except KeyError as missing:
    raise ConversionError(f'The Hugging Face weights lack tensor {missing.args[0]}; they do not '
                          'match their config.json.') from None
  return _contiguous(params)


def params_to_hf(params, model_config):
  """Hugging Face tensors (name -> numpy array) from our (layer-stacked) parameters."""
  convert = _gpt2_to_hf if model_config.style == 'gpt2' else _llama_to_hf
  return _contiguous(convert(params, model_config))


def _contiguous(tree):
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)


def stack_layers(params, num_layers):
  """layers_0..layers_{L-1} (model.scan_layers=False) -> one 'layers' subtree stacked on axis 0."""
  if 'layers' in params:
    return params
  rest = {k: v for k, v in params.items() if not k.startswith('layers_')}
  per_layer = [params[f'layers_{i}'] for i in range(num_layers)]
  rest['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return rest


def unstack_layers(params, num_layers):
  rest = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    rest[f'layers_{i}'] = jax.tree.map(lambda x: x[i], params['layers'])
  return rest


# --- files ---------------------------------------------------------------------------------

def read_model_dir(model_dir):
  """(config dict, tensors) from a Hugging Face model directory (safetensors only)."""
  config_path = os.path.join(model_dir, 'config.json')
  if not os.path.exists(config_path):
    raise ConversionError(f'{model_dir} has no config.json; pass a Hugging Face model directory.')
  with open(config_path) as f:
    config = json.load(f)
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif os.path.exists(os.path.join(model_dir, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise ConversionError(f'{model_dir} has no model.safetensors; only safetensors weights are '
                          'read (never pickle): convert the weights to safetensors first.')
  tensors = {}
  for name in files:
    tensors.update(load_file(os.path.join(model_dir, name)))
  return config, tensors


def write_model_dir(out_dir, config, tensors):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
