"""Sweeps: the points of an ablation as config overrides, their run names, and the run registry.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a `Space`, built from

  product(lr=[1e-3, 3e-4], num_layers=[2, 4])    every combination (a grid)
  zipped(num_layers=[2, 4], emb_dim=[64, 128])   the i-th values together
  points({'optim.lr': 1e-3}, {...})              an explicit list
  seeds(3)                                       seed = 0, 1, 2

combined with `*` (every pair of points, merged) and `+` (one list, then the other), e.g.
`product(lr=[1e-3, 3e-4]) * seeds(3)`; `--sweep FILE:ARG` calls `get_sweep(ARG)`. Keys are
dotted config keys (`optim.lr`) or the last part of one (`lr`) where that names a single key of
the config; the key `config` gives a point its own config file and variant (a sweep across
families). A sweep file may set `CONFIG` (the config of points that name none, when --config is
not given).

A run is named by the overrides that vary across the sweep (short keys) and a short hash of its
resolved config, so that re-running a sweep finds its runs again and an edited config starts new
ones. The registry,
`<sweep>/registry.jsonl`, holds one JSON record per line, appended; a run's latest line is its
current record (launch/sweep.py writes it, research/report.py `load_registry` reads it).
"""

import difflib
import fcntl
import hashlib
import inspect
import itertools
import json
import os
import re

from research import config as config_lib
from research import objectives
from research import report

CONFIG_KEY = 'config'  # A point's own config file and variant.
SEED_KEY = 'seed'


class SweepError(ValueError):
  """A sweep problem, described in one sentence that says what to change."""


class Space:
  """An ordered list of points, each a dict of overrides."""

  def __init__(self, points):
    self.points = tuple(dict(point) for point in points)

  def __mul__(self, other):
    other = _space(other)
    merged = []
    for left, right in itertools.product(self.points, other.points):
      shared = set(left) & set(right)
      if shared:
        raise SweepError(f'Both factors of a product set {sorted(shared)}; give each key in one '
                         'factor only.')
      merged.append({**left, **right})
    return Space(merged)

  def __add__(self, other):
    return Space(self.points + _space(other).points)

  def __len__(self):
    return len(self.points)

  def __iter__(self):
    return iter(self.points)


def _space(value):
  if isinstance(value, Space):
    return value
  if isinstance(value, (list, tuple)) and all(isinstance(point, dict) for point in value):
    return Space(value)
  raise SweepError(f'{value!r} is not a sweep space; build one with product, zipped, points or '
                   'seeds.')


def _axes(axes):
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__'):
      raise SweepError(f'Axis {key!r} needs a list of values, got {values!r}.')
  return {key: list(values) for key, values in axes.items()}


def product(*spaces, **axes):
  """Every combination of the axes' values (the first axis varying slowest), times `spaces`."""
  axes = _axes(axes)
  grid = Space(dict(zip(axes, values)) for values in itertools.product(*axes.values()))
  for space in spaces:
    grid = grid * space
  return grid


def zipped(**axes):
  """The i-th value of every axis together; the axes must have equal lengths."""
  axes = _axes(axes)
  lengths = {key: len(values) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise SweepError(f'zipped needs axes of one length, got {lengths}.')
  return Space(dict(zip(axes, values)) for values in zip(*axes.values()))


def points(*overrides):
  return Space(overrides)


def seeds(count, start=0):
  if count < 1:
    raise SweepError(f'seeds({count}) needs at least one seed.')
  return Space({SEED_KEY: seed} for seed in range(start, start + count))


# Loading and resolving a sweep file.


def load(spec):
  """(points, default config spec or None) of the sweep file `path[:argument]` (the argument,
  when given, is passed to its get_sweep)."""
  path, _, argument = spec.partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'Sweep file {path!r} does not exist; pass --sweep configs/sweeps/NAME.py.')
  module = config_lib.python_file(path, '_research_sweep')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path} defines no get_sweep(); return the points from one.')
  try:  # The call itself, before the file's code runs: an argument it takes or lacks.
    inspect.signature(module.get_sweep).bind(*([argument] if argument else []))
  except TypeError:
    if argument:
      raise SweepError(f'{path}\'s get_sweep takes no argument, but --sweep {spec} passes one; '
                       f'drop the :{argument}.') from None
    raise SweepError(f'{path}\'s get_sweep takes an argument, but --sweep {spec} passes none; '
                     'add :ARGUMENT to --sweep.') from None
  try:
    space = module.get_sweep(argument) if argument else module.get_sweep()
  except SweepError:
    raise
  except Exception as error:  # The file's own code (a sweep helper's mistakes are SweepErrors).
    raise SweepError(config_lib.failure_in_file(path, error)) from None
  space = _space(space)
  if not len(space):
    raise SweepError(f'{path} returns no points.')
  return list(space), getattr(module, 'CONFIG', None)


def _flat(config, prefix=''):
  flat = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def full_key(key, config):
  """The dotted config key that `key` names: itself, or the one key ending in `.key`."""
  keys = list(_flat(config))
  if key in keys:
    return key
  matches = [k for k in keys if k.endswith('.' + key)]
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise SweepError(f'Sweep key {key!r} could name {matches}; write the dotted key.')
  # A short key is compared with the keys' last parts, a dotted one with whole keys.
  names = {k: k if '.' in key else k.rsplit('.', 1)[-1] for k in keys}
  close = difflib.get_close_matches(key, set(names.values()), n=3, cutoff=0.6)
  close = ', '.join(k for k in keys if names[k] in close)
  if close:
    raise SweepError(f'Sweep key {key!r} is not a config key; closest: {close}.')
  sections = sorted({k.split('.')[0] for k in keys if '.' in k})
  raise SweepError(f'Sweep key {key!r} is not a config key and none is close; write a key of '
                   f'the config, dotted (SECTION.KEY, SECTION one of {", ".join(sections)}) or '
                   'its last part alone.')


class Run:
  """One point of a sweep: its config spec, overrides (full keys), resolved config and name."""

  def __init__(self, spec, overrides, config, name, variant, group, index):
    self.spec, self.overrides, self.config = spec, overrides, config
    self.name, self.variant = name, variant
    self.group = group  # The hash of its config but for the seed: runs that differ by seed only.
    self.index = index  # Its place in the sweep ({i} of the cluster launchers).

  def arguments(self):
    """The overrides as research.train flags."""
    return [f'--config.{key}={_flag_value(value)}' for key, value in self.overrides.items()]


def _flag_value(value):
  return repr(value) if isinstance(value, float) else str(value)


def _short(value):
  if isinstance(value, str) and os.sep in value:  # A path: its last part names it.
    value = os.path.basename(value.rstrip(os.sep))
  text = f'{value:g}' if isinstance(value, float) else str(value) or 'none'  # '': unset.
  return re.sub(r'[^A-Za-z0-9.+-]', '_', text)


def resolve(point, default_spec):
  """(config spec, overrides with full keys, resolved config) of one point."""
  point = dict(point)
  spec = point.pop(CONFIG_KEY, default_spec)
  if not spec:
    raise SweepError('A point names no config; pass --config or set CONFIG in the sweep file.')
  config = config_lib.load_config_file(spec)
  overrides = {}
  for key, value in point.items():
    if isinstance(value, (list, tuple, dict)) or value is None:
      raise SweepError(f'Sweep value {key}={value!r} is not a number, string or boolean.')
    overrides[full_key(key, config)] = value
  flat = _flat(config)
  for key, value in overrides.items():
    try:
      # ml_collections takes a bool for a number (bool is an int in Python); the trainer's
      # command line does not.
      if isinstance(value, bool) and type(flat[key]) in (int, float):
        raise TypeError(key)
      config.update_from_flattened_dict({key: value})
    except (TypeError, ValueError):
      expected = _EXPECTED.get(type(flat[key]), f'a {type(flat[key]).__name__}')
      raise SweepError(f'Sweep value {key}={value!r} is not a valid value of that key '
                       f'({expected} is expected); correct the sweep file.') from None
  try:  # Refused here, as research.train would refuse each run of the point.
    objectives.check_overrides(config, [key[len('objective.'):] for key in overrides
                                        if key.startswith('objective.')])
  except ValueError as error:
    raise SweepError(f'A point of the sweep ({spec}): {error}') from None
  return spec, overrides, config


_EXPECTED = {int: 'an integer', float: 'a number', bool: 'true or false', str: 'a string'}


def _values(rows, key):
  return [repr(row.get(key)) for row in rows]


def expand(points, default_spec):
  """The Runs of a sweep's points. A run is named by the overrides that vary across the sweep
  (a key's last part, unless two varying keys share it; a key whose value follows from an
  earlier one's is left out) and a hash of its resolved config; two points with one resolved
  config are an error."""
  resolved = [resolve(point, default_spec) for point in points]
  rows = [{CONFIG_KEY: spec, **overrides} for spec, overrides, _ in resolved]
  keys = list(dict.fromkeys(key for row in rows for key in row))
  varying = []
  for key in keys:
    values = [repr(row.get(key)) for row in rows]
    # A key that an earlier named one determines (a data path per config, a zipped width per
    # depth) would only lengthen the name.
    determined = any(len(set(zip(_values(rows, earlier), values))) == len(set(
        _values(rows, earlier))) for earlier in varying if earlier != SEED_KEY)
    if len(set(values)) > 1 and not determined:
      varying.append(key)
  last = [key.rsplit('.', 1)[-1] for key in varying]
  runs = []
  for (spec, overrides, config), row in zip(resolved, rows):
    parts = []
    for key in varying:
      short = key.rsplit('.', 1)[-1]
      label = short if last.count(short) == 1 else key
      if key == CONFIG_KEY:
        parts.append(_short(os.path.basename(spec).replace('.py:', '.')))
      elif key in row:
        parts.append(f'{label}={_short(row[key])}')
    variant = ','.join(p for p in parts if not p.startswith(f'{SEED_KEY}=')) or 'base'
    unseeded = config.copy_and_resolve_references()
    unseeded.seed = 0
    name = f"{','.join(parts)[:80] or 'base'}-{_digest(config)}"
    runs.append(Run(spec, overrides, config, name, variant, _digest(unseeded), len(runs)))
  digests = [run.name.rsplit('-', 1)[1] for run in runs]
  twice = sorted({run.name for run, d in zip(runs, digests) if digests.count(d) > 1})
  if twice:
    raise SweepError(f'Points {twice} resolve to the same config; drop the repeats.')
  return runs


def _digest(config):
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:6]


def flops_per_step(spec_or_config, **overrides):
  """Model FLOPs of one training step of a config (spec string or ConfigDict), for budgets
  at equal compute: the objective's FLOPs per position times the positions of a batch."""
  from research import models
  from research import objectives
  config = (config_lib.load_config_file(spec_or_config) if isinstance(spec_or_config, str)
            else spec_or_config)
  if overrides:
    config.update_from_flattened_dict(
        {full_key(key, config): value for key, value in overrides.items()})
  family = models.get(config.model.family)
  per_position = objectives.build(config).flops_per_token(family,
                                                          family.spec_from_config(config.model))
  t = config.train
  # An encoder-decoder's FLOPs per position count both streams (research/objectives).
  return per_position * t.batch_size * (t.seq_len + t.get('target_len', 0))


# The registry.


def append_record(folder, record):
  """Appends one record under an exclusive lock (several drivers may share a sweep folder)."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, report.REGISTRY), 'a+') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      f.seek(0)
      text = f.read()
      if text and not text.endswith('\n'):  # A writer killed mid-line: that line never was.
        f.truncate(text.rfind('\n') + 1)
      f.seek(0, os.SEEK_END)
      f.write(json.dumps(record, sort_keys=True, allow_nan=False) + '\n')
      f.flush()
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
