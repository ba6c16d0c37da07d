"""research.convert through the command line for the encoder family: a transformers checkpoint
goes in (from_hf), comes back out (to_hf) bitwise, and the result loads in transformers with the
same outputs."""

import pytest
import torch
import transformers
from safetensors.numpy import load_file

import runs
from test_encoder_model import HF_MODELS


def _convert(*args):
  return runs.in_process('research.convert', *args)


def _bert_masked_lm():
  """What bert-base-uncased declares: BertForMaskedLM, no sentence-pair head."""
  config = HF_MODELS['bert']().config
  return transformers.BertForMaskedLM(config)


@pytest.mark.slow
@pytest.mark.parametrize('style', ['bert', 'roberta', 'albert', 'bert_masked_lm'])
def test_from_hf_then_to_hf_round_trips_bitwise(style, tmp_path):
  torch.manual_seed(0)
  model = (_bert_masked_lm if style == 'bert_masked_lm' else HF_MODELS[style])().eval()
  with torch.no_grad():  # Off their initial values: a tensor dropped and re-initialised shows.
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path / 'hf')
  runs.ok(_convert('from_hf', '--model_dir', str(tmp_path / 'hf'), '--workdir',
                   str(tmp_path / 'ours')))
  runs.ok(_convert('to_hf', '--workdir', str(tmp_path / 'ours'), '--out', str(tmp_path / 'back')))
  original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
  exported = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert set(exported) == set(original)
  for name, value in exported.items():
    assert (value == original[name]).all() and value.dtype == original[name].dtype, name
  reloaded = type(model).from_pretrained(tmp_path / 'back').eval()
  tokens = torch.randint(3, 90, (2, 12))
  with torch.no_grad():
    want, got = model(input_ids=tokens), reloaded(input_ids=tokens)
  for key in want.keys():
    assert torch.equal(want[key], got[key]), key
