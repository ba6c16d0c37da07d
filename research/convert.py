"""Hugging Face interop (safetensors + config.json) for every family with a converter: GPT-2 and
Llama (decoder), BERT, RoBERTa and ALBERT (encoder), T5 v1.0, T5 v1.1 and ByT5 (encoder-decoder).

  python -m research.convert from_hf --model_dir HF_DIR --workdir OUT
      writes a workdir of ours (config.json + an orbax checkpoint at step 0 with a fresh optimizer
      state, and the model's tokenizer.json, when it has one, saved in OUT/tokenizer) that
      research.train resumes from and research.sample reads;
  python -m research.convert to_hf --workdir DIR --out HF_DIR [--overwrite]
      writes the newest checkpoint of a run as a directory that `transformers` loads, in the
      checkpoint's dtype, with the special-token ids and a generation_config.json;
  python -m research.convert layout --workdir DIR --out NEW_DIR
      writes the newest checkpoint of a run (parameters, optimizer state, data position) as a
      new workdir in the other layer layout (model.scan_layers flipped: stacked <-> per layer);
      training resumes there exactly, with --config.model.scan_layers set to the new value.

Every input is checked before anything is converted; a bad one stops with one sentence.
"""

import os
import sys

import jax
import ml_collections
import numpy as np
from absl import flags

from research import checkpoint as checkpoint_lib
from research import cli
from research import config as config_lib
from research import hf
from research import layout
from research import mesh as mesh_lib
from research import models
from research import optim
from research import train_state
from research import workdir as workdir_lib
from research.data import tokenizer as tokenizer_lib

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Hugging Face model directory (from_hf).')
_OUT = flags.DEFINE_string('out', None, 'Output directory: a Hugging Face model (to_hf) or a new '
                           'workdir (layout).')
_OVERWRITE = flags.DEFINE_boolean('overwrite', False, 'to_hf: replace config.json, '
                                  'generation_config.json and model.safetensors in a non-empty '
                                  '--out.')

_COMMANDS = {'from_hf': ('model_dir', 'workdir'), 'to_hf': ('workdir', 'out', 'overwrite'),
             'layout': ('workdir', 'out')}

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _family_for(model_type):
  """(family name, family module) whose converter reads Hugging Face `model_type`."""
  supported = []
  for name in models.FAMILIES:
    family = models.get(name)
    supported += getattr(family, 'HF_MODEL_TYPES', ())
    if model_type in getattr(family, 'HF_MODEL_TYPES', ()):
      return name, family
  raise hf.ConversionError(f'Hugging Face config field model_type={model_type!r} is not '
                           f'supported (supported: {sorted(supported)}).')


def config_for_hf(hf_config):
  """Our config for a Hugging Face config.json (sizes from it, training defaults ours)."""
  name, family = _family_for(hf_config.get('model_type'))
  overrides = family.hf_converter().model_overrides_from_hf(hf_config)
  variant = family.HF_BASE_VARIANTS[hf_config['model_type']]
  config = config_lib.load_config_file(os.path.join(_CONFIGS, f'{name}.py:{variant}'))
  config.model.update(overrides)
  # Compute in the checkpoint's own precision class; parameters stay float32.
  stored = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  config.model.dtype = 'bfloat16' if stored in ('bfloat16', 'float16') else 'float32'
  config.train.seq_len = min(config.train.seq_len, config.model.max_len)
  if config.objective.name == 'mlm':  # Its pair task is the imported model's head, if any.
    config.objective.pair = config.model.pair_head
    config.objective.max_predictions = min(config.objective.max_predictions, config.train.seq_len)
  config.train.sample_tokens = 0  # Its tokenizer is not ours: no text sample after training.
  return config


def from_hf(model_dir, workdir):
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise checkpoint_lib.CheckpointError(f'{workdir} already holds checkpoints; pass an empty '
                                         '--workdir so that nothing saved is overwritten.')
  cli.check_folder(workdir, '--workdir')
  if os.path.realpath(workdir) == os.path.realpath(model_dir):
    raise hf.ConversionError(f'--workdir {workdir} is the model directory, whose config.json it '
                             'would shadow; pass a new folder.')
  hf_config, tensors = hf.read_model_dir(model_dir)
  generation_config = hf.read_generation_config(model_dir)
  config = config_for_hf(hf_config)
  tokenizer = _hf_tokenizer(model_dir, config)
  saved = os.path.join(os.path.abspath(workdir), tokenizer_lib.SAVED_DIR)
  if tokenizer is not None:  # The workdir's own copy: the run does not depend on model_dir.
    config.data.tokenizer = tokenizer_lib.HF_PREFIX + saved
    config.data.extra_ids = 0  # Its sentinels, if any, are its own tokens.
  config_lib.validate(config, jax.device_count())
  params = workdir_lib.family(config).hf_converter().params_from_hf(tensors, config.model)
  os.makedirs(workdir, exist_ok=True)
  hf.write_source(workdir, model_dir, hf_config, generation_config)
  if tokenizer is not None:
    tokenizer_lib.save(tokenizer, saved)
  write_workdir(config, params, workdir, data=dict(source='huggingface', model_dir=model_dir))
  return config


def _hf_tokenizer(model_dir, config):
  """The model's own tokenizer.json (None when the directory has none; text then goes in as
  ids, see research.sample); it must fit the model's embedding."""
  if not os.path.isfile(os.path.join(model_dir, 'tokenizer.json')):
    return None
  tokenizer = tokenizer_lib.get(tokenizer_lib.HF_PREFIX + os.path.abspath(model_dir))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise hf.ConversionError(f'The tokenizer.json in {model_dir} has {tokenizer.vocab_size} '
                             f'tokens but the model\'s embedding only {config.model.vocab_size}; '
                             'use the tokenizer the model was published with.')
  return tokenizer


def write_workdir(config, params, workdir, data):
  """Saves layer-stacked numpy `params` in `workdir` as step 0 of a run of `config` (resolved
  config, environment record with `data`, checkpoint with a fresh optimizer state)."""
  if not config.model.scan_layers:
    params = layout.convert(params, scan_layers=False)
  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  family = workdir_lib.family(config)
  model = family.build(config.model)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  state, shardings = train_state.create(model, tx, mesh, family.init_inputs(config.train.seq_len),
                                        jax.random.key(config.seed))
  _check_tree(params, state.params)
  # Into the initialised parameters' dtype (config.model.param_dtype) and shardings.
  params = jax.tree.map(lambda x, ref, s: jax.device_put(x.astype(ref.dtype), s), params,
                        state.params, shardings.params)
  state = state.replace(params=params)

  config_lib.record_run(config, workdir, data=data, resumed=False)  # A new state.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None)
  checkpointer.save(0, state, checkpoint_lib.make_record(
      0, jax.random.key(config.seed), dict(next_step=0, rows_consumed=0), config))
  checkpointer.wait()
  checkpointer.close()


def _check_tree(converted, expected):
  def shapes(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.shape(x) for path, x in leaves}
  got, want = shapes(converted), shapes(expected)
  if got != want:
    name = sorted(set(got) ^ set(want) or {k for k in got if got[k] != want[k]})[0]
    raise hf.ConversionError(f'Converted parameter {name} does not fit the model built from '
                             f'config.json (shape {got.get(name)} vs {want.get(name)}).')


def _check_out(workdir, out_dir, overwrite):
  if not os.path.isdir(workdir):
    raise hf.ConversionError(f'--workdir {workdir} is not a directory; pass the workdir of a '
                             'training run or of research.convert from_hf.')
  run, out = os.path.realpath(workdir), os.path.realpath(out_dir)  # Links and `..` resolved.
  if os.path.commonpath([run, out]) == run:
    raise hf.ConversionError(f'--out {out_dir} lies in the run\'s own --workdir {workdir}, whose '
                             'files it would overwrite; pass a folder outside it.')
  cli.check_folder(out_dir, '--out')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise hf.ConversionError(f'--out {out_dir} is not empty; pass a new or empty folder, or '
                             '--overwrite to replace its config.json, generation_config.json '
                             'and model.safetensors.')


def _special_tokens(workdir, config):
  """(config.json ids, generation_config.json) for the export.

  A workdir converted from Hugging Face keeps the ids (and generation config) it came with (see
  hf.SOURCE_FILE), so that a round trip returns them; any other run used our tokenizer.
  """
  source = hf.read_source(workdir)
  if source is not None:
    ids = dict(source['special_tokens'])
    generation = source['generation_config'] or dict(ids)
    filler = next((i for i in (ids.get('pad_token_id'), ids.get('eos_token_id')) if i is not None),
                  0)
  else:
    tokenizer = workdir_lib.tokenizer(workdir, config)
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
               pad_token_id=tokenizer.pad_id)
    generation, filler = dict(ids), tokenizer_lib.filler_id(tokenizer)
  if getattr(workdir_lib.family(config), 'IS_ENCODER_DECODER', False):
    # Our decoders start from the filler id (research/objectives/text_to_text.py).
    ids['decoder_start_token_id'] = filler
    generation = dict(generation, decoder_start_token_id=filler)
  return ids, generation


def to_hf(workdir, out_dir, overwrite=False):
  _check_out(workdir, out_dir, overwrite)
  saved = workdir_lib.load_config(workdir)
  if saved.model.get('num_labels', 0) > 0:  # The converters write language models only.
    raise hf.ConversionError(f'{workdir} holds a classifier (model.num_labels='
                             f'{saved.model.num_labels}), and the Hugging Face export writes '
                             'pretrained models only; export the run it was fine-tuned from.')
  ids, generation_config = _special_tokens(workdir, saved)
  config, params, _ = workdir_lib.load_params(workdir)
  family = workdir_lib.family(config)
  converter = getattr(family, 'hf_converter', None)
  if converter is None:
    raise hf.ConversionError(f'model.family={config.model.family!r} has no Hugging Face '
                             'converter.')
  # np.asarray keeps the checkpoint's dtype (bfloat16 too, as an ml_dtypes array).
  params = layout.convert(params, scan_layers=True)
  # The model's own fields win (RoBERTa's pad_token_id sets its position offset).
  hf.write_model_dir(out_dir, dict(ids, **converter().hf_config_from_model(config.model)),
                     converter().params_to_hf(params, config.model),
                     generation_config if getattr(family, 'GENERATES_TEXT', False) else None)


def change_layout(workdir, out_dir):
  """The newest checkpoint of `workdir` into a new workdir `out_dir` in the other layer layout;
  returns the new config."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise hf.ConversionError(f'--out {out_dir} is not empty; pass a new or empty folder for the '
                             'converted run.')
  _check_out(workdir, out_dir, overwrite=False)
  config = workdir_lib.load_config(workdir)
  if 'scan_layers' not in config.model:  # Recurrent, counted and word-vector models.
    raise hf.ConversionError(f'model.family={config.model.family} has no stack of layers whose '
                             'layout could change (no model.scan_layers); its run resumes as it '
                             'is.')
  if config.optim.name == 'adafactor':  # Its factored moments are not stacked per layer.
    raise hf.ConversionError('The layout of a run trained with optim.name=adafactor cannot be '
                             'changed (its factored second moments are not kept per layer); '
                             'resume it with its own model.scan_layers.')
  family = workdir_lib.family(config)
  source = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None)
  try:
    if source.latest_step() is None:
      raise checkpoint_lib.CheckpointError(f'{workdir} holds no finished checkpoint.')
    # Every device holds a part of the state (fsdp), without the run's own mesh or its checks.
    mesh = mesh_lib.make_mesh({mesh_lib.FSDP: jax.device_count()})
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
    abstract, shardings = train_state.abstract(family.build(config.model), tx, mesh,
                                               family.init_inputs(config.train.seq_len))
    state, record = source.restore(abstract, shardings, checkpoint_lib.settings(config))
  finally:
    source.close()
  new = ml_collections.ConfigDict(config.to_dict())
  new.model.scan_layers = not config.model.scan_layers
  state = layout.convert(state, new.model.scan_layers)
  tx, _ = optim.make_optimizer(new.optim, new.train.num_steps)
  new_abstract, new_shardings = train_state.abstract(family.build(new.model), tx, mesh,
                                                     family.init_inputs(new.train.seq_len))
  _check_tree(state.params, new_abstract.params)
  state = jax.device_put(state, new_shardings)
  config_lib.record_run(new, out_dir, data=dict(source='layout', workdir=workdir))
  target = checkpoint_lib.Checkpointer(os.path.join(out_dir, 'checkpoints'), keep=None)
  try:
    target.save(record['step'], state, checkpoint_lib.make_record(
        record['step'], checkpoint_lib.rng_from_record(record), record['data'], new))
    target.wait()
  finally:
    target.close()
  return new


def main(argv):
  try:
    command = argv[1] if len(argv) > 1 else None
    if command not in _COMMANDS and any(a in config_lib.HELP_FLAGS for a in argv):
      print(config_lib.commands_help_text(__doc__, _COMMANDS))
      return 0
    if command not in _COMMANDS:
      raise ValueError('Pass a command first: from_hf --model_dir HF_DIR --workdir OUT, to_hf '
                       '--workdir DIR --out HF_DIR [--overwrite], or layout --workdir DIR --out '
                       'NEW_DIR.')
    names = _COMMANDS[command]
    config_lib.parse_command_flags([argv[0]] + argv[2:], __doc__, names)
    if command == 'from_hf':
      if not (_MODEL_DIR.value and config_lib.WORKDIR.value):
        raise ValueError('from_hf needs --model_dir and --workdir.')
      from_hf(_MODEL_DIR.value, config_lib.WORKDIR.value)
      print(f'wrote {config_lib.WORKDIR.value}')
    elif command == 'to_hf':
      if not (config_lib.WORKDIR.value and _OUT.value):
        raise ValueError('to_hf needs --workdir and --out.')
      to_hf(config_lib.WORKDIR.value, _OUT.value, _OVERWRITE.value)
      print(f'wrote {_OUT.value}')
    else:
      if not (config_lib.WORKDIR.value and _OUT.value):
        raise ValueError('layout needs --workdir and --out.')
      new = change_layout(config_lib.WORKDIR.value, _OUT.value)
      print(f'wrote {_OUT.value} with model.scan_layers={new.model.scan_layers}; resume it with '
            f'--config.model.scan_layers={new.model.scan_layers}')
  except ValueError as error:  # Includes ConversionError, CheckpointError and ConfigError.
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
