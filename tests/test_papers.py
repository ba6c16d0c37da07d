"""Reproduction presets (configs/papers.py) and the planner's accelerator topologies."""

import json
import math
import os

import jax
import ml_collections
import pytest
from flax import linen as nn

import runs
from configs import papers
from research import config as config_lib
from research import mesh as mesh_lib
from research import models
from research import plan

GIB = 1 << 30

# Parameter counts of the published models, as the family tests pin them: transformers'
# GPT2LMHeadModel and LlamaForCausalLM (tests/test_config.py), BertForPreTraining,
# RobertaForMaskedLM and AlbertForPreTraining in millions (tests/test_encoder_model.py), and
# T5ForConditionalGeneration of google/t5-v1_1-base (tests/test_t5_convert.py compares them).
PUBLISHED = {
    'gpt2_124m': 124_439_808,
    'bert_base': 110.1e6,
    'roberta_base': 124.7e6,
    'albert_base': 11.8e6,
    't5_1_1_base': 247_577_856,
    'llama_1b': 1_235_814_400,
}


def _preset(name):
  return config_lib.load_config_file(os.path.join(runs.REPO, 'configs', f'papers.py:{name}'))


def _flat(config, prefix=''):
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


@pytest.mark.parametrize('name', sorted(papers.PAPERS))
def test_every_preset_validates_on_its_topology_with_the_published_size(name):
  config = _preset(name)
  devices, _ = plan.topology(papers.PAPERS[name]['topology'])
  mesh = config_lib.validate(config, devices)
  assert mesh == dict(data=1, fsdp=devices, sequence=1, tensor=1)
  count = models.count_params(models.get(config.model.family), config.model)
  want = PUBLISHED[name]
  assert (count == want) if isinstance(want, int) else (round(count / 1e6, 1) == want / 1e6)


@pytest.mark.parametrize('name', sorted(papers.PAPERS))
def test_a_preset_changes_only_what_its_record_names(name):
  """Built on the family variant: every other setting is the family's."""
  record = papers.PAPERS[name]
  family, _, variant = record['base'].partition('.')
  base = _flat(config_lib.load_config_file(
      os.path.join(runs.REPO, 'configs', f'{family}.py:{variant}')))
  preset = _flat(_preset(name))
  assert preset.keys() == base.keys()
  changed = {key for key in preset if preset[key] != base[key]}
  named = set(record['settings']) | set(papers._COMMON) | {'variant'}
  assert changed <= named, changed - named
  assert preset['variant'] == name and preset['data.source'] == 'tfds'
  assert preset['data.tfds_name'] and preset['train.sample_tokens'] == 0
  assert all(record[field] for field in ('paper', 'dataset', 'tokenizer', 'reported', 'notes'))


def test_the_presets_hold_the_published_hyperparameters():
  gpt2, bert, roberta = _preset('gpt2_124m'), _preset('bert_base'), _preset('roberta_base')
  albert, t5, llama = _preset('albert_base'), _preset('t5_1_1_base'), _preset('llama_1b')
  tokens = lambda c: c.train.batch_size * c.train.seq_len
  assert tokens(gpt2) == 2 ** 19 and gpt2.train.num_steps == 600_000
  assert (gpt2.optim.lr, gpt2.optim.warmup_steps, gpt2.optim.end_lr_ratio) == (6e-4, 2000, 0.1)
  assert (bert.train.batch_size, bert.train.seq_len, bert.train.num_steps) == (256, 512, 10 ** 6)
  assert (bert.optim.lr, bert.optim.warmup_steps, bert.optim.decay) == (1e-4, 10_000, 'linear')
  assert bert.objective.pair == 'nsp' and not bert.objective.dynamic_masking
  assert bert.model.dropout_rate == 0.1 and bert.objective.mask_rate == 0.15
  assert (roberta.train.batch_size, roberta.train.num_steps) == (8192, 500_000)
  assert (roberta.optim.lr, roberta.optim.warmup_steps, roberta.optim.b2) == (6e-4, 24_000, 0.98)
  assert roberta.objective.dynamic_masking and roberta.objective.pair == 'none'
  assert (albert.train.batch_size, albert.train.num_steps, albert.objective.pair) == (
      4096, 125_000, 'sop')
  assert (t5.train.batch_size, t5.train.seq_len, t5.train.target_len) == (128, 512, 114)
  assert t5.train.num_steps == 2 ** 19 and t5.model.dropout_rate == 0.0
  assert (t5.optim.name, t5.optim.decay, t5.optim.lr) == ('adafactor', 'rsqrt', 1e-2)
  assert (t5.objective.noise_density, t5.objective.mean_span_length) == (0.15, 3.0)
  assert t5.data.extra_ids == 100
  assert tokens(llama) == 4 * 2 ** 20 and llama.train.seq_len == 8192
  assert (llama.optim.lr, llama.optim.b2, llama.optim.decay) == (3e-4, 0.95, 'cosine')
  # Micro-batches divide each device's share of the batch evenly.
  for config, devices in ((roberta, 32), (albert, 8), (llama, 8)):
    assert config.train.batch_size % (devices * config.optim.grad_accum_steps) == 0


def test_an_unknown_preset_names_the_presets():
  with pytest.raises(config_lib.ConfigError, match=r"preset 'gpt3'; choose one of \['albert_b"):
    _preset('gpt3')


def test_topologies_count_devices_not_tensorcores():
  assert plan.topology('v5p-16') == (8, 95 * GIB)
  assert plan.topology('v4-32') == (16, 32 * GIB)
  assert plan.topology('v5e-8') == plan.topology('v5litepod-8') == (8, 16 * GIB)
  assert plan.topology('h100-80gb:8') == (8, 80 * GIB)
  assert plan.topology('h200:4') == (4, 141 * GIB)
  for bad in ('v5p-15', 'v5p-0', 'tpu-9000', 'h200'):
    with pytest.raises(mesh_lib.MeshError) as error:
      plan.topology(bad)
    assert str(error.value) == (
        f'--topology {bad} is not a known accelerator slice; use v4-N or v5p-N (N TensorCores, '
        'an even number: N/2 chips), v5e-N or v5litepod-N (N chips), h100-80gb:N or h200:N '
        '(N GPUs).')


def test_the_command_line_refuses_an_unknown_topology_and_a_mesh_beside_one():
  result = runs.in_process('research.plan', '--config', 'configs/decoder.py:tiny',
                           '--topology', 'v7-8')
  runs.assert_error(result, '--topology v7-8 is not a known accelerator slice')
  both = runs.in_process('research.plan', '--config', 'configs/decoder.py:tiny',
                         '--topology', 'v5e-4', '--mesh', 'fsdp=4')
  assert runs.error_line(both) == ('error: Pass --mesh or --topology, not both: a topology '
                                   'resolves config.mesh over its own devices.')


def test_fits_is_false_once_the_footprint_exceeds_the_memory(decoder_config):
  config = decoder_config('tiny')
  config.train.batch_size, config.train.seq_len = 8, 64
  report = plan.plan(config, jax.devices()[:1], hbm_bytes=16 * GIB)
  total = sum(report[f'{key}_bytes_per_device']
              for key in ('params', 'optimizer', 'activations', 'batch'))
  assert report['total_bytes_per_device'] == total > 0
  assert report['hbm_bytes_per_device'] == 16 * GIB and report['fits']
  assert plan.fit(report, total)['fits'] and not plan.fit(report, total - 1)['fits']
  config.train.batch_size = 64  # Eight times the rows: more activation memory than `total`.
  larger = plan.plan(config, jax.devices()[:1], hbm_bytes=total)
  assert larger['activations_bytes_per_device'] > report['activations_bytes_per_device']
  assert not larger['fits']


def _expected_params_bytes(config, fsdp):
  """Each parameter's bytes, divided by `fsdp` when it has an `embed` dimension that divides
  (the rule that shards parameters over mesh.fsdp), counted from the logical axis names."""
  family = models.get(config.model.family)
  model = family.build(config.model)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **family.init_inputs(8),
                                            method='initialize'))['params']
  total = 0
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    names = leaf.names if isinstance(leaf, nn.Partitioned) else ()
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    split = any(n == 'embed' and d % fsdp == 0 for n, d in zip(names, value.shape))
    total += math.prod(value.shape) * value.dtype.itemsize // (fsdp if split else 1)
  return total


# Each preset on its documented topology: in this process where that has the 8 devices the
# tests simulate, else through the command line, which simulates as many as the topology has.
@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(papers.PAPERS))
def test_a_preset_fits_its_documented_topology(name, tmp_path):
  config = _preset(name)
  config.data.tokenizer = 'bytes'  # Planning reads no tokenizer file; the program is the same.
  devices, hbm = plan.topology(papers.PAPERS[name]['topology'])
  if devices != len(jax.devices()):
    out = tmp_path / 'plan.json'
    result = runs.command('research.plan', '--config', f'configs/papers.py:{name}',
                          '--topology', papers.PAPERS[name]['topology'],
                          '--config.data.tokenizer=bytes', '--plan_json', str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
  else:
    report = plan.plan(config, jax.devices()[:devices], hbm_bytes=hbm)
  assert report['mesh']['fsdp'] == report['devices'] == devices
  assert report['fits'] and report['hbm_bytes_per_device'] == hbm, report
  assert report['params_bytes_per_device'] == _expected_params_bytes(config, devices)
  if name == 'llama_1b':  # No biases: every parameter has an embed dimension, so exactly 1/8.
    assert report['params_bytes_per_device'] * devices == report['params'] * 4
  # AdamW keeps two moments of each parameter, sharded as it is.
  if config.optim.name == 'adamw':
    assert report['optimizer_bytes_per_device'] >= 2 * report['params_bytes_per_device']
  assert report['batch_bytes_per_device'] * devices >= config.train.batch_size * 4


@pytest.mark.slow
def test_the_command_line_plans_a_topology(tmp_path):
  out = tmp_path / 'plan.json'
  result = runs.command('research.plan', '--config', 'configs/decoder.py:tiny',
                        '--topology', 'v5e-4', '--config.mesh.data=1', '--config.mesh.fsdp=-1',
                        '--config.train.batch_size=8', '--config.train.seq_len=64',
                        '--config.data.source=markov', '--plan_json', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['devices'] == 4 and report['mesh']['fsdp'] == 4
  assert report['hbm_bytes_per_device'] == 16 * GIB and report['fits'] is True
  assert report['total_bytes_per_device'] == sum(
      report[f'{key}_bytes_per_device'] for key in ('params', 'optimizer', 'activations', 'batch'))
  assert 'of 16 GiB HBM: fits' in result.stdout
