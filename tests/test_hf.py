"""Parity with Hugging Face `transformers` (torch, CPU) and exact conversions both ways."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import runs
from research import convert
from research import decode
from research import hf
from research import workdir as workdir_lib
from research.models import decoder

pytestmark = pytest.mark.slow  # Builds, saves and converts torch models.


HF_CONFIGS = {
    'gpt2': lambda: transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=2,
                                            n_head=4, bos_token_id=0, eos_token_id=0),
    # Grouped-query attention, untied output embedding, a non-default rope_theta.
    'llama': lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=50000.0, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    'llama_tied': lambda: transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=True,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope='module', params=sorted(HF_CONFIGS))
def hf_model(request, tmp_path_factory):
  """(name, torch model, its saved directory, our converted workdir)."""
  torch.manual_seed(0)
  config = HF_CONFIGS[request.param]()
  model_class = (transformers.GPT2LMHeadModel if config.model_type == 'gpt2'
                 else transformers.LlamaForCausalLM)
  model = model_class(config).eval()
  with torch.no_grad():  # Non-trivial norms and biases, so that every tensor matters.
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'ln' in name:
        p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(root / 'hf', safe_serialization=True)
  convert.from_hf(str(root / 'hf'), str(root / 'ours'))
  return request.param, model, root / 'hf', root / 'ours'


def _ours(workdir):
  config, params, _ = workdir_lib.load_params(str(workdir))
  return decoder.build(config.model), params, config


def test_logits_match_transformers_on_a_padded_batch(hf_model):
  _, torch_model, _, workdir = hf_model
  model, params, _ = _ours(workdir)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 101, (3, 20))
  lengths = np.array([20, 13, 7])
  mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int64)  # Right padding...
  mask[2] = mask[2, ::-1]  # ...and left padding, which the real tokens must not attend to.
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions)).logits.numpy()
  got = np.asarray(model.apply({'params': params}, jnp.asarray(tokens, jnp.int32),
                               jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32),
                               method='language_model'))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate(hf_model):
  _, torch_model, _, workdir = hf_model
  model, params, config = _ours(workdir)
  prompt = np.array([5, 17, 42, 8])
  with torch.no_grad():
    want = torch_model.generate(torch.tensor(prompt[None]),
                                attention_mask=torch.ones(1, 4, dtype=torch.long),
                                max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 4:].numpy()
  got = decode.generate(model, params, [prompt.tolist()], decode.SamplingConfig(max_new_tokens=12))
  np.testing.assert_array_equal(got[0], want)
  # The same through the command line, on the converted workdir.
  result = runs.in_process('research.sample', '--workdir', str(workdir),
                           '--prompt_ids', '5,17,42,8', '--max_new_tokens', '12')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == ','.join(map(str, want))


def test_round_trips_are_bitwise(hf_model, tmp_path):
  name, _, hf_dir, workdir = hf_model
  # HF -> ours -> HF.
  runs.ok(runs.in_process('research.convert', 'to_hf', '--workdir', str(workdir),
                          '--out', str(tmp_path / 'back')))
  original = load_file(hf_dir / 'model.safetensors')
  back = load_file(tmp_path / 'back' / 'model.safetensors')
  original.pop('lm_head.weight', None) if hf_model[1].config.tie_word_embeddings else None
  assert sorted(original) == sorted(back)
  for key in original:
    np.testing.assert_array_equal(original[key], back[key], err_msg=key)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'back')  # Loadable.
  config, config_back = (json.load(open(d / 'config.json')) for d in (hf_dir, tmp_path / 'back'))
  assert reloaded.config.model_type == config['model_type']
  # The special-token ids and generation config the model came with, and GPT-2's dropout.
  for key in hf.SPECIAL_TOKENS + (('resid_pdrop', 'embd_pdrop') if name == 'gpt2' else ()):
    assert config_back[key] == config[key], key
  assert (json.load(open(tmp_path / 'back' / 'generation_config.json')) ==
          json.load(open(hf_dir / 'generation_config.json')))
  # ours -> HF -> ours.
  convert.from_hf(str(tmp_path / 'back'), str(tmp_path / 'ours_again'))
  _, first, _ = _ours(workdir)
  _, second, _ = _ours(tmp_path / 'ours_again')
  flat = lambda tree: {k: np.asarray(v) for k, v in _flatten(tree).items()}
  a, b = flat(first), flat(second)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}/{k}'))
    return out
  return {prefix: tree}


@pytest.mark.parametrize('edit, field', [
    (dict(rope_scaling=dict(rope_type='llama3', factor=8.0)), 'rope_scaling'),
    (dict(rope_parameters=dict(rope_type='llama3', rope_theta=5e5, factor=8.0)),
     'rope_parameters.rope_type'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(model_type='mistral'), 'model_type'),
])
def test_unsupported_hf_configs_name_the_field(edit, field):
  config = HF_CONFIGS['llama']().to_dict()
  config.update(edit)
  with pytest.raises(hf.ConversionError) as error:
    hf.model_overrides_from_hf(config)
  message = str(error.value)
  assert message.startswith(f'Hugging Face config field {field}=') and message.endswith(').')
  assert '\n' not in message


def test_from_hf_never_overwrites_a_workdir(hf_model, tmp_path):
  _, _, hf_dir, workdir = hf_model
  result = runs.in_process('research.convert', 'from_hf', '--model_dir', str(hf_dir),
                           '--workdir', str(workdir))
  assert result.returncode == 2 and 'already holds checkpoints' in result.stderr
