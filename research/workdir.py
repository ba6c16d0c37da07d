"""A run's workdir: the lock held while training in it, and reading a run back (its resolved
config and its checkpointed parameters)."""

import contextlib
import datetime
import fcntl
import json
import os
import socket

import jax
import ml_collections

from research import checkpoint as checkpoint_lib
from research import models
from research.data import tokenizer as tokenizer_lib


# What a run's config.json always holds, and commands that read a workdir rely on: every section,
# and the names that choose the family and the objective.
_SAVED_KEYS = (('model', 'family'), ('objective', 'name'), ('data', ''), ('train', ''),
               ('optim', ''), ('checkpoint', ''), ('mesh', ''))


def load_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise checkpoint_lib.CheckpointError(f'{workdir} holds no config.json; pass the --workdir of '
                                         'a training run or of research.convert from_hf.')
  try:
    with open(path) as f:
      saved = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise checkpoint_lib.CheckpointError(f'{path} is not valid JSON ({error}); restore the file '
                                         'the run wrote there.') from None
  missing = [f'{section}.{key}' if key else section for section, key in _SAVED_KEYS
             if not isinstance(saved, dict) or not isinstance(saved.get(section), dict)
             or (key and key not in saved[section])]
  if missing:
    raise checkpoint_lib.CheckpointError(f'{path} lacks {", ".join(missing)}, which every run '
                                         'writes; restore the file the run wrote there.')
  config = ml_collections.ConfigDict(saved)
  config.lock()
  return config


def load_params(workdir, config=None, mesh=None):
  """(config, params, step) of the newest checkpoint in `workdir`: on the default device, or
  sharded over `mesh` by the parameters' logical axes (a model larger than one device)."""
  config = config or load_config(workdir)
  if mesh is not None:
    abstract = models.abstract_params_on(family(config), config.model, mesh)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            models.abstract_params(family(config), config.model))
  params, step = checkpoint_lib.read_params(os.path.join(workdir, 'checkpoints'), abstract)
  return config, params, step


def saved_tokenizer(workdir):
  """The copy of its tokenizer that a run saved in its workdir, else None (a run of an earlier
  version, or one converted from a model directory without a tokenizer.json)."""
  return tokenizer_lib.load_saved(os.path.join(workdir, tokenizer_lib.SAVED_DIR))


def tokenizer(workdir, config):
  """The tokenizer a run trained with: its saved copy, which outlives the folder that
  config.data.tokenizer names, else that one."""
  saved = saved_tokenizer(workdir)
  if saved is not None:
    return saved
  extra_ids = config.data.get('extra_ids', 0)  # Absent from workdirs of earlier versions.
  return tokenizer_lib.get(config.data.tokenizer, extra_ids=extra_ids)


def family(config):
  """The model family a run's config names (a ConfigError-like ValueError if unknown)."""
  return models.get(config.model.family)


class WorkdirError(ValueError):
  """A workdir problem, described in one sentence that says what to change."""


LOCK_NAME = 'train.lock'


def _open_lock(workdir):
  """Creates `workdir` if needed and opens its lock file; returns (fd, created)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir {workdir} is a file; pass a directory.')
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    return os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644), created
  except OSError as error:
    raise WorkdirError(f'--workdir {workdir} is not writable ({error.strerror}); pass a '
                       'directory you can write to.') from None


@contextlib.contextmanager
def lock(workdir):
  """Holds `workdir` for one trainer: a second one refuses with one sentence naming the holder.

  An flock is released by the kernel when its holder exits, however it exits, so the lock of a
  killed trainer is stale at once. Only process 0 of a job locks (its processes share the
  workdir). A workdir this call created is removed again if the run leaves it empty.
  """
  if jax.process_index() != 0:
    yield
    return
  fd, created = _open_lock(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.read(fd, 1000).decode(errors='replace').strip() or 'another process'
    os.close(fd)
    raise WorkdirError(f'Another trainer ({holder}) is running in {workdir}; wait for it to '
                       'finish or stop it, or pass another --workdir.') from None
  started = datetime.datetime.now().isoformat(timespec='seconds')
  os.ftruncate(fd, 0)
  os.write(fd, f'pid {os.getpid()} on {socket.gethostname()} since {started}\n'.encode())
  try:
    yield
  finally:
    os.unlink(path)  # Before the lock is released, so that no one locks a removed file.
    os.close(fd)
    if created and not os.listdir(workdir):
      os.rmdir(workdir)
