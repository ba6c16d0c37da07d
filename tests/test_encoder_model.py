"""The encoder family: parity with transformers' BERT, RoBERTa and ALBERT, exact conversions,
parameter counts, packing isolation, and the checks that name what to change."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

import runs
from research import hf
from research import hf_encoder
from research import layout
from research import mesh as mesh_lib
from research import models
from research import partitioning
from research.models import encoder

VOCAB, LENGTH = 101, 16


def _model_config(**overrides):
  """A complete `config.model` for the encoder (BERT-base sizes unless overridden)."""
  config = ml_collections.ConfigDict(dict(
      family='encoder', style='bert', num_layers=12, num_heads=12, emb_dim=768, embedding_dim=0,
      mlp_dim=3072, vocab_size=30522, max_len=512, type_vocab_size=2, pad_id=0, norm_eps=1e-12,
      dropout_rate=0.0, dtype='float32', param_dtype='float32', scan_layers=True, remat='none',
      attention='explicit', share_layers=False, pooler=True, pair_head='nsp', num_labels=0))
  config.update(overrides)
  return config


def _from_hf(hf_config, **overrides):
  return _model_config(**dict(hf_encoder.model_overrides_from_hf(hf_config), **overrides))


# --- parity with transformers ----------------------------------------------------------------

HF_MODELS = {
    'bert': lambda: transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=24, type_vocab_size=2)),
    'roberta': lambda: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=24 + 2, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5)),
    # E != H, and three applications of the shared block.
    'albert': lambda: transformers.AlbertForPreTraining(transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=24, hidden_size=64, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=96, max_position_embeddings=24)),
}


@pytest.fixture(scope='module', params=sorted(HF_MODELS))
def hf_model(request):
  """(style, torch model in eval mode, its tensors as numpy)."""
  torch.manual_seed(0)
  model = HF_MODELS[request.param]().eval()
  with torch.no_grad():  # Non-trivial norms and biases, so that every tensor matters.
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return request.param, model, tensors


def _padded_batch(style, pad_id):
  """Right-padded rows with sentence A and B (one token type for RoBERTa)."""
  rng = np.random.default_rng(0)
  lengths = np.array([LENGTH, 11, 6])
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
  tokens = np.where(mask, rng.integers(3, VOCAB, (3, LENGTH)), pad_id)
  types = np.zeros_like(tokens)
  if style != 'roberta':
    types = ((np.arange(LENGTH)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(np.int64)
  return tokens, mask, types, lengths


def _torch_outputs(style, model, tokens, mask, types):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  logits = out.logits if style == 'roberta' else out.prediction_logits
  pair = {'bert': 'seq_relationship_logits', 'albert': 'sop_logits'}.get(style)
  return (out.hidden_states[-1].numpy(), logits.numpy(),
          None if pair is None else getattr(out, pair).numpy())


def _our_outputs(model, params, tokens, mask, types):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  args = [jnp.asarray(x, jnp.int32) for x in (tokens, positions, mask, types)]
  return model.apply({'params': params}, *args, method='initialize')


@pytest.mark.parametrize('attention', ['explicit', 'xla'])
def test_outputs_match_transformers_on_a_padded_batch(hf_model, attention):
  style, torch_model, tensors = hf_model
  config = _from_hf(torch_model.config.to_dict(), attention=attention)
  params = hf_encoder.params_from_hf(tensors, config)
  tokens, mask, types, lengths = _padded_batch(style, config.pad_id)
  want_hidden, want_logits, want_pair = _torch_outputs(style, torch_model, tokens, mask, types)
  got = _our_outputs(encoder.build(config), params, tokens, mask, types)
  assert got['hidden'].dtype == jnp.float32 and got['mlm_logits'].dtype == jnp.float32
  for row, length in enumerate(lengths):  # Padding positions are not compared.
    np.testing.assert_allclose(got['hidden'][row, :length], want_hidden[row, :length], atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(got['mlm_logits'][row, :length], want_logits[row, :length],
                               atol=1e-5, rtol=0)
  assert ('pair_logits' in got) == (want_pair is not None)
  if want_pair is not None:
    np.testing.assert_allclose(got['pair_logits'], want_pair, atol=1e-5, rtol=0)


def test_conversion_round_trips_bitwise(hf_model):
  style, torch_model, tensors = hf_model
  config = _from_hf(torch_model.config.to_dict())
  back = hf_encoder.params_to_hf(hf_encoder.params_from_hf(tensors, config), config)
  _, optional = hf_encoder.expected_shapes(tensors, config)
  assert set(back) == set(tensors) - set(optional)  # Only tied copies are left out.
  for name, value in back.items():
    assert value.dtype == tensors[name].dtype and value.flags.c_contiguous, name
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_exported_directory_loads_in_transformers(hf_model, tmp_path):
  style, torch_model, tensors = hf_model
  config = _from_hf(torch_model.config.to_dict())
  params = hf_encoder.params_from_hf(tensors, config)
  hf_config = hf_encoder.hf_config_from_model(config)
  hf.write_model_dir(str(tmp_path), hf_config, hf_encoder.params_to_hf(params, config), {})
  loaded = getattr(transformers, hf_config['architectures'][0]).from_pretrained(str(tmp_path))
  assert type(loaded) is type(torch_model)
  tokens, mask, types, _ = _padded_batch(style, config.pad_id)
  for got, want in zip(_torch_outputs(style, loaded.eval(), tokens, mask, types),
                       _torch_outputs(style, torch_model, tokens, mask, types)):
    np.testing.assert_array_equal(got, want)
  assert hf_encoder.model_overrides_from_hf(hf_config) == hf_encoder.model_overrides_from_hf(
      torch_model.config.to_dict())


# --- our model on its own ----------------------------------------------------------------------

TINY = {
    'bert': dict(),
    'roberta': dict(style='roberta', type_vocab_size=1, pad_id=1, pooler=False, pair_head='none'),
    'albert': dict(style='albert', embedding_dim=24, share_layers=True, pair_head='sop'),
}


def _tiny(style, **overrides):
  sizes = dict(num_layers=3, num_heads=4, emb_dim=32, mlp_dim=48, vocab_size=VOCAB, max_len=32)
  return _model_config(**dict(sizes, **TINY[style], **overrides))


_INITIALISED = {}


def _tiny_model(style):
  """(model, params) of _tiny(style), initialised once per test session."""
  if style not in _INITIALISED:
    _INITIALISED[style] = _init(_tiny(style))
  return _INITIALISED[style]


def _init(config):
  model = encoder.build(config)
  init = jax.jit(lambda: model.init(jax.random.key(1), **encoder.init_inputs(8),
                                    method='initialize'))
  return model, jax.tree.map(np.asarray, nn.meta.unbox(init()['params']))


@pytest.mark.parametrize('style', sorted(TINY))
def test_packed_rows_equal_documents_run_separately(style):
  model, params = _tiny_model(style)
  run = jax.jit(lambda *args: model.apply({'params': params}, *args))
  rng = np.random.default_rng(1)
  lengths = (9, 13)
  docs = [rng.integers(3, VOCAB, n) for n in lengths]
  types = [np.arange(n) >= n // 2 if style != 'roberta' else np.zeros(n) for n in lengths]
  pad = 4  # Padding positions at the end of the row.
  packed = run(
      jnp.asarray(np.concatenate(docs + [np.zeros(pad)])[None], jnp.int32),
      jnp.asarray(np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)])[None],
                  jnp.int32),
      jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                                 + [np.zeros(pad)])[None], jnp.int32),
      jnp.asarray(np.concatenate(types + [np.zeros(pad)])[None], jnp.int32))
  start = 0
  for doc, doc_types in zip(docs, types):
    alone = run(jnp.asarray(doc[None], jnp.int32), None, None,
                jnp.asarray(doc_types[None], jnp.int32))
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone[0], atol=1e-5, rtol=0)
    start += len(doc)


@pytest.mark.parametrize('style', ['bert', 'albert'])
def test_unscanned_rematerialised_layers_equal_scanned_ones(style):
  """layers_0.. (research/layout.py, with param_layers) compute the
  same values and gradients as the scanned stack."""
  config = _tiny(style)
  model, params = _tiny_model(style)
  unscanned_config = _tiny(style, scan_layers=False, remat='full')
  unscanned = layout.unstack(params)
  assert set(unscanned) - set(params) == {f'layers_{i}' for i in
                                          range(encoder.param_layers(config))}
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 12)), jnp.int32)

  def loss(model, params):
    return jnp.sum(jnp.tanh(model.apply({'params': params}, tokens)))

  gradient = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  value, grads = gradient(model, params)
  other_value, other_grads = gradient(encoder.build(unscanned_config), unscanned)
  np.testing.assert_allclose(other_value, value, rtol=1e-5)
  other_grads = layout.stack(jax.tree.map(np.asarray, other_grads))
  for got, want in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('style,mesh_shape', [
    ('bert', dict(data=2, fsdp=2, tensor=2)), ('albert', dict(data=2, fsdp=2, tensor=2)),
    ('bert', dict(data=2, sequence=2, tensor=2))])
def test_sharded_outputs_equal_one_device(style, mesh_shape):
  """Parameters placed by their logical axes on a data x fsdp x (sequence x) tensor mesh,
  activations constrained by theirs: the same outputs as on one device."""
  config = _tiny(style)
  model, params = _tiny_model(style)
  mesh = mesh_lib.make_mesh(mesh_shape, jax.devices()[:8])
  sharded_model = encoder.build(config, sharding=partitioning.ActivationSharding(mesh))
  boxed = jax.eval_shape(lambda: sharded_model.init(
      jax.random.key(1), **encoder.init_inputs(8), method='initialize'))['params']
  placed = jax.device_put(params, partitioning.tree_shardings(boxed, mesh))
  assert tuple(placed['layers']['attn']['query']['kernel'].sharding.spec) == (
      None, 'fsdp', 'tensor', None)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (4, 12)), jnp.int32)
  run = lambda model, params: jax.jit(lambda t: model.apply(
      {'params': params}, t, method='initialize'))(tokens)
  sharded = run(sharded_model, placed)
  for name, want in run(model, params).items():
    np.testing.assert_allclose(sharded[name], want, atol=2e-5, rtol=0, err_msg=name)
  # Hidden states really are split along the sequence when the mesh has a sequence axis.
  spec = tuple(sharded['hidden'].sharding.spec) + (None,) * 3
  assert spec[1] == ('sequence' if mesh_shape.get('sequence') else None)


def test_dropout_is_on_only_when_not_deterministic():
  config = _tiny('bert', dropout_rate=0.1)
  _, params = _init(config)
  tokens = jnp.ones((2, 8), jnp.int32)
  spec = encoder.spec_from_config(config)

  def run(deterministic, seed):
    model = encoder.Encoder(spec, deterministic=deterministic)
    return jax.jit(model.apply)({'params': params}, tokens, rngs={'dropout': jax.random.key(seed)})

  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_mlm_logits_take_any_leading_shape():
  model, params = _tiny_model('albert')
  hidden = jnp.asarray(np.random.default_rng(3).standard_normal((5, 32)), jnp.float32)
  logits = jax.jit(lambda h: model.apply({'params': params}, h, method='mlm_logits'))
  flat = logits(hidden)
  assert flat.shape == (5, VOCAB) and flat.dtype == jnp.float32
  grid = logits(hidden.reshape(1, 5, 32))
  np.testing.assert_allclose(grid[0], flat, atol=1e-6, rtol=0)


def test_bfloat16_hidden_states_and_float32_logits():
  model, params = _init(_tiny('bert', dtype='bfloat16'))
  out = jax.jit(lambda tokens: model.apply({'params': params}, tokens, method='initialize'))(
      jnp.ones((2, 8), jnp.int32))
  assert out['hidden'].dtype == jnp.bfloat16
  assert out['mlm_logits'].dtype == jnp.float32 and out['pair_logits'].dtype == jnp.float32


# --- parameter counts and FLOPs ------------------------------------------------------------------

LARGE = dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
             intermediate_size=4096)
PUBLISHED = [  # (name, transformers class, config, millions of parameters)
    ('bert-base', 'BertForPreTraining', lambda: transformers.BertConfig(), 110.1),
    ('bert-large', 'BertForPreTraining', lambda: transformers.BertConfig(**LARGE), 336.2),
    ('roberta-base', 'RobertaForMaskedLM', lambda: transformers.RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5), 124.7),
    ('roberta-large', 'RobertaForMaskedLM', lambda: transformers.RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        layer_norm_eps=1e-5, **LARGE), 355.4),
    ('albert-base', 'AlbertForPreTraining', lambda: transformers.AlbertConfig(
        vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072), 11.8),
    ('albert-large', 'AlbertForPreTraining', lambda: transformers.AlbertConfig(
        vocab_size=30000, embedding_size=128, **LARGE), 17.8),
    ('albert-xxlarge', 'AlbertForPreTraining', lambda: transformers.AlbertConfig(
        vocab_size=30000, embedding_size=128, hidden_size=4096, num_hidden_layers=12,
        num_attention_heads=64, intermediate_size=16384), 223.2),
]


@pytest.mark.parametrize('name, architecture, make_config, millions', PUBLISHED,
                         ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_equal_transformers(name, architecture, make_config, millions):
  hf_config = make_config()
  with torch.device('meta'):  # Shapes only, no memory.
    torch_model = getattr(transformers, architecture)(hf_config)
  want = sum(p.numel() for p in torch_model.parameters())  # Tied weights once.
  hf_dict = dict(hf_config.to_dict(), architectures=[architecture])
  assert models.count_params(encoder, _from_hf(hf_dict)) == want
  assert round(want / 1e6, 1) == millions


def test_albert_holds_one_block():
  config = _from_hf(transformers.AlbertConfig(vocab_size=30000).to_dict())
  params = models.abstract_params(encoder, config)
  assert config.num_layers == 12 and encoder.param_layers(config) == 1
  assert all(x.shape[0] == 1 for x in jax.tree.leaves(params['layers']))
  unscanned = models.abstract_params(encoder, _model_config(**dict(config, scan_layers=False)))
  assert [k for k in unscanned if k.startswith('layers')] == ['layers_0']


@pytest.mark.parametrize('style', sorted(TINY))
def test_flops_count_every_applied_weight(style):
  config = _tiny(style)
  spec, params = encoder.spec_from_config(config), models.abstract_params(encoder, config)
  applications = spec.num_layers // spec.param_layers
  weights = (applications * runs.kernel_size(params['layers'])
             + runs.kernel_size(params.get('embed_proj')))
  seq_len = 20
  assert encoder.body_flops_per_token(spec, seq_len) == (
      6 * weights + 12 * spec.num_layers * seq_len * spec.emb_dim)  # Full attention.
  head = (runs.kernel_size(params['mlm_transform'])
          + math.prod(params['token_embed']['embedding'].shape))
  assert encoder.mlm_head_flops_per_position(spec) == 6 * head
  assert encoder.pair_head_flops_per_example(spec) == 6 * (
      runs.kernel_size(params.get('pooler')) + runs.kernel_size(params.get('pair_head')))


# --- checks that name what to change -------------------------------------------------------------

def _one_sentence(error):
  message = str(error.value)
  assert message.endswith('.') and '\n' not in message, message
  return message


@pytest.mark.parametrize('field, value, make_config', [
    ('hidden_act', 'relu', lambda: transformers.BertConfig(hidden_act='relu')),
    ('num_hidden_groups', 2, lambda: transformers.AlbertConfig(num_hidden_groups=2)),
    ('inner_group_num', 2, lambda: transformers.AlbertConfig(inner_group_num=2)),
    ('is_decoder', True, lambda: transformers.RobertaConfig(is_decoder=True)),
])
def test_unsupported_hf_fields_are_named(field, value, make_config):
  with pytest.raises(hf.ConversionError) as error:
    hf_encoder.model_overrides_from_hf(make_config().to_dict())
  assert f'{field}={value!r}' in _one_sentence(error)


def test_unsupported_hf_fields_written_by_older_versions_are_named():
  config = dict(transformers.BertConfig().to_dict(), position_embedding_type='relative_key')
  with pytest.raises(hf.ConversionError) as error:
    hf_encoder.model_overrides_from_hf(config)
  assert "position_embedding_type='relative_key'" in _one_sentence(error)
  config = dict(transformers.BertConfig().to_dict(), architectures=['BertForQuestionAnswering'])
  with pytest.raises(hf.ConversionError) as error:
    hf_encoder.model_overrides_from_hf(config)
  assert 'BertForQuestionAnswering' in _one_sentence(error)


def _tiny_bert_tensors():
  torch.manual_seed(0)
  model = HF_MODELS['bert']()
  return model.config.to_dict(), {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_tensors_are_checked_before_conversion():
  hf_config, tensors = _tiny_bert_tensors()
  config = _from_hf(hf_config)
  # Buffers that older exports saved, and early BERT's LayerNorm.gamma/beta, are accepted.
  legacy = dict(tensors, **{'bert.embeddings.position_ids': np.arange(24)[None]})
  legacy['bert.embeddings.LayerNorm.gamma'] = legacy.pop('bert.embeddings.LayerNorm.weight')
  legacy['bert.embeddings.LayerNorm.beta'] = legacy.pop('bert.embeddings.LayerNorm.bias')
  converted = hf_encoder.params_from_hf(legacy, config)
  np.testing.assert_array_equal(converted['embed_norm']['scale'],
                                tensors['bert.embeddings.LayerNorm.weight'])
  name = 'bert.encoder.layer.1.attention.self.key.weight'
  cases = {
      'missing': ({k: v for k, v in tensors.items() if k != name}, f'lack tensor {name}'),
      'mis-shaped': (dict(tensors, **{name: tensors[name][:, :-1]}), f'{name} has shape [64, 63]'),
      'unexpected': (dict(tensors, **{'bert.encoder.layer.2.output.dense.bias': np.zeros(64)}),
                     'hold tensor bert.encoder.layer.2.output.dense.bias'),
      'headless': ({k: v for k, v in tensors.items() if not k.startswith('cls.')},
                   'no masked-LM head'),
  }
  for case, (broken, phrase) in cases.items():
    with pytest.raises(hf.ConversionError) as error:
      hf_encoder.params_from_hf(broken, config)
    assert phrase in _one_sentence(error), case


def test_masked_lm_checkpoints_may_carry_unused_pretraining_heads():
  """bert-base-uncased says BertForMaskedLM but stores the pooler and NSP head too."""
  hf_config, tensors = _tiny_bert_tensors()
  config = _from_hf(dict(hf_config, architectures=['BertForMaskedLM']))
  assert not config.pooler and config.pair_head == 'none'
  params = hf_encoder.params_from_hf(tensors, config)
  assert 'pooler' not in params and 'pair_head' not in params
  assert hf_encoder.hf_config_from_model(config)['architectures'] == ['BertForMaskedLM']


@pytest.mark.parametrize('overrides, phrase', [
    (dict(style='electra'), "style='electra'"),
    (dict(num_heads=5), 'num_heads=5 must divide'),
    (dict(embedding_dim=128), 'embedding_dim=128'),
    (dict(pooler=False), 'pooler=True'),
    (dict(pair_head='next'), "pair_head='next'"),
    (dict(type_vocab_size=0), 'type_vocab_size=0'),
])
def test_check_config_names_the_setting(overrides, phrase):
  with pytest.raises(ValueError) as error:
    encoder.check_config(_model_config(**overrides))
  assert phrase in _one_sentence(error)
  encoder.check_config(_model_config())
  encoder.check_config(_tiny('albert', scan_layers=True))  # Shared layers scan too.


def test_export_refuses_what_transformers_cannot_hold():
  for overrides, phrase in ((dict(pair_head='none'), 'pair_head'),
                            (dict(share_layers=True), 'share_layers=True'),
                            (dict(style='roberta', pad_id=1), "pair_head='nsp'")):
    with pytest.raises(hf.ConversionError) as error:
      hf_encoder.hf_config_from_model(_model_config(**overrides))
    assert phrase in _one_sentence(error)
