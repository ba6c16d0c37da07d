"""Helpers for tests that run `python -m research.train` as a user would, and read its workdir."""

import contextlib
import importlib
import io
import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from research import config as config_lib
from research import convert
from research import mesh as mesh_lib
from research import models
from research import train as train_lib
from research.data import global_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(root, files=20):
  root.mkdir(parents=True, exist_ok=True)
  for i in range(files):
    (root / f'f{i}.txt').write_text(''.join(f'line {j} of file {i}\n' for j in range(40 + i)))
  return root


def train_command(workdir, corpus, *overrides):
  """A small model on a text corpus, sharded over (2 data, 2 fsdp, 2 tensor), with dropout."""
  return [sys.executable, '-m', 'research.train', '--config', 'configs/decoder.py:tiny',
          '--workdir', str(workdir), '--config.data.source=text', f'--config.data.paths={corpus}',
          f'--config.data.data_dir={corpus.parent / "tfds"}', '--config.model.num_layers=2',
          '--config.model.emb_dim=64', '--config.model.mlp_dim=128',
          '--config.model.dropout_rate=0.1', '--config.train.batch_size=8',
          '--config.train.seq_len=32', '--config.train.num_steps=20', '--config.train.log_every=1',
          '--config.train.eval_every=10', '--config.train.eval_batches=1',
          '--config.checkpoint.every_steps=5', '--config.train.sample_tokens=0',
          '--config.train.progress_bar=False', '--config.mesh.data=2', '--config.mesh.fsdp=2',
          '--config.mesh.tensor=2', *overrides]


def command(module, *args):
  """`python -m module args...` run from the repository root, its output captured."""
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def in_process(module, *args):
  """`python -m module args...` called in this process (its `main`): the same checks without a
  new interpreter, for commands that stop early (bad inputs) or do little. Flags are reset before
  and after, as a fresh process would have them; sys.argv is the command's too, as the run's
  recorded command line and its resume hints read it."""
  main = importlib.import_module(module).main
  out, err = io.StringIO(), io.StringIO()
  flags.FLAGS.unparse_flags()
  saved_argv, sys.argv = sys.argv, [module, *args]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        code = main(sys.argv)
      except SystemExit as exit:  # --help, as absl's would.
        code = exit.code
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # The overrides' flags, which the next command defines anew.
      if name.startswith('config.'):
        delattr(flags.FLAGS, name)
  return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def train(workdir, corpus, *overrides):
  return command(*train_command(workdir, corpus, *overrides)[2:])


def start(workdir, corpus, *overrides):
  """The same run as a background process (for signals); stderr goes to <workdir>.log."""
  log = open(f'{workdir}.log', 'w')
  return subprocess.Popen(train_command(workdir, corpus, *overrides), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=log, text=True)


def ok(result):
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def error_line(result, code=2):
  """The last stderr line of a run that must fail with one sentence."""
  assert result.returncode == code, (result.returncode, result.stderr[-4000:])
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and last.endswith('.'), result.stderr[-4000:]
  assert 'Traceback' not in result.stderr, result.stderr[-4000:]
  assert sum(line.startswith('error: ') for line in result.stderr.splitlines()) == 1
  return last


def assert_error(result, fragment, code=2):
  """The one-sentence error of a failed run holds `fragment`."""
  line = error_line(result, code)
  assert fragment in line, line


def metrics(workdir):
  """Every line of metrics.jsonl, parsed as strict JSON (no NaN or Infinity literals)."""
  def strict(constant):
    raise ValueError(f'metrics.jsonl holds the non-JSON constant {constant}')
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line, parse_constant=strict) for line in f]


def losses(workdir):
  """{step: (loss, grad_norm, accuracy)}; a step logged twice (after a resume) keeps its last."""
  return {r['step']: (r['loss'], r['grad_norm'], r['accuracy'])
          for r in metrics(workdir) if 'loss' in r}


def params(workdir, step):
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'record'))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  manager.close()
  return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(state['params']).items()}


def assert_same_run(straight, resumed, step=20):
  """Identical metrics at every step and bitwise identical parameters at `step`."""
  straight_losses, resumed_losses = losses(straight), losses(resumed)
  assert sorted(resumed_losses) == list(range(1, step + 1))
  assert resumed_losses == straight_losses
  a, b = params(straight, step), params(resumed, step)
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == np.float32
    np.testing.assert_array_equal(a[name], b[name], err_msg=str(name))


def random_run(path, config):
  """A workdir of `config` at step 0 whose weights are drawn at random (normal, std 0.5), large
  enough that every prediction depends on them."""
  rng = np.random.default_rng(0)
  family = models.get(config.model.family)
  params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                        models.abstract_params(family, config.model))
  convert.write_workdir(config, params, str(path), data=dict(source='test'))
  return path


def train_steps(config, mesh_shape, batches):
  """(losses, final parameters) of the train step of `config` on `mesh_shape` (missing axes 1),
  one step per host batch of `batches`; each step must really update the parameters."""
  devices = jax.devices()[:math.prod(mesh_shape.values())]
  mesh_shape = {axis: mesh_shape.get(axis, 1) for axis in mesh_lib.MESH_AXES}
  for axis, size in mesh_shape.items():
    config.mesh[axis] = size
  config_lib.validate(config, len(devices))
  trainer = train_lib.setup(config, mesh_lib.make_mesh(mesh_shape, devices), pipeline=object())
  state, losses = trainer.state, []
  for batch in batches:
    state, metrics = trainer.train_step(
        state, global_batch.to_global(batch, trainer.batch_shardings), trainer.dropout_rng)
    losses.append(float(metrics['loss']))
    assert float(metrics['grad_norm']) > 0.1
  assert float(metrics['learning_rate']) > 0  # Past the warm-up's first step.
  return losses, jax.device_get(state.params)


def perturbed_params(family, model_config, seq_len=16):
  """(network, parameters) of `family` for `model_config`, each parameter moved off its initial
  value (norm scales off 1, biases off 0), so that a tensor lost in a conversion would show."""
  from flax import linen as nn
  model = family.build(model_config)
  params = nn.unbox(model.init(jax.random.key(0), **family.init_inputs(seq_len),
                               method='initialize'))['params']
  noise = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  return model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(noise), x.shape), params)


def load_into_torch(module, tensors):
  """Loads numpy `tensors` (name -> array) into the torch `module`, which must hold no trainable
  tensor they leave out (tied copies may be absent from them)."""
  import torch
  assert set(tensors) >= {name for name, _ in module.named_parameters()}
  module.load_state_dict({name: torch.tensor(np.ascontiguousarray(x))
                          for name, x in tensors.items()}, strict=False)
  return module


def kernel_size(tree, keep=lambda path: True):
  """Weights of the dense kernels in a parameter tree (abstract or real): what a FLOP count
  multiplies by the tokens each reads. `keep(path)` (the path's keys) selects among them."""
  return sum(math.prod(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if path[-1].key == 'kernel' and keep([p.key for p in path]))


def default_ctrl_c():
  """For a child's preexec_fn: Ctrl-C as a terminal delivers it, although this process may have
  been started to ignore it (a background job of a script), which exec would pass on."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)
