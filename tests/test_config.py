"""Named variants, config validation sentences, schedules and the weight-decay mask."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn
from ml_collections import ConfigDict

from research import config as config_lib
from research import models
from research import optim
from research.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# transformers' GPT2LMHeadModel / LlamaForCausalLM num_parameters() for the same shapes.
HF_PARAM_COUNTS = {
    'gpt2_small': 124_439_808,
    'gpt2_medium': 354_823_168,
    'gpt2_large': 774_030_080,
    'gpt2_xl': 1_557_611_200,
    'llama_1b': 1_235_814_400,
    'llama2_7b': 6_738_415_616,
}


def _closed_form_count(m):
  """Independent count from the architecture definition (HF module by module)."""
  d, f, v, layers = m.emb_dim, m.mlp_dim, m.vocab_size, m.num_layers
  head_dim = d // m.num_heads
  kv = (m.num_kv_heads or m.num_heads) * head_dim
  if m.style == 'gpt2':
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return v * d + m.max_len * d + layers * block + 2 * d
  block = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * f
  return v * d + layers * block + d + (0 if m.tie_embeddings else d * v)


@pytest.mark.parametrize('variant', ['tiny', 'nanogpt_cpu'] + sorted(HF_PARAM_COUNTS))
def test_parameter_counts(decoder_config, variant):
  config = decoder_config(variant)
  count = models.count_params(decoder, config.model)
  assert count == _closed_form_count(config.model)
  if variant in HF_PARAM_COUNTS:
    assert count == HF_PARAM_COUNTS[variant]


@pytest.mark.parametrize('variant, expected', [
    # Kaplan et al. (2020) count GPT-2 small as 85M non-embedding parameters.
    ('gpt2_small', 85_056_000),
    ('tiny', 4 * (2 * 128 + 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 352) + 128),
    ('llama2_7b', 6_738_415_616 - 2 * 32000 * 4096),  # Untied: embedding and output layer.
])
def test_non_embedding_parameters_leave_out_vocabulary_and_position_tables(decoder_config,
                                                                           variant, expected):
  config = decoder_config(variant)
  non_embedding = (models.count_params(decoder, config.model)
                   - models.count_embedding_params(decoder, config.model))
  assert non_embedding == expected


def _assert_one_sentence(error, *fragments):
  message = str(error)
  assert '\n' not in message and message.endswith('.'), message
  for fragment in fragments:
    assert fragment in message, message


@pytest.mark.parametrize('edit, num_devices, fragments', [
    (dict(model=dict(num_heads=5)), 1, ('num_heads=5', 'emb_dim=128')),
    (dict(model=dict(num_kv_heads=3)), 1, ('num_kv_heads=3',)),
    (dict(mesh=dict(data=2, fsdp=2, tensor=1)), 8, ('data*fsdp*sequence*tensor equal 8',)),
    (dict(mesh=dict(data=2, sequence=3, tensor=1)), 6, ('seq_len=128', 'mesh.sequence=3')),
    (dict(mesh=dict(data=4, dcn_data=3)), 4, ('mesh.dcn_data=3 must be a positive divisor',)),
    (dict(mesh=dict(data=4, dcn_data=2)), 4, ('spans 2 slices', 'the job has 1')),
    (dict(watchdog=dict(slow_factor=1.0)), 1, ('config.watchdog needs slow_factor > 1',)),
    (dict(mesh=dict(data=-1, fsdp=3, tensor=1)), 8, ('no whole size',)),
    (dict(mesh=dict(data=-1, fsdp=-1)), 8, ('Only one mesh axis',)),
    (dict(train=dict(batch_size=12)), 8, ('batch_size=12', 'multiple of 8')),
    (dict(optim=dict(grad_accum_steps=4), train=dict(batch_size=16)), 8, ('multiple of 32',)),
    (dict(mesh=dict(data=1, tensor=8)), 8, ('mesh.tensor=8',)),
    (dict(model=dict(style='gpt3')), 1, ("'gpt3'", 'gpt2')),
    (dict(optim=dict(decay='exp')), 1, ('optim.decay',)),
    (dict(train=dict(seq_len=1024)), 1, ('max_len=256',)),
    (dict(checkpoint=dict(every_steps=0)), 1, ('checkpoint.every_steps must be positive',)),
    (dict(checkpoint=dict(keep=0)), 1, ('checkpoint.keep must be positive',)),
    (dict(train=dict(log_every=0)), 1, ('train.log_every must be positive',)),
    (dict(train=dict(eval_every=-5)), 1, ('train.eval_every must be positive',)),
    (dict(train=dict(eval_batches=0)), 1, ('train.eval_batches must be positive',)),
    (dict(optim=dict(lr=0.0)), 1, ('optim.lr must be positive',)),
    (dict(optim=dict(clip_norm=-1.0)), 1, ('optim.clip_norm must not be negative',)),
    (dict(optim=dict(lr=float('nan'))), 1, ('optim.lr=nan is not a finite number',)),
    (dict(optim=dict(lr=float('inf'))), 1, ('optim.lr=inf is not a finite number',)),
    (dict(optim=dict(clip_norm=float('nan'))), 1, ('optim.clip_norm=nan is not a finite number',)),
    (dict(model=dict(dropout_rate=1.0)), 1, ('dropout_rate=1.0 must lie in [0, 1)',)),
    (dict(model=dict(dropout_rate=-0.1)), 1, ('dropout_rate=-0.1 must lie in [0, 1)',)),
    (dict(data=dict(tokenizer='sentencepiece')), 1, ("data.tokenizer='sentencepiece'", 'bytes')),
    (dict(data=dict(source='c4')), 1, ("data.source='c4'", 'stdlib')),
    (dict(optim=dict(name='sgd')), 1, ("optim.name='sgd'", 'adamw')),
    (dict(train=dict(sample_tokens=300)), 1, ('sample_tokens=300', 'max_len=256')),
    (dict(train=dict(num_steps=20, profile_start_step=18)), 1,
     ('profile_start_step=18 traces 5 steps', "last step (20)", 'start by step 15')),
    (dict(train=dict(num_steps=20, profile_start_step=50)), 1, ('profile_start_step=50',)),
    (dict(train=dict(profile_num_steps=0)), 1, ('train.profile_num_steps must be positive',)),
    (dict(train=dict(num_steps=20, profile_start_step=0, profile_num_steps=30)), 1,
     ('past the run\'s last step (20); raise train.num_steps or trace fewer steps',)),
])
def test_validation_errors_are_one_sentence(decoder_config, edit, num_devices, fragments):
  config = decoder_config('tiny')
  for section, values in edit.items():
    for key, value in values.items():
      config[section][key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices)
  _assert_one_sentence(error.value, *fragments)


def test_negative_seed_is_refused(decoder_config):
  config = decoder_config('tiny')
  config.seed = -1
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  _assert_one_sentence(error.value, 'config.seed must not be negative, got -1')


@pytest.mark.parametrize('key, name', [('name', 'sgd'), ('decay', 'exponential')])
def test_the_optimizer_builder_refuses_unknown_names(decoder_config, key, name):
  config = decoder_config('tiny')
  config.optim[key] = name  # Past validation: no branch may take an unknown name for another.
  with pytest.raises(config_lib.ConfigError) as error:
    optim.make_optimizer(config.optim, num_steps=100)
  _assert_one_sentence(error.value, f'config.optim.{key}={name!r} is not one of')


def test_valid_config_resolves_the_auto_axis(decoder_config):
  config = decoder_config('tiny')
  config.mesh.tensor = 2
  assert config_lib.validate(config, 8) == dict(data=4, fsdp=1, sequence=1, tensor=2)


def test_config_is_locked_against_new_keys(decoder_config):
  config = decoder_config('tiny')
  with pytest.raises(AttributeError):
    config.model.num_layrs = 3


def _train_cli(*args):
  return subprocess.run([sys.executable, '-m', 'research.train', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_misspelt_command_line_key_names_the_closest_valid_keys(tmp_path):
  result = _train_cli('--config', 'configs/decoder.py:tiny', '--workdir', str(tmp_path),
                      '--config.model.num_layrs=3')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines == ["error: Unknown config key 'model.num_layrs'; closest valid keys: "
                   'model.num_layers, model.num_labels, model.scan_layers.'], result.stderr
  assert not os.listdir(tmp_path)  # Nothing is written by a run that fails at start.


@pytest.mark.parametrize('spec, fragment', [
    ('configs/decoder.py:tinyy', "Unknown decoder variant 'tinyy'; choose one of"),
    ('configs/nope.py:tiny', "Config file 'configs/nope.py' does not exist"),
    ('configs/finetune.py:csv,rnn.lstm_tiny', 'objective.name=classification needs a family with '
     "a classification head; model.family='rnn' has none."),
])
def test_bad_config_file_or_variant_is_one_sentence(tmp_path, spec, fragment):
  result = _train_cli('--config', spec, '--workdir', str(tmp_path))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {fragment}'), result.stderr[-2000:]


def _plan_error(*args):
  """The one-sentence error of `research.plan args...`, run in this process (it stops before
  compiling anything)."""
  import runs
  return runs.error_line(runs.in_process('research.plan', *args))


@pytest.mark.parametrize('spec, sentence', [
    ('README.md', '--config README.md is not a Python config file (a .py file with '
                  'get_config()); pass --config configs/<family>.py:VARIANT.'),
    ('configs', '--config configs is a folder, not a Python config file (a .py file with '
                'get_config()); pass --config configs/<family>.py:VARIANT.'),
    ('configs/__init__.py:x', '--config configs/__init__.py defines no get_config(), so it is '
                              'not a config file; pass --config configs/<family>.py:VARIANT.'),
    ('configs/decoder.py:', "--config configs/decoder.py: has an empty variant after its colon; "
                            "name one (configs/decoder.py:VARIANT) or drop the colon for the "
                            "file's default."),
])
def test_a_config_argument_that_names_no_config_is_one_sentence(spec, sentence):
  assert _plan_error(f'--config={spec}') == f'error: {sentence}'


def test_a_python_file_that_importlib_cannot_load_is_one_sentence():
  # Sweep files come through here too, with no check of their own for the kind of file.
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.python_file(os.path.join(REPO, 'README.md'), '_not_python')
  assert str(error.value) == (f'{os.path.join(REPO, "README.md")} is not a Python file; pass the '
                              'path of a .py file.')


@pytest.mark.parametrize('source, sentence', [
    ('def get_config(:\n', '{path} is not valid Python ({path}, line 1: invalid syntax); correct '
                           'that line.'),
    ('import ml_collections\n\ndef get_config():\n  return 1 / 0\n',
     '{path} failed while it ran at {path}, line 4 (ZeroDivisionError: division by zero); '
     'correct the file.'),
    ('import no_such_module_here\n', "{path} failed while it ran at {path}, line 1 "
     "(ModuleNotFoundError: No module named 'no_such_module_here'); correct the file."),
    ('def get_config():\n  return {}\n', "get_config() in {path} returned 'dict', not an "
     'ml_collections.ConfigDict; return one.'),
])
def test_a_config_file_that_fails_as_it_runs_is_one_sentence_naming_the_line(tmp_path, source,
                                                                              sentence):
  path = tmp_path / 'mine.py'
  path.write_text(source)
  assert _plan_error(f'--config={path}') == 'error: ' + sentence.format(path=path)


@pytest.mark.parametrize('argument, sentence', [
    ('--config.nonexistent=1',
     "Unknown config key 'nonexistent' and none is close; set a key of one of the sections "
     'checkpoint, data, mesh, model, objective, optim, train, watchdog '
     '(--config.SECTION.KEY=VALUE) or one of the keys seed, variant.'),
    ('--config.trian=1', "Unknown config key 'trian'; closest valid keys: train.*, variant."),
    ('--config.model=1',
     "Config key 'model' is a section, not a value; set one of its keys instead "
     '(--config.model.KEY=VALUE, KEY one of attention, dropout_rate, dtype, emb_dim, family, '
     'head_dim, max_len, mlp_dim, norm_eps, num_heads, num_kv_heads, num_labels, num_layers, '
     'param_dtype, remat, rope_theta, scan_layers, style, tie_embeddings, vocab_size).'),
    ('--config.optim.zzzzzzzz=1',
     "Unknown config key 'optim.zzzzzzzz', and section 'optim' has none like it; set one of "
     'optim.b1, optim.b2, optim.clip_norm, optim.decay, optim.decay_embeddings, '
     'optim.decay_norms_and_biases, optim.end_lr_ratio, optim.eps, optim.grad_accum_steps, '
     'optim.lr, optim.mu_dtype, optim.name, optim.warmup_steps, optim.weight_decay.'),
    ('--config.lr=1', "Unknown config key 'lr'; closest valid keys: optim.lr."),
])
def test_an_unknown_config_key_names_what_could_be_set_instead(argument, sentence):
  assert _plan_error('--config=configs/decoder.py:tiny', argument) == f'error: {sentence}'


@pytest.mark.parametrize('argument, sentence', [
    ('--config.train.batch_size=many', '--config.train.batch_size=many is not a valid value (an '
                                       'integer is expected); correct that flag.'),
    ('--config.optim.lr=fast', '--config.optim.lr=fast is not a valid value (a number is '
                               'expected); correct that flag.'),
    ('--workdri=/tmp/x', 'Unknown flag --workdri; the closest is --workdir.'),
    ('stray', "Unexpected argument 'stray'; every input is a flag (--name=value)."),
    ('--writers=3', '--writers does not apply here; drop it (the flags are --config, --workdir, '
                    '--cpu_devices).'),
    ('--mesh=fsdp=2', '--mesh does not apply here; set the mesh with --config.mesh.<axis>=SIZE.'),
    ('--cpu_devices=-2', '--cpu_devices=-2 must not be negative (0 keeps one CPU device).'),
])
def test_bad_command_line_flags_are_one_sentence(tmp_path, argument, sentence):
  result = _train_cli('--config', 'configs/decoder.py:tiny', '--workdir', str(tmp_path), argument)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines == [f'error: {sentence}'], lines


def test_an_override_before_the_config_is_one_sentence(tmp_path):
  assert _plan_error('--config.data.paths=a b', '--config=configs/decoder.py:tiny') == (
      'error: --config.data.paths comes before --config; put the overrides after it.')
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text('--config.train.num_steps=3\n')
  assert _plan_error(f'--flagfile={flagfile}', '--config=configs/decoder.py:tiny') == (
      'error: --config.train.num_steps comes from a --flagfile given before --config; put the '
      '--flagfile after it.')


def test_overrides_in_a_flagfile_apply_and_are_checked_as_on_the_command_line(tmp_path):
  from absl import flags
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text('--config.train.num_steps=7\n--noconfig.train.progress_bar\n')
  try:
    config = config_lib.parse_flags(['train', '--config=configs/decoder.py:tiny',
                                     f'--flagfile={flagfile}'], 'usage', ('workdir',))
    assert (config.train.num_steps, config.train.progress_bar) == (7, False)
  finally:
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):
      if name.startswith('config.'):
        delattr(flags.FLAGS, name)
  for line, sentence in [
      ('--config.train.steps=3', "Unknown config key 'train.steps'; closest valid keys: "
                                 'train.num_steps.'),
      ('--config.objective.alpha=0.2',
       'objective.alpha is not read by objective.name=causal_lm, which reads no objective setting '
       'besides its name; drop it, or set objective.name to one that reads it (distill).')]:
    flagfile.write_text(line + '\n')
    assert _plan_error('--config=configs/decoder.py:tiny',
                       f'--flagfile={flagfile}') == f'error: {sentence}'
  assert _plan_error('--config=configs/decoder.py:tiny', f'--flagfile={tmp_path}/none.txt') == (
      f"error: The --flagfile cannot be read (No such file or directory: '{tmp_path}/none.txt'); "
      'correct it.')


@pytest.mark.parametrize('command, listed', [
    (('research.plan',), ['--config', '--mesh', '--topology', '--plan_json', '--cpu_devices']),
    (('research.data.pretokenize',), ['--config', '--writer', '--writers']),
    (('research.sample',), ['--workdir', '--prompt', '--input', '--prompt_ids', '--max_new_tokens',
                            '--temperature', '--top_k', '--top_p', '--seed', '--num_beams',
                            '--length_penalty', '--mesh', '--cpu_devices']),
    (('research.convert', 'to_hf'), ['--workdir', '--out', '--overwrite']),
    (('research.convert',), ['--workdir', '--out']),  # Every command's; `layout` is the last.
    (('research.bench', 'table'), ['--results', '--markdown']),
])
def test_every_command_answers_help_with_its_own_flags(command, listed):
  import runs
  result = runs.ok(runs.in_process(*command, '--help'))
  flags_listed = [line.split(':')[0].strip() for line in result.stdout.split('flags:\n')[-1]
                  .splitlines() if line.startswith('  --')]
  assert flags_listed == listed


def test_convert_help_names_every_hugging_face_model_type_it_converts():
  from research import convert
  from research import models
  usage = convert.__doc__.split('\n\n')[0].lower().replace('-', '')
  for name in models.FAMILIES:
    for model_type in getattr(models.get(name), 'HF_MODEL_TYPES', ()):
      assert model_type in usage, model_type


def test_help_prints_the_usage_and_the_flags_of_the_command():
  result = _train_cli('--help')
  assert result.returncode == 0 and result.stderr == ''
  assert result.stdout.startswith('Training entry point: pretraining and fine-tuning')
  flags_listed = [line.split(':')[0].strip() for line in result.stdout.split('flags:\n')[1]
                  .splitlines() if line.startswith('  --')]
  assert flags_listed == ['--config', '--workdir', '--cpu_devices']
  assert '  --cpu_devices: On a CPU-only host, split the CPU into this many JAX devices' in (
      result.stdout)


def _schedule_config(decay, lr=1.0, warmup=10, end_lr_ratio=0.1):
  return ConfigDict(dict(lr=lr, warmup_steps=warmup, decay=decay, end_lr_ratio=end_lr_ratio))


@pytest.mark.parametrize('decay, closed_form', [
    ('cosine', lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90))),
    ('linear', lambda s: 1 - 0.9 * (s - 10) / 90),
    ('rsqrt', lambda s: math.sqrt(10 / s)),
    ('constant', lambda s: 1.0),
])
def test_schedules_match_closed_forms(decay, closed_form):
  schedule = optim.learning_rate_schedule(_schedule_config(decay), num_steps=100)
  for step in (0, 5):  # Linear warm-up from zero.
    assert float(schedule(step)) == pytest.approx(step / 10, abs=1e-6)
  for step in (10, 11, 37, 64, 99, 100):
    assert float(schedule(step)) == pytest.approx(closed_form(step), rel=1e-5), step


def test_weight_decay_mask_leaves_norms_biases_and_embeddings_alone(decoder_config):
  config = decoder_config('nanogpt_cpu')
  config.model.scan_layers = True  # Stacked blocks: one path per kind of parameter.
  model = decoder.build(config.model)
  params = nn.meta.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32), method='initialize'))['params'])
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['layers']['mlp']['fc']['kernel']"] is True
  assert flat["['layers']['attn']['query']['kernel']"] is True
  for name in ("['layers']['mlp']['fc']['bias']", "['layers']['attn_norm']['scale']",
               "['final_norm']['bias']", "['token_embed']['embedding']",
               "['position_embed']['embedding']"):
    assert flat[name] is False, name
  opted_in = optim.weight_decay_mask(params, decay_embeddings=True, decay_norms_and_biases=True)
  assert all(jax.tree.leaves(opted_in))


def test_weight_decay_mask_is_applied_by_adamw(decoder_config):
  config = decoder_config('tiny')
  config.optim.weight_decay = 0.5
  tx, _ = optim.make_optimizer(config.optim, num_steps=100)
  params = dict(mlp=dict(kernel=jnp.ones((2, 2)), bias=jnp.ones(2)), norm=dict(scale=jnp.ones(2)))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(config.optim.warmup_steps + 1):
    updates, state = tx.update(zero_grads, state, params)
  assert np.all(np.asarray(updates['mlp']['kernel']) < 0)  # Decayed towards zero.
  np.testing.assert_array_equal(updates['mlp']['bias'], 0.0)
  np.testing.assert_array_equal(updates['norm']['scale'], 0.0)



def test_every_command_module_imports_together():
  """The entry points share absl's global flags; none may define a flag twice."""
  import research.bench  # noqa: F401
  import research.convert  # noqa: F401
  import research.plan  # noqa: F401
  import research.sample  # noqa: F401
  import research.train  # noqa: F401


@pytest.mark.parametrize('spec, family, missing', [
    ('encoder.py:bert_tiny', 'encoder_decoder', 'activation'),
    ('encoder_decoder.py:t5_tiny', 'decoder', 'style'),
    ('encoder.py:bert_tiny', 'rnn', 'cell'),
    ('decoder.py:tiny', 'ngram', 'order'),
    ('encoder.py:bert_tiny', 'word_vectors', 'biases'),  # Found by the objective's check.
])
def test_another_familys_config_cannot_be_switched_over(spec, family, missing):
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                    spec))
  config.model.family = family
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert str(error.value) == (
      f'model.family={family} needs model settings this config does not have (model.{missing}): '
      f"another family's config cannot be switched over, nor a config of an earlier version; "
      f'start from a variant of configs/{family}.py.')


@pytest.mark.parametrize('spec, metric, mode, better', [
    ('encoder.py:bert_tiny', 'eval_loss', 'max', 'min'),
    ('encoder.py:bert_tiny', 'eval_nsp_accuracy', 'min', 'max'),
    ('decoder.py:tiny', 'eval_perplexity', 'max', 'min')])
def test_a_best_mode_that_would_keep_the_worst_checkpoint_is_refused(spec, metric, mode, better):
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                    spec))
  config.checkpoint.best_metric, config.checkpoint.best_mode = metric, mode
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert str(error.value).startswith(f'checkpoint.best_metric={metric} is better when ')
  assert str(error.value).endswith(f'would keep the worst checkpoint; set '
                                   f'checkpoint.best_mode={better}.')
  config.checkpoint.best_mode = better
  config_lib.validate(config, 1)


@pytest.mark.parametrize('spec', ['encoder_decoder.py:t5_tiny',
                                  'rnn_seq2seq.py:gru_attention_tiny', 'encoder.py:bert_tiny'])
def test_causal_lm_refuses_a_family_that_does_not_predict_the_next_token(spec):
  config = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), '..', 'configs',
                                                    spec))
  config.objective.name = 'causal_lm'
  with pytest.raises(config_lib.ConfigError, match=r'^objective.name=causal_lm needs a family '
                     r'that predicts the next token; model.family=.* does not \(start from '
                     r'a variant of configs/decoder.py\)\.$'):
    config_lib.validate(config, 1)
