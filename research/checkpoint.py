"""Orbax checkpoints in <workdir>/checkpoints: train state plus a JSON record of the run.

Saves are asynchronous and atomic: orbax writes a step into a temporary folder and renames it
when complete, so an interrupted save never replaces a good checkpoint and a partial step folder
is never listed as finished. A failed save is noticed at the next step (`check`), not at the end
of the run.

The JSON record holds the step, the dropout RNG, the data position, the settings that shape the
state (config.model and config.optim), the shape and dtype of every array of the state, and a
content checksum per array. Restoring compares the structure before any array is read, so a
different model or optimizer is named in one sentence, and verifies the checksums after, so a
flipped bit is caught. A step that cannot be read (truncated or missing files, a failed checksum)
is moved aside to `<step>.unreadable`, never deleted, and the run falls back to the step before.
"""

import contextlib
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils

UNREADABLE_SUFFIX = '.unreadable'

# Orbax reports tensorstore's read and write failures as OSError or ValueError, a missing item
# as KeyError, and sometimes wraps them in a bare Exception whose cause is one of these.
_IO_ERRORS = (OSError, ValueError, KeyError, EOFError)
_RECORD_KEYS = ('step', 'dropout_rng', 'data', 'settings', 'structure', 'checksums')


class _QuietFailedSaves(logging.Filter):
  """A failed background save is reported by the trainer in one sentence (SaveError), but orbax
  logs it again from each of its threads with a full traceback, and each of its pending writes
  ends as an asyncio future 'never retrieved': orbax's lines keep their message but lose the
  traceback, and the futures' lines are dropped."""

  def filter(self, record):
    if record.name == 'asyncio':
      return 'exception was never retrieved' not in str(record.msg)
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


absl_logging.get_absl_logger().addFilter(_QuietFailedSaves())
logging.getLogger('asyncio').addFilter(_QuietFailedSaves())


def _ignore_callbacks_into_closed_loops(unraisable, default=sys.unraisablehook):
  """After one write of a background save fails, orbax closes its event loop while tensorstore
  still completes the other writes and calls back into it; those callbacks fail harmlessly with
  'Event loop is closed' (the save's own failure is reported as SaveError)."""
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
    default(unraisable)


sys.unraisablehook = _ignore_callbacks_into_closed_loops


class CheckpointError(ValueError):
  """A checkpoint problem, described in one sentence that says what to change."""


class SaveError(CheckpointError):
  """An asynchronous save failed (full disk, unwritable folder)."""


class _Unreadable(Exception):
  """A step whose files cannot be read back as saved; carries the reason."""


def _io_failure(error):
  """The I/O error behind `error` (following `raise ... from` causes), or None when it is
  something else."""
  while error is not None and not isinstance(error, CheckpointError):
    if isinstance(error, _IO_ERRORS):
      return error
    error = error.__cause__  # Only what the raiser named as the cause, not a bystander.
  return None


def _first_line(error):
  return str(error).strip().split('\n')[0][:300]


@contextlib.contextmanager
def _io_failures_raise(make_error):
  """Inside, an I/O failure (see _io_failure) is raised again as make_error(its first line);
  anything else (a bug, an interrupt) passes through unchanged."""
  try:
    yield
  except Exception as error:
    failure = _io_failure(error)
    if failure is None:
      raise
    _quiet_sibling_reads()
    raise make_error(_first_line(failure)) from None


_READ = '_read_array_index_and_device_put'  # orbax's coroutine reading one part of an array.


def _quiet_sibling_reads():
  """Once a read has failed, orbax's other reads of that step fail too and are never awaited: each
  would print a traceback as the collector finds it ("Exception ignored in <coroutine ...>"),
  which the one sentence about the step already says."""
  previous = sys.unraisablehook
  if getattr(previous, 'quiets', None) == _READ:
    return
  def hook(unraisable):
    if getattr(unraisable.object, '__name__', None) != _READ:
      previous(unraisable)
  hook.quiets = _READ
  sys.unraisablehook = hook


def structure(tree):
  """{path: [shape, dtype]} of every array of `tree` (a train state or its parameters)."""
  return {jax.tree_util.keystr(path): [list(x.shape), str(x.dtype)]
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _leaf_checksum(x):
  """Sum over elements of (bit pattern) * (2 * flat index + 1), modulo 2**32.

  Any single flipped bit changes the sum (an odd multiple of a power of two below 2**32 is never
  0 mod 2**32), and swapped elements almost always do. Written with iotas rather than a reshape
  so that sharded arrays are summed where they live: each device reads only its own shards and
  only scalars cross devices.
  """
  words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[
      x.dtype.itemsize]).astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * np.uint32(stride % 2**32)
    stride *= x.shape[axis]
  return jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksum_tree(tree):
  return jax.tree.map(_leaf_checksum, tree)


def checksums(tree):
  """{path: checksum} of every array of `tree` (see _leaf_checksum)."""
  values = jax.device_get(_checksum_tree(tree))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_leaves_with_path(values)}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def settings(config):
  """The config sections that shape the train state, flattened to {'optim.lr': value, ...}."""
  flat = {}
  for section in ('model', 'optim'):
    for key, value in config[section].to_dict().items():
      flat[f'{section}.{key}'] = value
  return flat


def make_record(step, dropout_rng, data, config):
  """The JSON record saved with the state at `step` (the checkpointer adds the structure and the
  checksums of the state)."""
  return dict(step=int(step), dropout_rng=np.asarray(jax.random.key_data(dropout_rng)).tolist(),
              data=data, settings=settings(config))


def rng_from_record(record):
  return jax.random.wrap_key_data(np.asarray(record['dropout_rng'], np.uint32))


def _differences(saved, current, names):
  """'key: A there, B here' for the settings that differ, of those under `names` (prefixes)."""
  keys = sorted(k for k in set(saved) | set(current)
                if k.startswith(names) and saved.get(k) != current.get(k))
  return ', '.join(f'{k}: {saved.get(k)!r} there, {current.get(k)!r} here' for k in keys)


def _check_structure(record, expected, current_settings, directory, params_only=False):
  """Raises CheckpointError naming what differs between the saved and the expected state."""
  saved = record['structure']
  if params_only:
    saved = {k[len('.params'):]: v for k, v in saved.items() if k.startswith('.params')}
  if saved == expected:
    return
  differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
  in_params = [k for k in differing if params_only or k.startswith('.params')]
  from research import optim  # Imported here: optim -> config -> objectives -> this module.
  what, names = ('a different model', 'model.') if in_params else (
      'a different optimizer', optim.STATE_SETTINGS)
  family = record['settings'].get('model.family'), current_settings.get('model.family')
  if in_params and family[0] != family[1]:  # Every setting would differ: the family says it all.
    raise CheckpointError(f'The checkpoint in {directory} was written for a model of '
                          f'model.family={family[0]} and this config builds one of model.family='
                          f'{family[1]}; resume with the {family[0]} config it was written with, '
                          'or pass another --workdir.')
  changed = _differences(record['settings'], current_settings, names)
  if not changed:
    name = (in_params or differing)[0]
    changed = f'array {name} is {saved.get(name)} there but {expected.get(name)} here'
  raise CheckpointError(f'The checkpoint in {directory} was written for {what} ({changed}); '
                        'resume with the settings it was written with, or pass another --workdir.')


def _verify_checksums(record, restored, prefix=''):
  expected = record['checksums']
  for name, value in checksums(restored).items():
    if expected.get(prefix + name) != value:
      raise _Unreadable(f'array {prefix + name} fails its checksum')


class Checkpointer:

  def __init__(self, directory, keep):
    self.directory = os.path.abspath(directory)
    self._pending_step = None  # The step of the asynchronous save not yet known to have finished.
    # The folder is created by the first save, so that a run failing at start writes nothing.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'record'))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, record):
    """Starts an asynchronous save of `state` with `record` (see make_record), to which the
    structure and checksums of `state` are added. Raises SaveError when an earlier save failed."""
    self.check()
    record = dict(record, structure=structure(state), checksums=checksums(state))
    if jax.process_index() == 0:
      os.makedirs(self.directory, exist_ok=True)
    self._pending_step = step
    with _io_failures_raise(self._save_error):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)

  def check(self):
    """Raises SaveError if the last asynchronous save has finished and failed; never blocks."""
    if self._pending_step is not None and not self.manager.is_saving_in_progress():
      self.wait()  # Returns at once: the save is over.

  def wait(self):
    """Blocks until the last save is written; raises SaveError if it failed."""
    if self._pending_step is None:  # Nothing started, or its outcome is already known.
      return
    with _io_failures_raise(self._save_error):
      self.manager.wait_until_finished()
    self._pending_step = None

  def _save_error(self, reason):
    step, self._pending_step = self._pending_step, None
    return SaveError(f'Saving the checkpoint of step {step} in {self.directory} failed ({reason}); '
                     "free disk space or fix the folder's permissions, then rerun the same "
                     'command to continue from the last saved step.')

  def read_record(self, step):
    record = self.manager.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))['record']
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
      raise CheckpointError(f'Checkpoint step {step} in {self.directory} has a record without '
                            f'{missing}, written by an older version; pass another --workdir.')
    return record

  def _read(self, step, state, state_shardings, current_settings):
    """(state, record) of `step`; raises _Unreadable, or CheckpointError for another structure."""
    with _io_failures_raise(lambda reason: _Unreadable(f'its record cannot be read: {reason}')):
      record = self.read_record(step)
    _check_structure(record, structure(state), current_settings, self.directory)
    with _io_failures_raise(_Unreadable):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state, state_shardings))))['state']
    _verify_checksums(record, restored)
    return restored, record

  def restore(self, state, state_shardings, current_settings):
    """Restores the newest readable step into the shardings of `state`; returns (state, record).

    Unreadable newer steps are moved aside (`<step>.unreadable`) once an older step has been
    read, so that the resumed run can save those steps again; when no step is readable nothing
    is moved and CheckpointError says which steps failed.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored, record = self._read(step, state, state_shardings, current_settings)
      except _Unreadable as reason:
        absl_logging.warning('Checkpoint step %d in %s is unreadable (%s).', step,
                             self.directory, reason)
        failed.append(step)
        continue
      for bad in failed:
        self._move_aside(bad)
      return restored, record
    raise CheckpointError(f'No checkpoint in {self.directory} is readable (steps {failed}, '
                          'see the warnings above); move that folder away to start afresh, or '
                          'pass another --workdir.')

  def _move_aside(self, step):
    source = os.path.join(self.directory, str(step))
    target = source + UNREADABLE_SUFFIX
    suffix = 1
    while os.path.exists(target):  # An earlier fallback already moved a step of this number.
      suffix += 1
      target = f'{source}{UNREADABLE_SUFFIX}{suffix}'
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_move_aside_{step}')
    self.manager.reload()
    absl_logging.warning('Moved the unreadable checkpoint step %d aside to %s; the run continues '
                         'from an older step and will save step %d again.', step, target, step)

  def close(self):
    self.manager.close()


class BestKeeper:
  """Keeps, in a directory of its own, the state whose evaluation metric is the best so far.

  The latest checkpoints live elsewhere (<workdir>/checkpoints), so keeping the best never
  deletes the latest. The best value so far is read back from the kept record on resume.
  """

  def __init__(self, directory, metric, mode):
    self.metric, self.mode = metric, mode
    self.checkpointer = Checkpointer(directory, keep=1)
    step = self.checkpointer.latest_step()
    self.value = None
    if step is not None:
      with _io_failures_raise(lambda reason: CheckpointError(
          f'The best checkpoint in {directory} is unreadable ({reason}); move it aside to keep '
          'training.')):
        self.value = self.checkpointer.read_record(step)['best']['value']

  def offer(self, step, state, record, metrics):
    """Saves `state` (asynchronously) when metrics[metric] beats the best so far; returns
    whether it did."""
    value = metrics[self.metric]
    improved = self.value is None or (value > self.value if self.mode == 'max' else
                                      value < self.value)
    if not improved or step in self.checkpointer.manager.all_steps():
      return False
    self.value = value
    self.checkpointer.save(step, state, dict(record, best=dict(metric=self.metric, value=value)))
    return True

  def check(self):
    self.checkpointer.check()

  def wait(self):
    self.checkpointer.wait()

  def close(self):
    self.checkpointer.close()


def read_params(directory, abstract_params):
  """(params, step) from the newest checkpoint in `directory`, restored into `abstract_params`
  (ShapeDtypeStructs with shardings) and checked against their checksums; the optimizer state
  is not read. `abstract_params` may instead be a function of the checkpoint's record that returns
  the part of the parameters to read."""
  if not os.path.isdir(directory):
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if os.path.isfile(existing):
      raise CheckpointError(f'{existing} is a file, not a run\'s workdir; point at the workdir '
                            'of a finished run.')
    raise CheckpointError(f'{directory} does not exist; point at the workdir of a finished run.')
  source = Checkpointer(directory, keep=None)
  try:
    step = source.latest_step()
    if step is None:
      raise CheckpointError(f'{directory} holds no finished checkpoint.')
    unreadable = lambda reason: CheckpointError(
        f'Checkpoint step {step} in {directory} is unreadable ({reason}); resume that run to '
        'fall back to an older step.')
    with _io_failures_raise(unreadable):
      record = source.read_record(step)
    if callable(abstract_params):
      abstract_params = abstract_params(record)
    else:
      _check_structure(record, structure(abstract_params), record['settings'], directory,
                       params_only=True)
    abstract = {'params': abstract_params}
    with _io_failures_raise(unreadable):
      restored = source.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True)))
    try:
      _verify_checksums(record, restored['state']['params'], prefix='.params')
    except _Unreadable as reason:
      raise unreadable(reason) from None
    return restored['state']['params'], step
  finally:
    source.close()


def _matching(saved, expected, directory):
  """The parameter names both trees hold; a name of another shape is one CheckpointError."""
  shared = sorted(set(saved) & set(expected))
  for name in shared:
    if saved[name][0] != expected[name][0]:
      raise CheckpointError(f'Parameter {name} has shape {saved[name][0]} in {directory} but '
                            f'{expected[name][0]} in this model; warm start from a run of the '
                            'same sizes, or rename the layer.')
  if not shared:
    raise CheckpointError(f'{directory} shares no parameter name with this model; warm start '
                          'from a run of the same model family.')
  return set(shared)


def _subtrees(names):
  """The top-level subtrees of parameter names like "['pooler']['kernel']", for one log line."""
  return ', '.join(sorted({name.split("'")[1] for name in names})) or 'none'


# Settings that decide what a parameter's name means: across them, equal names are no match.
_LAYOUT_SETTINGS = ('model.family', 'model.scan_layers', 'model.share_layers')


def restore_params(source_workdir, state, state_shardings, current_settings):
  """Warm start from the newest checkpoint under another run's workdir: every parameter whose
  name the source also holds (of the same shape) is taken from it, the rest (e.g. a new head)
  keeps its fresh initialisation. A source of another family or layer layout is refused.
  Returns (state, step, description)."""
  directory = os.path.join(source_workdir, 'checkpoints')
  abstract = _abstract(state.params, state_shardings.params)
  expected = structure(abstract)
  leaves = {jax.tree_util.keystr(p): (p, x)
            for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  shared = set()

  def shared_part(record):
    """The abstract tree of the parameters the checkpoint also holds."""
    for key in _LAYOUT_SETTINGS:
      there, here = record['settings'].get(key), current_settings.get(key)
      if there != here:
        raise CheckpointError(f'{source_workdir} was trained with {key}={there!r} but this run '
                              f'has {here!r}; warm start from a run with the same {key}.')
    saved = {k[len('.params'):]: v for k, v in record['structure'].items()
             if k.startswith('.params')}
    shared.update(_matching(saved, expected, directory))
    subset = {}
    for name in shared:
      path, leaf = leaves[name]
      node = subset
      for key in path[:-1]:
        node = node.setdefault(key.key, {})
      node[path[-1].key] = leaf
    return subset

  loaded, step = read_params(directory, shared_part)
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  params = jax.tree_util.tree_map_with_path(
      lambda p, fresh: flat.get(jax.tree_util.keystr(p), fresh), state.params)
  fresh = sorted(set(expected) - shared)
  description = (f'warm start from the parameters of step {step} of {source_workdir}: loaded '
                 f'{len(shared)} arrays ({_subtrees(shared)}), initialised {len(fresh)} afresh '
                 f'({_subtrees(fresh)})')
  return state.replace(params=params), step, description

