"""Hugging Face interop for GPT-2 and Llama checkpoints (safetensors + config.json).

  python -m research.convert from_hf --model_dir HF_DIR --workdir OUT
      writes a workdir of ours (config.json + an orbax checkpoint at step 0 with a fresh optimizer
      state) that research.train resumes from and research.sample reads;
  python -m research.convert to_hf --workdir DIR --out HF_DIR
      writes the newest checkpoint of a run as a directory that `transformers` loads.
"""

import os
import sys

import jax
import numpy as np
from absl import flags

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import hf
from research import mesh as mesh_lib
from research import optim
from research import train_state
from research import workdir as workdir_lib
from research.models import decoder

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Hugging Face model directory (from_hf).')
_OUT = flags.DEFINE_string('out', None, 'Output Hugging Face directory (to_hf).')

_BASE_VARIANT = {'gpt2': 'gpt2_small', 'llama': 'llama_1b'}
_CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'configs', 'decoder.py')


def config_for_hf(hf_config):
  """Our decoder config for a Hugging Face config.json (sizes from it, training defaults ours)."""
  overrides = hf.model_overrides_from_hf(hf_config)
  config = config_lib.load_config_file(f'{_CONFIG_FILE}:{_BASE_VARIANT[overrides["style"]]}')
  config.model.update(overrides)
  # Compute in the checkpoint's own precision class; parameters stay float32.
  stored = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  config.model.dtype = 'bfloat16' if stored in ('bfloat16', 'float16') else 'float32'
  config.train.seq_len = min(config.train.seq_len, config.model.max_len)
  return config


def from_hf(model_dir, workdir):
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise checkpoint_lib.CheckpointError(f'{workdir} already holds checkpoints; pass an empty '
                                         '--workdir so that nothing saved is overwritten.')
  hf_config, tensors = hf.read_model_dir(model_dir)
  config = config_for_hf(hf_config)
  params = hf.params_from_hf(tensors, config.model)
  if not config.model.scan_layers:
    params = hf.unstack_layers(params, config.model.num_layers)

  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  model = decoder.build(config.model)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  example = np.zeros((1, config.train.seq_len), np.int32)
  state, shardings = train_state.create(model, tx, mesh, example, jax.random.key(config.seed))
  _check_tree(params, state.params)
  # Into the initialised parameters' dtype (config.model.param_dtype) and shardings.
  params = jax.tree.map(lambda x, ref, s: jax.device_put(x.astype(ref.dtype), s), params,
                        state.params, shardings.params)
  state = state.replace(params=params)

  config_lib.record_run(config, workdir, data=dict(source='huggingface', model_dir=model_dir))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), 1, None)
  record = dict(step=0, dropout_rng=checkpoint_lib.rng_to_record(jax.random.key(config.seed)),
                data=dict(next_step=0, rows_consumed=0),
                param_shapes=checkpoint_lib.param_shapes(state.params))
  checkpointer.maybe_save(0, state, lambda: record, final=True)
  checkpointer.wait()
  checkpointer.close()
  return config


def _check_tree(converted, expected):
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(converted)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  if got != want:
    name = sorted(set(got) ^ set(want) or {k for k in got if got[k] != want[k]})[0]
    raise hf.ConversionError(f'Converted parameter {name} does not fit the model built from '
                             f'config.json (shape {got.get(name)} vs {want.get(name)}).')


def to_hf(workdir, out_dir):
  config, params, _ = workdir_lib.load_params(workdir)
  params = hf.stack_layers(jax.tree.map(np.asarray, params), config.model.num_layers)
  hf.write_model_dir(out_dir, hf.hf_config_from_model(config.model),
                     hf.params_to_hf(params, config.model))


def main(argv):
  usage = ('usage: python -m research.convert from_hf --model_dir DIR --workdir OUT | '
           'to_hf --workdir DIR --out OUT')
  if len(argv) < 2 or argv[1] not in ('from_hf', 'to_hf'):
    print(usage, file=sys.stderr)
    return 2
  flags.FLAGS([argv[0]] + argv[2:])
  try:
    if argv[1] == 'from_hf':
      if not (_MODEL_DIR.value and config_lib.WORKDIR.value):
        raise hf.ConversionError('from_hf needs --model_dir and --workdir.')
      from_hf(_MODEL_DIR.value, config_lib.WORKDIR.value)
      print(f'wrote {config_lib.WORKDIR.value}')
    else:
      if not (config_lib.WORKDIR.value and _OUT.value):
        raise hf.ConversionError('to_hf needs --workdir and --out.')
      to_hf(config_lib.WORKDIR.value, _OUT.value)
      print(f'wrote {_OUT.value}')
  except (hf.ConversionError, checkpoint_lib.CheckpointError, config_lib.ConfigError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
