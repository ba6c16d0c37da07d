"""Config loading, command-line overrides, validation and the workdir record of a run.

Configs are Python files with `get_config(variant)` returning a locked ConfigDict. On the command
line they arrive through absl flags + ml_collections `config_flags`:
  --config configs/decoder.py:tiny --config.optim.lr=1e-3
"""

import difflib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
import traceback

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from research import cli
from research import mesh as mesh_lib
from research import models
from research import objectives
from research import report
from research.data import labeled
from research.data import sources
from research.data import tokenizer as tokenizer_lib
from research.models import attention as attention_lib
from research.models import layers

# ml_collections finds the --config.KEY overrides in a command line of its own (sys.argv unless
# given one): parse_flags fills this with the one it parses, so that the two never differ and an
# unreadable --flagfile is not opened at import.
_PARSED_ARGV = []
_CONFIG_FLAG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and variant, e.g. configs/decoder.py:tiny.', lock_config=True,
    sys_argv=_PARSED_ARGV)
# Shared by every command that reads or writes a run directory (train, sample, convert).
WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: config, checkpoints, metrics, logs.')


class ConfigError(ValueError):
  """A config problem, described in one sentence that says what to change."""


def _flat_keys(config, prefix=''):
  keys = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_flat_keys(value, path + '.'))
    else:
      keys.append(path)
  return keys


def _sections(config, prefix=''):
  """The dotted names of config's sections (its nested ConfigDicts), at every depth."""
  names = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names.append(f'{prefix}{key}')
      names.extend(_sections(value, f'{prefix}{key}.'))
  return names


def _keys_of(section, prefix=''):
  """The dotted names of a section's keys, each after `prefix`; a section's written NAME.*."""
  return {key: f'{prefix}{key}' + ('.*' if isinstance(value, ml_collections.ConfigDict) else '')
          for key, value in section.items()}


def _unknown_key_error(key, config):
  """One sentence for an override of `key`, which is no value of `config`: a section, else the
  closest keys (a section written SECTION.*), else the keys it could have meant."""
  sections = _sections(config)
  if key in sections:
    return ConfigError(f'Config key {key!r} is a section, not a value; set one of its keys '
                       f'instead (--config.{key}.KEY=VALUE, KEY one of '
                       f'{", ".join(_keys_of(config[key]).values())}).')
  parent, _, name = key.rpartition('.')
  if parent and parent not in sections:  # A misspelt section: compare whole dotted keys.
    names = {**{k: k for k in _flat_keys(config)}, **{s: f'{s}.*' for s in sections}}
    compared = key
  else:  # Within its own section only: a shared prefix would make any key look close.
    names = _keys_of(config[parent], f'{parent}.') if parent else _keys_of(config)
    compared = name
  close = [names[match]
           for match in difflib.get_close_matches(compared, list(names), n=3, cutoff=0.5)]
  # Else a key of that name in another section (--config.lr for optim.lr).
  close = close or [k for k in _flat_keys(config) if k.rpartition('.')[2] == name]
  if close:
    return ConfigError(f'Unknown config key {key!r}; closest valid keys: {", ".join(close)}.')
  if parent in sections:
    return ConfigError(f'Unknown config key {key!r}, and section {parent!r} has none like it; '
                       f'set one of {", ".join(names.values())}.')
  top = ', '.join(k for k in config.keys() if k not in sections)
  return ConfigError(f'Unknown config key {key!r} and none is close; set a key of one of the '
                     f'sections {", ".join(s for s in sections if "." not in s)} '
                     f'(--config.SECTION.KEY=VALUE) or one of the keys {top}.')


def python_file(path, name):
  """The module of the Python file at `path` (a config or sweep file), imported as `name`."""
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None:  # importlib loads only .py files: a folder or a README has no spec.
    raise ConfigError(f'{path} is not a Python file; pass the path of a .py file.')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as error:  # The file's own code: say where it failed, not how we got there.
    raise ConfigError(failure_in_file(path, error)) from None
  return module


def failure_in_file(path, error):
  """One sentence locating `error`, raised while the config or sweep file `path` ran: the line
  of the last frame outside Python's and the installed packages' own files (the user's code)."""
  if isinstance(error, SyntaxError):
    where = f'{error.filename}, line {error.lineno}'
    return f'{path} is not valid Python ({where}: {error.msg}); correct that line.'
  library = tuple(os.path.realpath(sysconfig.get_paths()[name]) + os.sep
                  for name in ('stdlib', 'purelib', 'platlib'))
  frames = [frame for frame in traceback.extract_tb(error.__traceback__)
            if not os.path.realpath(frame.filename).startswith(library)]
  where = f' at {frames[-1].filename}, line {frames[-1].lineno}' if frames else ''
  return (f'{path} failed while it ran{where} ({type(error).__name__}: {error}); correct the '
          'file.')


def load_config_file(spec):
  """Loads `path.py:variant` without absl, for programmatic use and tests."""
  path, colon, arg = spec.partition(':')
  if not os.path.exists(path):
    raise ConfigError(f'Config file {path!r} does not exist; pass --config '
                      'configs/<family>.py:VARIANT.')
  if os.path.isdir(path) or not path.endswith('.py'):
    kind = 'a folder, not' if os.path.isdir(path) else 'not'
    raise ConfigError(f'--config {path} is {kind} a Python config file (a .py file with '
                      'get_config()); pass --config configs/<family>.py:VARIANT.')
  if colon and not arg:  # absl's config_flags would fail on it with no word of why.
    raise ConfigError(f'--config {spec} has an empty variant after its colon; name one '
                      f'({path}:VARIANT) or drop the colon for the file\'s default.')
  module = python_file(path, '_research_config')
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'--config {path} defines no get_config(), so it is not a config file; '
                      'pass --config configs/<family>.py:VARIANT.')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as error:  # e.g. an unknown variant: the config file says which exist.
    raise ConfigError(str(error)) from None
  except Exception as error:
    raise ConfigError(failure_in_file(path, error)) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'get_config() in {path} returned {type(config).__name__!r}, not an '
                      'ml_collections.ConfigDict; return one.')
  return config


def config_spec(argv):
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  return spec


HELP_FLAGS = ('-h', '-help', '--help', '--helpshort', '--helpfull')


def parse_flags(argv, usage, accepted, trains=True):
  """Parses the absl flags of a command that takes --config and the flags named in `accepted`.
  --help prints `usage` and those flags, then exits; a bad config file, variant or override, a
  stray argument or a flag of another command (absl holds every imported module's) becomes one
  ConfigError sentence, and so does, where the command `trains` (or plans or benchmarks
  training), an objective.* override that the configured objective does not read."""
  names = ['config', *accepted]
  _answer_help(argv, usage, names)
  spec = config_spec(argv)
  if spec is None:
    raise ConfigError('No config given; pass --config configs/<family>.py:VARIANT (--help lists '
                      'the flags).')
  base = load_config_file(spec)  # Checked here: config_flags defers such errors to first use.
  overrides = _override_keys(argv)
  _PARSED_ARGV[:] = argv
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG_FLAG.value
  except Exception as error:  # absl wraps the config's own errors in several layers.
    valid = _flat_keys(base)
    for key in overrides:
      if key not in valid:
        raise _unknown_key_error(key, base) from None
    raise _flag_error(error, names, argv) from None
  _check_arguments(rest, names)
  if not trains:
    return config
  try:
    objectives.check_overrides(config, [key[len('objective.'):] for key in overrides
                                        if key.startswith('objective.')])
  except ValueError as error:
    raise ConfigError(str(error)) from None
  return config


# A command-line override of a config key, as ml_collections' _GetOverrides finds one: the whole
# flag (group 1) and the key (group 2).
_OVERRIDE = re.compile(r'(-{1,2}(?:no)?config\.([^=\s]+))')


def _override_keys(argv):
  """The config keys that the command line overrides, as ml_collections finds them (its
  _ConfigFlag._GetOverrides, whose pattern this repeats): after the expansion of any
  --flagfile, as --config.KEY, -config.KEY or (for a boolean) --noconfig.KEY."""
  try:
    expanded = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error as error:  # A --flagfile that cannot be read.
    reason = re.sub(r'^.*?\] ', '', str(error).strip()).rstrip('.')  # absl's prefix, errno off.
    raise ConfigError(f'The --flagfile cannot be read ({reason}); correct it.') from None
  return [found.group(2) for found in map(_OVERRIDE.match, expanded) if found]



def parse_command_flags(argv, usage, names):
  """Parses the absl flags of a command without --config (sample, convert), which takes the flags
  `names`: --help prints `usage` and those flags, then exits; an unknown flag, a bad value, a
  stray argument or a flag of another command raises one sentence."""
  _answer_help(argv, usage, names)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    raise _flag_error(error, names) from None
  _check_arguments(rest, names)


def _answer_help(argv, usage, names):
  if any(argument in HELP_FLAGS for argument in argv[1:]):
    print(help_text(usage, names))
    raise SystemExit(0)


def help_text(usage, names):
  """A command's --help: its usage (the module's docstring) and its flags with their help."""
  lines = [usage.strip(), '', 'flags:']
  for name in names:
    if name == 'config':
      lines.append(textwrap.fill(
          '--config: Config file and variant, e.g. configs/decoder.py:tiny; --config.KEY=VALUE '
          'sets one of its keys (e.g. --config.train.num_steps=100).', 100, initial_indent='  ',
          subsequent_indent='      '))
      continue
    flag = flags.FLAGS[name]
    value = ','.join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
    default = '' if value in (None, '') else f' (default: {value})'
    lines.append(textwrap.fill(f'--{name}: {flag.help}{default}', 100, initial_indent='  ',
                               subsequent_indent='      '))
  return '\n'.join(lines)


def commands_help_text(usage, commands):
  """--help of a tool with several commands: its usage, then each command's flags."""
  return '\n\n'.join([usage.strip()] + [f'{command} ' + help_text('', names).strip()
                                        for command, names in commands.items()])


def _check_arguments(rest, names):
  """One sentence for a stray argument, or for a flag other than `names`, this command's."""
  if len(rest) > 1:
    raise ConfigError(f'Unexpected argument {rest[1]!r}; every input is a flag (--name=value).')
  ours = {f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
          if 'research' in module for f in defined}  # A -m module is named by its path.
  for name in sorted(ours - set(names)):
    if flags.FLAGS[name].present:
      if name == 'mesh' and 'cpu_devices' in names:  # A command that lays out its own mesh.
        raise ConfigError('--mesh does not apply here; set the mesh with '
                          '--config.mesh.<axis>=SIZE.')
      raise ConfigError(f'--{name} does not apply here; drop it (the flags are --'
                        f'{", --".join(names)}).')


def check_output(name, others=()):
  """One sentence, before any work, where the file of flag --name could not be written: a folder
  (or a path ending in one), a path under a file, one that cannot be opened for writing (tried:
  os.access grants root everything, even /proc), or the file of another flag in `others`, which
  it would overwrite. Makes nothing."""
  path = flags.FLAGS[name].value
  if not path:
    return
  if os.path.isdir(path) or path.endswith(os.sep):
    raise ConfigError(f'--{name} {path} is a folder; pass the path of a file.')
  for other in others:
    if flags.FLAGS[other].value and (os.path.abspath(flags.FLAGS[other].value)
                                     == os.path.abspath(path)):
      raise ConfigError(f'--{name} {path} is also --{other}, which it would overwrite; pass '
                        'another path.')
  existing = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f'--{name} {path} lies under the file {existing}; pass a path in a '
                      'folder.')
  folder = os.path.dirname(os.path.abspath(path))
  try:
    if os.path.isdir(folder):  # Opened (which also tries the name), and removed if new.
      existed = os.path.exists(path)
      with open(path, 'a'):  # Appending writes nothing: a results file keeps its lines.
        pass
      if not existed:
        os.remove(path)
    else:  # Made, folders and all, after the work, or not at all where the work fails.
      cli.check_folder(folder, f'--{name} {path}: its folder')
  except (OSError, ValueError):
    raise ConfigError(f'--{name} {path} is not writable; pass another path.') from None


def write_output(name, text, append=False):
  """Writes `text` to the file of flag --name, making its folder. The path was checked up front,
  so a failure (a full disk, a path changed since) comes after any printed figures, as one
  sentence."""
  path = flags.FLAGS[name].value
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a' if append else 'w') as f:
      f.write(text)
  except OSError as error:
    reason = error.strerror or error
    raise ConfigError(f'--{name} {path} could not be written ({reason}); check the path and '
                      'its disk.') from None


def _flag_error(error, names, argv=()):
  """One sentence for an absl flag error: an unknown flag (naming the closest of `names`), a
  value its flag cannot take, or an override before --config (in `argv`, or a flagfile's)."""
  if isinstance(error, flags.UnrecognizedFlagError):
    close = difflib.get_close_matches(error.flagname, names, n=1)
    hint = f'the closest is --{close[0]}' if close else 'the flags are --' + ', --'.join(names)
    return ConfigError(f'Unknown flag --{error.flagname}; {hint}.')
  message = str(error).strip().split('\n')[0]
  early = re.search(r'Found ' + _OVERRIDE.pattern, message)
  if early:  # ml_collections applies an override only to a config named before it.
    override = early.group(1)
    if any(found and found.group(1) == override for found in map(_OVERRIDE.match, argv)):
      return ConfigError(f'{override} comes before --config; put the overrides after it.')
    return ConfigError(f'{override} comes from a --flagfile given before --config; put the '
                       '--flagfile after it.')
  value = re.match(r'flag (--\S+?=.*?): (.*)', message)
  if value:  # absl's reasons are Python's: name what the flag expects instead.
    argument, reason = value.groups()
    expected = next((kind for marker, kind in _EXPECTED if marker in reason), reason)
    return ConfigError(f'{argument} is not a valid value ({expected}); correct that flag.')
  return ConfigError(f'Could not apply the command line ({message.rstrip(".")}); correct it.')


_EXPECTED = (('for int()', 'an integer is expected'), ('to float', 'a number is expected'),
             ('boolean', 'true or false is expected'))


def mesh_sizes(config):
  """{axis: size} of config.mesh (one may be -1)."""
  return {axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES}


def dcn_sizes(config):
  """{axis: slices} for the axes that may span slices (config.mesh.dcn_<axis>)."""
  return {axis: config.mesh[f'dcn_{axis}'] for axis in mesh_lib.DCN_AXES}


def check_tensor_axis(family, model_config, tensor):
  """ConfigError unless the tensor axis size divides every head count the family shards."""
  heads = family.sharded_heads(model_config)
  if any(count % tensor for count in heads.values()):
    raise ConfigError(f'mesh.{mesh_lib.TENSOR}={tensor} must divide '
                      + ' and '.join(f'{name} ({count})' for name, count in heads.items()) + '.')


# Document sources, synthetic tokens and labelled-example files; the objective says which it reads.
DATA_SOURCES = (sources.KINDS + ('markov',)
                + tuple(k for k in labeled.SOURCES if k not in sources.KINDS))


# Sizes that must be positive in every family that has them.
MODEL_SIZES = ('num_layers', 'num_heads', 'emb_dim', 'mlp_dim', 'hidden_dim')


def _check_profile_window(t):
  """The traced steps (train.profile_start_step >= 0) must lie inside the run."""
  if t.profile_num_steps < 1:
    raise ConfigError(f'config.train.profile_num_steps must be positive, got '
                      f'{t.profile_num_steps}.')
  if t.profile_start_step >= 0 and t.profile_start_step + t.profile_num_steps > t.num_steps:
    longer = 'raise train.num_tokens' if t.num_tokens else 'raise train.num_steps'
    if t.profile_num_steps <= t.num_steps:
      longer = f'start by step {t.num_steps - t.profile_num_steps}, {longer}'
    raise ConfigError(f'config.train.profile_start_step={t.profile_start_step} traces '
                      f'{t.profile_num_steps} steps, past the run\'s last step ({t.num_steps}); '
                      f'{longer} or trace fewer steps (train.profile_num_steps).')


def _float_settings(tree, prefix=''):
  """(dotted key, value) of every float in a config's nested dict."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _float_settings(value, f'{prefix}{key}.')
    elif isinstance(value, float):
      yield prefix + key, value


def validate(config, num_devices, for_accelerators=False):
  """Checks a config against itself and the device count; returns the resolved mesh shape.
  `for_accelerators`: the run is planned for GPUs or TPUs, whatever this machine has."""
  m, o, t = config.model, config.optim, config.train
  try:
    family = models.get(m.family)
    objective = objectives.get(config.objective.name)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  # Model keys are checked where a family has them (a recurrent or counted model has no heads).
  model_choices = {'dtype': ('float32', 'bfloat16'), 'param_dtype': ('float32', 'bfloat16'),
                   'remat': tuple(layers.REMAT_POLICIES),
                   'attention': attention_lib.IMPLEMENTATIONS}
  choices = {
      **{f'model.{key}': (m[key], allowed) for key, allowed in model_choices.items() if key in m},
      'optim.name': (o.name, ('adamw', 'adafactor', 'lion')),
      'optim.decay': (o.decay, ('cosine', 'linear', 'rsqrt', 'constant')),
      'data.source': (config.data.source, DATA_SOURCES),
  }
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'config.{key}={value!r} is not one of {list(allowed)}.')
  for key, value in _float_settings(config.to_dict()):
    if not math.isfinite(value):  # nan passes every comparison below, inf most of them.
      raise ConfigError(f'config.{key}={value} is not a finite number; give one.')
  from research import optim  # Imported here: research.optim imports this module.
  optim.mu_dtype(o)
  try:
    tokenizer_lib.check_name(config.data.tokenizer)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if t.num_tokens < 0:
    raise ConfigError(f'config.train.num_tokens={t.num_tokens} must not be negative.')
  if t.num_tokens:  # A token budget: the steps whose batches reach it.
    t.num_steps = -(-t.num_tokens // max(t.batch_size * t.seq_len, 1))
  positive = {**{f'model.{key}': m[key] for key in MODEL_SIZES if key in m},
              'model.vocab_size': m.vocab_size, 'train.batch_size': t.batch_size,
              'train.seq_len': t.seq_len, 'train.num_steps': t.num_steps,
              'optim.grad_accum_steps': o.grad_accum_steps, 'optim.lr': o.lr,
              'train.log_every': t.log_every, 'train.eval_every': t.eval_every,
              'train.eval_batches': t.eval_batches, 'data.prefetch': config.data.prefetch,
              'checkpoint.every_steps': config.checkpoint.every_steps,
              # At least one checkpoint is kept: the final one.
              'checkpoint.keep': config.checkpoint.keep}
  for key, value in positive.items():
    if value <= 0:
      raise ConfigError(f'config.{key} must be positive, got {value}.')
  if 'profile_start_step' in t:
    _check_profile_window(t)
  for key, value in {'seed': config.seed, 'optim.clip_norm': o.clip_norm}.items():
    if value < 0:
      raise ConfigError(f'config.{key} must not be negative, got {value}.')
  w = config.watchdog
  if w.slow_factor <= 1 or w.slow_min_s < 0 or w.exit_after_s < 0 or w.peer_timeout_s < 1:
    raise ConfigError(f'config.watchdog needs slow_factor > 1, slow_min_s >= 0, exit_after_s >= 0 '
                      f'and peer_timeout_s >= 1, got {w.to_dict()}.')
  if m.get('remat') == 'offload' and not for_accelerators and jax.default_backend() == 'cpu':
    raise ConfigError("config.model.remat='offload' keeps activations in pinned host memory, "
                      "which needs a GPU or TPU; use 'dots' or 'full' on CPU.")
  if not 0 <= m.get('dropout_rate', 0.0) < 1:
    raise ConfigError(f'config.model.dropout_rate={m.get("dropout_rate")} must lie in [0, 1).')
  # Ahead of the objective's checks, whose advice for a length assumes the model takes it.
  if t.seq_len > m.max_len:
    raise ConfigError(f'train.seq_len={t.seq_len} exceeds model.max_len={m.max_len}; shorten the '
                      'sequences or raise max_len.')
  for check in (lambda: family.check_config(m), lambda: objective.check_config(config, family)):
    try:
      check()
    except (AttributeError, KeyError) as error:
      # A ConfigDict's missing key reads "'name'"; anything else is a fault to show as is.
      found = re.fullmatch(r'"?\'(\w+)\'"?', str(error))
      missing = found.group(1) if found else ''
      if not missing or missing in m:
        raise
      raise ConfigError(
          f'model.family={m.family} needs model settings this config does not have (model.'
          f'{missing}): another family\'s config cannot be switched over, nor a config of an '
          f'earlier version; start from a variant of configs/{m.family}.py.') from None
    except ValueError as error:
      raise ConfigError(str(error)) from None
  c = config.checkpoint
  if c.best_metric:
    names = [f'eval_{name}' for name in objectives.build(config).metric_names()]
    if c.best_metric not in names:
      raise ConfigError(f'checkpoint.best_metric={c.best_metric!r} is not an evaluation metric of '
                        f'objective.name={config.objective.name!r}; choose one of {names}.')
    if c.best_mode not in ('max', 'min'):
      raise ConfigError(f"checkpoint.best_mode={c.best_mode!r} is not one of ['max', 'min'].")
    better = report.direction(c.best_metric)  # None for a metric it does not know.
    if better and better != c.best_mode:
      raise ConfigError(f'checkpoint.best_metric={c.best_metric} is better when '
                        f'{"lower" if better == "min" else "higher"}, and best_mode={c.best_mode} '
                        f'would keep the worst checkpoint; set checkpoint.best_mode={better}.')
  if t.sample_tokens > 0 and getattr(family, 'GENERATES_TEXT', False):
    try:
      tokenizer = tokenizer_lib.get(config.data.tokenizer, config.data.extra_ids)
    except ValueError as error:  # A tokenizer file that is not there.
      raise ConfigError(str(error)) from None
    prompt = len(tokenizer.encode(t.sample_prompt))
    if prompt + t.sample_tokens > m.max_len:
      raise ConfigError(f'train.sample_prompt ({prompt} tokens) plus train.sample_tokens='
                        f'{t.sample_tokens} exceed model.max_len={m.max_len}; sample fewer tokens.')
  if o.warmup_steps < 0:
    raise ConfigError(f'optim.warmup_steps={o.warmup_steps} must not be negative.')
  if config.data.mixture and objectives.data_module(config).DATA != 'documents':
    raise ConfigError(f'data.mixture mixes document sources, which objective.name='
                      f'{config.objective.name} does not read; leave data.mixture empty.')
  if not 1 <= config.data.validation_percent <= 50:
    raise ConfigError(f'data.validation_percent={config.data.validation_percent} must lie in '
                      '[1, 50].')
  dcn = dcn_sizes(config)
  try:
    mesh = mesh_lib.resolve_shape(mesh_sizes(config), dcn, num_devices,
                                  mesh_lib.num_granules() if math.prod(dcn.values()) > 1 else 1)
  except mesh_lib.MeshError as error:
    raise ConfigError(str(error)) from None
  batch_shards = math.prod(mesh[axis] for axis in mesh_lib.BATCH_AXES)
  if t.batch_size % (batch_shards * o.grad_accum_steps):
    raise ConfigError(f'train.batch_size={t.batch_size} must divide evenly over the data axes '
                      f'({"*".join(mesh_lib.BATCH_AXES)}={batch_shards}) times '
                      f'optim.grad_accum_steps={o.grad_accum_steps}; use a multiple of '
                      f'{batch_shards * o.grad_accum_steps}.')
  check_tensor_axis(family, m, mesh[mesh_lib.TENSOR])
  sequence = mesh[mesh_lib.SEQUENCE]
  if t.seq_len % sequence:
    raise ConfigError(f'train.seq_len={t.seq_len} must divide evenly over mesh.'
                      f'{mesh_lib.SEQUENCE}={sequence}.')
  return mesh


def git_revision():
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=here, capture_output=True,
                           text=True, check=True).stdout.strip()
    return rev + ('-dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def host_processor():
  """The host CPU's model name and the cores this process may use: speed on CPU, ours and a
  peer's alike, changes with both (PyTorch's matrix products, for one, differ by vendor)."""
  name = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    name = names[0] if names else name
  except OSError:  # Not Linux: platform's answer stands.
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{name}, {cores} core{"s" if cores != 1 else ""}'


def _package_versions():
  names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'numpy',
           'tensorboardX', 'tensorflow-datasets', 'grain', 'array-record')
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _flat_settings(tree, prefix=''):
  """{'section.key': value} of a config read from JSON."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_settings(value, f'{prefix}{name}.'))
    else:
      flat[f'{prefix}{name}'] = value
  return flat


def _changed_settings(before, after):
  """'key (X there, Y here), ...' for the settings that differ between two configs read from
  JSON."""
  before, after = _flat_settings(before), _flat_settings(after)
  return ', '.join(f'{key} ({before.get(key, "unset")!r} there, {after.get(key, "unset")!r} '
                   'here)' for key in sorted(set(before) | set(after))
                   if before.get(key, 'unset') != after.get(key, 'unset'))


def record_run(config, workdir, data=None, resumed=True):
  """Writes the resolved config, package versions, git revision and data record to the workdir.

  Called once a run has started (so a failed start leaves the workdir as it was), by process 0
  only. A run resumed (from a checkpoint of the workdir) with a different config keeps the
  original config.json and adds a dated copy; a run that is not (`resumed` false: the workdir
  holds no checkpoint, e.g. after a run that diverged before its first save) writes config.json
  anew, since its checkpoints will be of this config.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  resolved = config.to_json_best_effort(indent=2, sort_keys=True)
  path = os.path.join(workdir, 'config.json')
  if resumed and os.path.exists(path):
    with open(path) as f:
      original = f.read()
    if original != resolved:
      path = os.path.join(workdir, f'config.{time.strftime("%Y%m%d-%H%M%S")}.json')
      changed = _changed_settings(json.loads(original), json.loads(resolved))
      print(f'Note: resumed with settings other than config.json\'s: {changed}; config.json '
            f'keeps the run\'s first settings and {os.path.basename(path)} records these.',
            file=sys.stderr)
  with open(path, 'w') as f:
    f.write(resolved)
  environment = dict(python=sys.version, platform=platform.platform(),
                     processor=host_processor(), git=git_revision(),
                     packages=_package_versions(), argv=sys.argv, data=data)
  with open(os.path.join(workdir, 'environment.json'), 'w') as f:
    json.dump(environment, f, indent=2, sort_keys=True)
