"""T5 (v1.0 and v1.1) from and to transformers: logits equal to transformers' on a padded batch in
both layer layouts, relative position buckets equal to its own, exact conversions both ways, bad
inputs named in one sentence, and a command-line round trip that comes back bitwise."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import runs
from research import config as config_lib
from research import convert
from research import decode
from research import hf_t5
from research import layout
from research import models
from research.hf import ConversionError
from research.models import encoder_decoder

VOCAB, BUCKETS, MAX_DISTANCE = 100, 32, 20
INPUTS, TARGETS = 40, 36  # Beyond MAX_DISTANCE: the log-spaced and the last buckets are used.


def _hf_config(**overrides):
  return transformers.T5Config(**dict(dict(
      vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
      num_decoder_layers=3, relative_attention_num_buckets=BUCKETS,
      relative_attention_max_distance=MAX_DISTANCE, decoder_start_token_id=0), **overrides))


def _v1_0(**overrides):
  return transformers.T5ForConditionalGeneration(_hf_config(feed_forward_proj='relu',
                                                            **overrides))


def _v1_1(**overrides):
  """transformers 5 ties lm_head to the shared embedding when it builds a model: untie it, as
  the published v1.1 weights are."""
  model = transformers.T5ForConditionalGeneration(
      _hf_config(feed_forward_proj='gated-gelu', tie_word_embeddings=False, **overrides))
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  return model


HF_MODELS = {'v1_0': _v1_0, 'v1_1': _v1_1}


def _random_model(version, **overrides):
  """A model in eval mode whose norms are not all ones, so that every tensor matters."""
  torch.manual_seed(0)
  model = HF_MODELS[version](**overrides).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module', params=sorted(HF_MODELS))
def hf_model(request):
  """(version, torch model, its tensors as numpy: the tied copies of the embedding included)."""
  model = _random_model(request.param)
  tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return request.param, model, tensors


def _config(hf_model):
  config = convert.config_for_hf(hf_model.config.to_dict())
  config.model.update(dict(dtype='float32', remat='none'))
  return config


def _padded_batch():
  """Encoder inputs with row 1 padded, decoder inputs (from id 0) with row 2 padded; segment
  ids are 1 on tokens and 0 on padding, as transformers' attention masks."""
  rng = np.random.default_rng(0)
  inputs_mask = np.ones((3, INPUTS), np.int64)
  inputs_mask[1, 25:] = 0
  targets_mask = np.ones((3, TARGETS), np.int64)
  targets_mask[2, 20:] = 0
  inputs = rng.integers(3, VOCAB, (3, INPUTS)) * inputs_mask
  targets = rng.integers(3, VOCAB, (3, TARGETS)) * targets_mask
  targets[:, 0] = 0
  return inputs, inputs_mask, targets, targets_mask


def _torch_logits(model, inputs, inputs_mask, targets, targets_mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs_mask),
                 decoder_input_ids=torch.tensor(targets),
                 decoder_attention_mask=torch.tensor(targets_mask)).logits.numpy()


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'per_layer'])
def test_logits_match_transformers_on_a_padded_batch(hf_model, scan_layers):
  _, torch_model, tensors = hf_model
  config = _config(torch_model)
  config.model.scan_layers = scan_layers
  params = hf_t5.params_from_hf(tensors, config.model)
  if not scan_layers:
    params = layout.convert(params, scan_layers=False)
  batch = _padded_batch()
  want = _torch_logits(torch_model, *batch)
  model = encoder_decoder.build(config.model)
  inputs, inputs_mask, targets, targets_mask = [jnp.asarray(x, jnp.int32) for x in batch]
  hidden = model.apply({'params': params}, inputs, targets, inputs_mask, targets_mask)
  got = np.asarray(model.apply({'params': params}, hidden, method='logits'))
  real = batch[3].astype(bool)  # Padded decoder positions are not compared.
  assert np.abs(got[real] - want[real]).max() <= 1e-4


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('buckets, max_distance', [(32, 128), (32, 20), (8, 10)])
def test_relative_buckets_match_transformers(bidirectional, buckets, max_distance):
  relative = np.arange(-300, 301)
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.tensor(relative), bidirectional, buckets, max_distance).numpy()
  got = encoder_decoder.relative_buckets(jnp.asarray(relative, jnp.int32), bidirectional,
                                         buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_conversion_round_trips_bitwise(hf_model):
  _, torch_model, tensors = hf_model
  config = _config(torch_model)
  back = hf_t5.params_to_hf(hf_t5.params_from_hf(tensors, config.model), config.model)
  tied = {'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'}
  if config.model.tie_embeddings:
    tied.add('lm_head.weight')
  assert set(back) == set(tensors) - tied
  for name, value in back.items():
    assert value.dtype == tensors[name].dtype and value.flags.c_contiguous, name
    np.testing.assert_array_equal(value, tensors[name], err_msg=name)


def test_configs_map_both_ways(hf_model):
  version, torch_model, _ = hf_model
  hf_config = torch_model.config.to_dict()
  overrides = hf_t5.model_overrides_from_hf(hf_config)
  assert (overrides['gated'], overrides['activation'], overrides['tie_embeddings']) == {
      'v1_0': (False, 'relu', True), 'v1_1': (True, 'gelu_tanh', False)}[version]
  exported = hf_t5.hf_config_from_model(_config(torch_model).model)
  assert hf_t5.model_overrides_from_hf(exported) == overrides
  loaded = transformers.T5Config.from_dict(exported)
  for field in ('feed_forward_proj', 'dense_act_fn', 'is_gated_act', 'scale_decoder_outputs',
                'num_decoder_layers', 'd_kv', 'relative_attention_max_distance'):
    assert getattr(loaded, field) == getattr(torch_model.config, field), field


def test_output_layer_follows_transformers():
  """Older configs say tie_word_embeddings, transformers 5 scale_decoder_outputs (which wins);
  without an lm_head of its own, an unscaled model reads the shared embedding, as
  transformers ties it."""
  output_fields = ('tie_word_embeddings', 'scale_decoder_outputs')
  base = {k: v for k, v in _v1_0().config.to_dict().items() if k not in output_fields}
  for fields, tied in ((dict(), True), (dict(tie_word_embeddings=False), False),
                       (dict(tie_word_embeddings=True, scale_decoder_outputs=False), False),
                       (dict(tie_word_embeddings=False, scale_decoder_outputs=True), True)):
    assert hf_t5.model_overrides_from_hf(dict(base, **fields))['tie_embeddings'] is tied, fields
  model = _v1_0()
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()
             if k != 'lm_head.weight'}
  config = convert.config_for_hf(dict(base, scale_decoder_outputs=False))
  params = hf_t5.params_from_hf(tensors, config.model)
  np.testing.assert_array_equal(params['lm_head']['kernel'], tensors['shared.weight'].T)


def _error(tensors, hf_config):
  with pytest.raises(ConversionError) as error:
    hf_t5.params_from_hf(tensors, convert.config_for_hf(hf_config).model)
  message = str(error.value)
  assert message.endswith('.') and message.count('. ') == 0 and '\n' not in message, message
  return message


def test_bad_inputs_are_named_in_one_sentence(hf_model):
  _, torch_model, tensors = hf_model
  hf_config = torch_model.config.to_dict()
  name = 'decoder.block.2.layer.1.EncDecAttention.k.weight'
  message = _error(dict(tensors, **{name: tensors[name][:, :-1]}), hf_config)
  assert name in message and '[32, 31]' in message and '[32, 32]' in message
  missing = 'encoder.block.1.layer.0.layer_norm.weight'
  assert missing in _error({k: v for k, v in tensors.items() if k != missing}, hf_config)
  scaled = dict(hf_config, tie_word_embeddings=True, scale_decoder_outputs=True)
  head = dict(tensors, **{'lm_head.weight': tensors['shared.weight'] + 1})
  assert 'lm_head.weight' in _error(head, scaled)
  for field, value in (('feed_forward_proj', 'gated-silu'), ('is_encoder_decoder', False),
                       ('architectures', ['T5EncoderModel']),
                       ('relative_attention_num_buckets', 31)):
    with pytest.raises(ConversionError, match=field) as error:
      hf_t5.model_overrides_from_hf(dict(hf_config, **{field: value}))
    assert str(error.value).count('. ') == 0, error.value


@pytest.mark.slow
@pytest.mark.parametrize('version', sorted(HF_MODELS))
def test_from_hf_then_to_hf_round_trips_bitwise(version, tmp_path):
  model = _random_model(version)
  model.save_pretrained(tmp_path / 'hf')
  runs.ok(runs.in_process('research.convert', 'from_hf', '--model_dir', str(tmp_path / 'hf'),
                          '--workdir', str(tmp_path / 'ours')))
  runs.ok(runs.in_process('research.convert', 'to_hf', '--workdir', str(tmp_path / 'ours'),
                          '--out', str(tmp_path / 'back')))
  original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  exported = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert set(exported) == set(original)
  for name, value in exported.items():
    assert (value == original[name]).all() and value.dtype == original[name].dtype, name
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'back').eval()
  assert reloaded.config.scale_decoder_outputs == model.config.scale_decoder_outputs
  batch = _padded_batch()
  np.testing.assert_array_equal(_torch_logits(reloaded, *batch), _torch_logits(model, *batch))


def _hf_generate(model, inputs, stop, **options):
  """transformers' generate on right-padded inputs; rows without the start token, cut before
  the first stop token."""
  length = max(len(x) for x in inputs)
  ids = torch.tensor([x + [0] * (length - len(x)) for x in inputs])
  mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in inputs])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop, pad_token_id=0,
                         decoder_start_token_id=0, do_sample=False, **options)
  rows = []
  for row in out[:, 1:].tolist():
    rows.append(row[:row.index(stop)] if stop in row else row)
  return rows


@pytest.mark.parametrize('version', sorted(HF_MODELS))
def test_greedy_and_beam_search_give_the_tokens_of_transformers_generate(version):
  """On the same weights, with inputs of different lengths, and a stop token that the models
  actually produce (so that beams end at different lengths and the length penalty matters).
  As many decoder as encoder layers: transformers' generation cache sizes itself by the
  encoder's."""
  torch_model = _random_model(version, num_decoder_layers=2)
  tensors = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
  config = _config(torch_model)
  params = hf_t5.params_from_hf(tensors, config.model)
  model = encoder_decoder.build(config.model)
  rng = np.random.default_rng(5)
  inputs = [rng.integers(3, VOCAB, n).tolist() for n in (9, 14, 5, 11)]
  free = decode.generate(model, params, inputs, decode.SamplingConfig(max_new_tokens=10))
  stop = int(np.bincount(np.asarray(free)[:, 2:6].ravel()).argmax())  # Common mid-sequence.
  lengths = {}
  for beams, penalty in ((0, 1.0), (4, 0.6)):
    want = _hf_generate(torch_model, inputs, stop, max_new_tokens=10, num_beams=max(beams, 1),
                        length_penalty=penalty, early_stopping=False)
    sampling = decode.SamplingConfig(max_new_tokens=10, stop_tokens=(stop,), pad_id=0,
                                     num_beams=beams, length_penalty=penalty)
    got = decode.generate(model, params, inputs, sampling)
    assert got == want, (beams, penalty)
    lengths[beams, penalty] = [len(row) for row in want]
  assert min(lengths[4, 0.6]) < 10, lengths  # Some beams ended on the stop token.


# Millions of parameters of the published checkpoints (t5-small ... google/byt5-small).
PUBLISHED = {'t5_small': 60.5, 't5_base': 222.9, 't5_large': 737.7, 't5_1_1_small': 77.0,
             't5_1_1_base': 247.6, 't5_1_1_large': 783.2, 'byt5_small': 299.6}


@pytest.mark.parametrize('variant', sorted(PUBLISHED))
def test_every_variant_has_the_parameters_of_transformers_model(variant):
  """Counted without allocating either model (transformers' on the meta device), and equal to
  the published checkpoint's count: the variant's sizes are the paper's."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(os.path.join(repo, 'configs',
                                                    f'encoder_decoder.py:{variant}'))
  hf_config = transformers.T5Config(**hf_t5.hf_config_from_model(config.model))
  with torch.device('meta'):
    model = transformers.T5ForConditionalGeneration(hf_config)
  if not config.model.tie_embeddings:  # transformers 5 builds it tied: untie as the weights are.
    with torch.device('meta'):
      model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
  theirs = sum(p.numel() for p in model.parameters())
  assert models.count_params(encoder_decoder, config.model) == theirs
  assert round(theirs / 1e6, 1) == PUBLISHED[variant]
