"""research.convert: bad Hugging Face directories, flags and --out folders stop with one sentence
(exit 2); to_hf keeps the checkpoint's dtype, the dropout rate and the special-token ids."""

import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import runs
from research import config as config_lib
from research import convert
from research import hf
from research import workdir as workdir_lib
from research.data import tokenizer as tokenizer_lib



_convert = functools.partial(runs.in_process, 'research.convert')


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """Tiny GPT-2 and Llama (grouped-query: k_proj is [32, 64]) directories saved by transformers."""
  root = tmp_path_factory.mktemp('hf')
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
      eos_token_id=0)).save_pretrained(root / 'gpt2')
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(
          root / 'llama')
  return root


def _edit_config(**changes):
  def edit(model_dir):
    config = json.load(open(model_dir / 'config.json'))
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    json.dump(config, open(model_dir / 'config.json', 'w'))
  return edit


def _edit_tensors(edit_dict):
  def edit(model_dir):
    tensors = load_file(model_dir / 'model.safetensors')
    edit_dict(tensors)
    save_file(tensors, model_dir / 'model.safetensors')
  return edit


def _shard(name_of_second):
  """Moves the weights into a shard named by an index, which sends one tensor to another file."""
  def edit(model_dir):
    tensors = sorted(load_file(model_dir / 'model.safetensors'))
    os.rename(model_dir / 'model.safetensors', model_dir / 'model-00001-of-00002.safetensors')
    weight_map = {name: 'model-00001-of-00002.safetensors' for name in tensors}
    weight_map[tensors[0]] = name_of_second
    json.dump(dict(weight_map=weight_map), open(model_dir / 'model.safetensors.index.json', 'w'))
    # A readable copy outside the model directory: refused for where it is, not for being missing.
    shutil.copy(model_dir / 'model-00001-of-00002.safetensors',
                model_dir.parent / 'outside.safetensors')
  return edit


def _truncate(model_dir):
  data = (model_dir / 'model.safetensors').read_bytes()
  (model_dir / 'model.safetensors').write_bytes(data[:len(data) // 2])


def _set(name, value):
  return _edit_tensors(lambda tensors: tensors.__setitem__(name, value(tensors)))


BAD_MODEL_DIRS = [
    ('gpt2', lambda d: (d / 'config.json').write_text('{"model_type": "gpt2",'),
     'config.json is not valid JSON ('),
    ('gpt2', _edit_config(n_embd=None),
     'Hugging Face config.json lacks field n_embd, which a gpt2 model needs'),
    ('gpt2', _truncate, 'model.safetensors is not a readable safetensors file ('),
    ('gpt2', _set('transformer.h.1.attn.c_attn.weight',
                  lambda t: t['transformer.h.1.attn.c_attn.weight'][:, :90]),
     'tensor transformer.h.1.attn.c_attn.weight has shape [32, 90] but config.json implies '
     '[32, 96]'),
    ('llama', _set('model.layers.1.self_attn.k_proj.weight',
                   lambda t: np.ascontiguousarray(t['model.layers.1.self_attn.k_proj.weight'].T)),
     'tensor model.layers.1.self_attn.k_proj.weight has shape [64, 32] but config.json implies '
     '[32, 64]'),
    ('llama', _set('model.layers.2.input_layernorm.weight', lambda t: t['model.norm.weight']),
     'weights hold tensor model.layers.2.input_layernorm.weight, which a llama model of this '
     'config.json does not have'),
    ('llama', _shard('model-00002-of-00002.safetensors'),
     'names shard model-00002-of-00002.safetensors, which is missing from'),
    ('llama', _shard('../outside.safetensors'), "names shard '../outside.safetensors' outside"),
]


@pytest.mark.parametrize('style, edit, fragment', BAD_MODEL_DIRS)
def test_from_hf_bad_model_dirs_stop_with_one_sentence(hf_dirs, tmp_path, style, edit, fragment):
  model_dir = tmp_path / 'model'
  shutil.copytree(hf_dirs / style, model_dir)
  edit(model_dir)
  result = _convert('from_hf', '--model_dir', str(model_dir), '--workdir', str(tmp_path / 'ours'))
  runs.assert_error(result, fragment)
  assert not (tmp_path / 'ours').exists()  # Refused before anything is written.


@pytest.mark.parametrize('args, fragment', [
    (['from_hf', '--model_dri=x', '--workdir=y'], 'Unknown flag --model_dri; the closest is '
                                                 '--model_dir.'),
    (['from_hf', '--model_dir=/nonexistent/model', '--workdir=y'],
     '/nonexistent/model is not a directory'),
    (['to_hf', '--workdir=x', '--out=y', '--model_dir=z'], '--model_dir does not apply here'),
])
def test_bad_flags_stop_with_one_sentence(args, fragment):
  runs.assert_error(_convert(*args), fragment)


def test_tensor_and_file_checks_name_what_is_wrong(hf_dirs, tmp_path):
  """The checks behind from_hf, in process: each names the tensor, field or file at fault."""
  llama_config = json.load(open(hf_dirs / 'llama' / 'config.json'))
  model = convert.config_for_hf(llama_config).model
  tensors = load_file(hf_dirs / 'llama' / 'model.safetensors')
  wide = dict(tensors)
  wide['model.layers.0.self_attn.q_proj.weight'] = np.zeros((72, 64), np.float32)
  with pytest.raises(hf.ConversionError, match=r'model.layers.0.self_attn.q_proj.weight has shape '
                                               r'\[72, 64\] but config.json implies \[64, 64\]'):
    hf.params_from_hf(wide, model)
  headless = {k: v for k, v in tensors.items() if k != 'lm_head.weight'}
  with pytest.raises(hf.ConversionError, match='lack tensor lm_head.weight'):
    hf.params_from_hf(headless, model)  # Untied: the output embedding is needed.
  with pytest.raises(hf.ConversionError, match=r"hidden_size='64' must be a positive integer"):
    hf.model_overrides_from_hf(dict(llama_config, hidden_size='64'))

  # Older GPT-2 exports: no `transformer.` prefix, causal-mask buffers, a tied lm_head copy.
  gpt2 = convert.config_for_hf(json.load(open(hf_dirs / 'gpt2' / 'config.json'))).model
  tensors = load_file(hf_dirs / 'gpt2' / 'model.safetensors')
  old = {k[len('transformer.'):]: v for k, v in tensors.items()}
  old.update({f'h.{i}.attn.bias': np.ones((1, 1, 32, 32), np.float32) for i in range(2)})
  old['lm_head.weight'] = old['wte.weight']
  a, b = hf.params_from_hf(tensors, gpt2), hf.params_from_hf(old, gpt2)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))

  model_dir = tmp_path / 'model'
  shutil.copytree(hf_dirs / 'llama', model_dir)
  _shard(str(model_dir.parent / 'outside.safetensors'))(model_dir)  # An absolute path.
  with pytest.raises(hf.ConversionError, match='outside'):
    hf.read_model_dir(str(model_dir))
  with pytest.raises(hf.ConversionError, match='is the model directory'):
    convert.from_hf(str(model_dir), str(model_dir))


@pytest.fixture(scope='module')
def bf16_run(tmp_path_factory):
  """Our GPT-2-style run with dropout and bfloat16 parameters, at step 0 with random weights."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py:nanogpt_cpu'))
  m = config.model
  m.num_layers, m.emb_dim, m.mlp_dim, m.max_len = 2, 32, 64, 32
  m.param_dtype, m.dropout_rate = 'bfloat16', 0.1
  config.train.seq_len, config.train.batch_size, config.train.sample_tokens = 32, 16, 0
  return runs.random_run(tmp_path_factory.mktemp('ours') / 'run', config)


@pytest.mark.parametrize('out, fragment', [
    ('{run}', "lies in the run's own --workdir"),
    ('{run}/../run/', "lies in the run's own --workdir"),  # The same folder, spelt differently.
    ('{run}/hf', "lies in the run's own --workdir"),
    ('{full}', 'is not empty; pass a new or empty folder, or --overwrite'),
])
def test_to_hf_refuses_the_run_itself_and_a_non_empty_out(bf16_run, tmp_path, out, fragment):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'notes.txt').write_text('keep')
  before = {name: (bf16_run / name).read_bytes() for name in ('config.json', 'environment.json')}
  out = out.format(run=bf16_run, full=tmp_path / 'full')
  runs.assert_error(_convert('to_hf', '--workdir', str(bf16_run), '--out', out), fragment)
  assert {name: (bf16_run / name).read_bytes() for name in before} == before
  assert os.listdir(tmp_path / 'full') == ['notes.txt']


def test_to_hf_keeps_dtype_dropout_and_special_token_ids(bf16_run, tmp_path):
  out = tmp_path / 'hf'
  out.mkdir()
  (out / 'config.json').write_text('{}')  # A previous export, replaced with --overwrite.
  result = _convert('to_hf', '--workdir', str(bf16_run), '--out', str(out), '--overwrite')
  assert result.returncode == 0, result.stderr[-2000:]

  # bfloat16 parameters are written as bfloat16, bit for bit.
  config, params, _ = workdir_lib.load_params(str(bf16_run))
  tensors = load_file(out / 'model.safetensors')
  assert {str(t.dtype) for t in tensors.values()} == {'bfloat16'}
  bits = lambda x: np.asarray(x).view(np.uint16)
  np.testing.assert_array_equal(bits(tensors['transformer.wte.weight']),
                                bits(params['token_embed']['embedding']))
  np.testing.assert_array_equal(bits(tensors['transformer.h.1.mlp.c_fc.weight']),
                                bits(params['layers_1']['mlp']['fc']['kernel']))  # Unscanned.
  hf_config = json.load(open(out / 'config.json'))
  assert hf_config['dtype'] == hf_config['torch_dtype'] == 'bfloat16'
  mode = lambda name: (out / name).stat().st_mode & 0o777
  assert mode('model.safetensors') == mode('config.json')  # Not private to its writer.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype='auto')
  assert reloaded.dtype == torch.bfloat16

  # Dropout: at the embeddings and residual branches, as ours (no attention dropout); read back.
  rate = config.model.dropout_rate
  pdrop = (hf_config['resid_pdrop'], hf_config['embd_pdrop'], hf_config['attn_pdrop'])
  assert pdrop == (rate, rate, 0.0)
  assert convert.config_for_hf(hf_config).model.dropout_rate == rate

  # The special tokens of the run's tokenizer, in config.json and generation_config.json.
  tokenizer = tokenizer_lib.get(config.data.tokenizer)
  ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  assert (hf_config['bos_token_id'], hf_config['eos_token_id'], hf_config['pad_token_id']) == ids
  generation = transformers.GenerationConfig.from_pretrained(out)
  assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == ids


def _gpt2_tokenizer(model_dir, full_alphabet=False):
  """A GPT-2-style byte-level BPE tokenizer.json with <|endoftext|> at id 0 (the model's bos and
  eos): over the characters of a few sentences, or over all 256 bytes (more ids than the tiny
  model's 101)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
  tokenizer.train_from_iterator(['hello world, the quick brown fox jumps'] * 20,
                                trainers.BpeTrainer(vocab_size=90, initial_alphabet=alphabet,
                                                    special_tokens=['<|endoftext|>']))
  tokenizer.save(str(model_dir / 'tokenizer.json'))


def test_an_imported_gpt2_model_keeps_its_tokenizer_and_samples_from_text(hf_dirs, tmp_path):
  model_dir, ours = tmp_path / 'model', tmp_path / 'ours'
  shutil.copytree(hf_dirs / 'gpt2', model_dir)
  _gpt2_tokenizer(model_dir)
  source = tokenizer_lib.get(f'hf:{model_dir}')
  runs.ok(_convert('from_hf', '--model_dir', str(model_dir), '--workdir', str(ours)))
  saved = ours / tokenizer_lib.SAVED_DIR
  assert workdir_lib.load_config(str(ours)).data.tokenizer == f'hf:{saved}'
  assert (saved / 'tokenizer.json').read_bytes() == (model_dir / 'tokenizer.json').read_bytes()
  assert tokenizer_lib.load_saved(str(saved)).fingerprint == source.fingerprint
  shutil.rmtree(model_dir)  # The workdir holds all it needs.
  result = runs.ok(runs.in_process('research.sample', '--workdir', str(ours), '--prompt',
                                   'hello world', '--prompt', 'the fox', '--max_new_tokens', '8'))
  lines = result.stdout.splitlines()
  assert len(lines) == 2 and lines[0].startswith('hello world') and lines[1].startswith('the fox')


def test_from_hf_refuses_a_tokenizer_larger_than_the_model(hf_dirs, tmp_path):
  model_dir = tmp_path / 'model'
  shutil.copytree(hf_dirs / 'gpt2', model_dir)
  _gpt2_tokenizer(model_dir, full_alphabet=True)
  result = _convert('from_hf', '--model_dir', str(model_dir), '--workdir', str(tmp_path / 'ours'))
  runs.assert_error(result, f'The tokenizer.json in {model_dir} has 257 tokens but the model\'s '
                            'embedding only 101')
  assert not (tmp_path / 'ours').exists()


@pytest.mark.parametrize('spec', ['csv,decoder.tiny', 'csv,encoder.bert_tiny'])
def test_to_hf_refuses_a_fine_tuned_classifier_rather_than_drop_its_head(tmp_path, spec):
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', f'finetune.py:{spec}'))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(config.to_json_best_effort())
  runs.assert_error(_convert('to_hf', '--workdir', str(tmp_path / 'run'), '--out',
                             str(tmp_path / 'hf')),
                    'holds a classifier (model.num_labels=2), and the Hugging Face export writes '
                    'pretrained models only; export the run it was fine-tuned from.')
  assert not (tmp_path / 'hf').exists()


def test_to_hf_reads_the_runs_saved_tokenizer_when_its_configured_folder_is_gone(tmp_path):
  """A run keeps a copy of its tokenizer (workdir/tokenizer): the special-token ids of the export
  come from it, as sampling's do, after the folder data.tokenizer names was removed."""
  vocab = tmp_path / 'vocab'
  vocab.mkdir()
  _gpt2_tokenizer(vocab)
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py:tiny'))
  config.data.tokenizer = f'hf:{vocab}'
  run = runs.random_run(tmp_path / 'run', config)
  tokenizer = tokenizer_lib.get(config.data.tokenizer)
  tokenizer_lib.save(tokenizer, str(run / tokenizer_lib.SAVED_DIR))
  shutil.rmtree(vocab)
  result = _convert('to_hf', '--workdir', str(run), '--out', str(tmp_path / 'hf'))
  assert result.returncode == 0, result.stderr[-2000:]
  hf_config = json.load(open(tmp_path / 'hf' / 'config.json'))
  ids = (hf_config['bos_token_id'], hf_config['eos_token_id'], hf_config['pad_token_id'])
  assert ids == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) and 0 in ids
