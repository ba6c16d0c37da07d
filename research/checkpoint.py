"""Orbax checkpoints in <workdir>/checkpoints: train state plus a JSON record of the run.

Saves are asynchronous and atomic: orbax writes a step into a temporary folder and renames it
when complete, so an interrupted save never replaces a good checkpoint and a partial step folder
is never listed as finished. The JSON item holds the step, the dropout RNG, the data position and
the parameter shapes (checked before any restore, so a different model gives one clear sentence).
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(ValueError):
  """A checkpoint problem, described in one sentence that says what to change."""


def param_shapes(params):
  return {jax.tree_util.keystr(path): list(x.shape)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class Checkpointer:

  def __init__(self, directory, every_steps, keep):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    # The interval is applied here (maybe_save), not by orbax, which also saves the first step.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'record'))

  def latest_step(self):
    return self.manager.latest_step()

  def maybe_save(self, step, state, make_record, final=False):
    """Starts an asynchronous save every `every_steps` steps and at the final step."""
    if not final and step % self.every_steps:
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(make_record())), force=True)

  def read_record(self, step):
    return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']

  def restore(self, state, state_shardings, step=None):
    """Restores into the shardings of `state`; returns (state, record).

    Falls back to an older step, with a warning, when the newest cannot be read.
    """
    steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
    expected = param_shapes(state.params)
    for candidate in steps:
      try:  # The record first: its shapes are checked before any array is read.
        record = self.read_record(candidate)
        _check_shapes(record.get('param_shapes', {}), expected, self.directory)
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state, state_shardings))))
        return restored['state'], record
      except CheckpointError:
        raise
      except Exception as error:  # Truncated or corrupt: try the previous one.
        logging.warning('Checkpoint step %d in %s is unreadable (%s); trying an older one.',
                        candidate, self.directory, error)
    raise CheckpointError(f'No readable checkpoint in {self.directory}; move that folder away to '
                          'start fresh, or pass another --workdir.')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _check_shapes(saved, expected, directory):
  if saved == expected:
    return
  for name in sorted(set(saved) | set(expected)):
    if saved.get(name) != expected.get(name):
      raise CheckpointError(
          f'The checkpoint in {directory} was written for a different model: parameter {name} has '
          f'shape {saved.get(name)} there but {expected.get(name)} in this config; use the config '
          'it was trained with, or another --workdir.')


def read_params(directory, abstract_params):
  """(params, step) from the newest checkpoint in `directory`, restored into `abstract_params`
  (ShapeDtypeStructs with shardings); the optimizer state is not read."""
  if not os.path.isdir(directory):
    raise CheckpointError(f'{directory} does not exist; point at the workdir of a finished run.')
  source = Checkpointer(directory, every_steps=1, keep=None)
  try:
    step = source.latest_step()
    if step is None:
      raise CheckpointError(f'{directory} holds no finished checkpoint.')
    _check_shapes(source.read_record(step).get('param_shapes', {}), param_shapes(abstract_params),
                  directory)
    abstract = {'params': abstract_params}
    restored = source.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))
    return restored['state']['params'], step
  finally:
    source.close()


def restore_params(source_workdir, state, state_shardings):
  """Warm start: the parameters of the latest checkpoint under another run's workdir."""
  params, step = read_params(os.path.join(source_workdir, 'checkpoints'),
                             _abstract(state.params, state_shardings.params))
  return state.replace(params=params), step


def rng_to_record(key):
  return np.asarray(jax.random.key_data(key)).tolist()


def rng_from_record(data):
  return jax.random.wrap_key_data(np.asarray(data, np.uint32))
