"""Where a compiled step spends its time: a profiler trace's operations, attributed to the model
code that made them.

XLA names each operation of a compiled program and records, in its metadata, the op_name that
JAX gave it: the transformation (jvp for the forward pass, transpose(jvp) for the backward
pass), the module path (flax modules and jax.named_scope) and the primitive, e.g.
`jit(train_step)/transpose(jvp(Decoder.language_model))/Decoder/layers_3/mlp/fc/dot_general`.
A profiler trace names the same operations, so each timed event can be charged to a pass and a
scope (`Decoder/layers_*/mlp/fc`, all layers together). The table this writes is the first
thing to read after a benchmark: which part of the model, forward or backward, takes the time.

A fusion counts under the one op_name XLA keeps for it (its root's), so work fused across
modules is charged to one of them: on CPU, a product whose output a LayerNorm's statistics read
in the same fusion counts under the norm.
"""

import collections
import glob
import gzip
import json
import os
import re

# Op-name segments that say how the program is built, not which module ran.
_STRUCTURE = frozenset({'while', 'body', 'cond', 'closed_call', 'checkpoint',
                        'rematted_computation', 'remat', 'scan', 'shard_map'})
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{\s*$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OPERANDS = re.compile(r'[\w\-]+\((%[^)]*)\)')
_DIFFERENTIATED = re.compile(r'(?:transpose\()?jvp\((.*?)\)\)?')
_MODULE = re.compile(r'^HloModule ([\w.\-]+)', re.MULTILINE)
PASSES = ('forward', 'backward', 'recompute', 'optimizer', 'communication', 'other')
# XLA names an instruction after its opcode; a collective's time is its pass, whichever scopes
# the combined instruction serves.
_COLLECTIVE = re.compile(r'^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|'
                         r'collective-broadcast|ragged-all-to-all)')


def instruction_op_names(hlo_text):
  """(module name, {instruction name: its op_name}) of an HLO module's text. An instruction that
  carries no op_name of its own (XLA made it) takes that of the computation it calls (its root's,
  or else the first one named there), or else that of an instruction that reads it."""
  module = _MODULE.search(hlo_text)
  op_names, calls, computation_op_names, operands = {}, {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    name, rest = instruction.groups()
    op_name = _OP_NAME.search(rest)
    if op_name:
      op_names[name] = op_name.group(1)
      if computation and (line.lstrip().startswith('ROOT')
                          or computation not in computation_op_names):
        computation_op_names[computation] = op_name.group(1)
    called = _CALLS.search(rest)
    if called:
      calls[name] = called.group(1)
    read = _OPERANDS.search(rest)
    if read:
      operands[name] = re.findall(r'%([\w.\-]+)', read.group(1))
  for name, called in calls.items():
    if name not in op_names and called in computation_op_names:
      op_names[name] = computation_op_names[called]
  for name, inputs in reversed(operands.items()):  # Readers after what they read.
    for operand in inputs:
      if operand not in op_names and name in op_names:
        op_names[operand] = op_names[name]
  return (module.group(1) if module else None), op_names


def attribute(op_name):
  """(pass, scope) of an op_name: the pass is one of PASSES; the scope is the module path
  without the transformation wrappers and the primitive, every layer index as `*`."""
  op_name = op_name.split(';')[0]
  if 'rematted_computation' in op_name:
    pass_ = 'recompute'  # The backward pass running part of the forward pass again (remat).
  elif 'transpose(' in op_name:
    pass_ = 'backward'
  elif 'jvp(' in op_name:
    pass_ = 'forward'
  elif '/optimizer/' in op_name:
    pass_ = 'optimizer'
  else:
    pass_ = 'other'
  segments = op_name.split('/')[:-1]  # The last segment is the primitive.
  kept = []
  for i, segment in enumerate(segments):
    differentiated = _DIFFERENTIATED.fullmatch(segment)
    if differentiated:  # jvp(X): X is the outermost scope inside the differentiated function,
      scope = differentiated.group(1)  # unless it is a flax method the module path repeats.
      following = segments[i + 1] if i + 1 < len(segments) else ''
      if scope and '(' not in scope and not following.startswith(scope.split('.')[0] + '.') \
          and following != scope.split('.')[0]:
        kept.append(scope)
    elif '(' not in segment and segment not in _STRUCTURE:
      kept.append(segment)
  if pass_ == 'optimizer':
    kept = kept[kept.index('optimizer') + 1:]
  scope = re.sub(r'(layers_)\d+', r'\1*', '/'.join(kept))
  return pass_, scope


def trace_file(trace_dir):
  """The newest Chrome-format trace (`*.trace.json.gz`) jax.profiler wrote under trace_dir."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  return max(files, key=os.path.getmtime)


def summarize(events, module, op_names, steps):
  """Rows {pass_, scope, ms, ops} per step and device, the slowest first, from the trace events
  of `steps` steps of the program `module`.

  The events that count are the operations the runtime executed: complete events ('X') whose
  args name the program (hlo_module) and the instruction (hlo_op), as XLA's CPU runtime and the
  GPU kernels record them; where some come from a device's own timeline (a GPU's, in a process
  named /device:...), only those, one timeline per device. An instruction without an op_name (a
  GPU command buffer, which runs many kernels as one) gets a row of its own. Operations that run
  side by side (CPU threads, GPU streams) each count in full, so the rows may add up to more than
  the wall time."""
  processes = {event['pid']: (event.get('args') or {}).get('name', '') for event in events
               if event.get('ph') == 'M' and event.get('name') == 'process_name'}
  executed = [event for event in events
              if event.get('ph') == 'X' and 'dur' in event
              and (event.get('args') or {}).get('hlo_op')
              and str(event['args'].get('hlo_module', '')).startswith(module)]
  on_devices = [e for e in executed if processes.get(e.get('pid'), '').startswith('/device:')]
  if on_devices:
    executed = on_devices
  totals = collections.defaultdict(float)
  counts = collections.Counter()
  devices = set()
  for event in executed:
    args = event['args']
    instruction = args['hlo_op']
    devices.add(event['pid'] if on_devices else args.get('device_ordinal', event.get('pid')))
    op_name = op_names.get(instruction)
    if op_name is None and '/' in args.get('tf_op', ''):  # GPU kernels carry it themselves.
      op_name = args['tf_op']
    collective = _COLLECTIVE.match(instruction)
    if collective:
      key = ('communication', collective.group(1))
    elif op_name is not None:
      key = attribute(op_name)
    else:
      key = ('other', '(' + re.sub(r'\.\d+$', '', instruction) + ')')
    totals[key] += event['dur']
    counts[key] += 1
  per_step = steps * max(len(devices), 1)
  rows = [dict(pass_=key[0], scope=key[1], ms=total / per_step / 1000, ops=counts[key] / per_step)
          for key, total in totals.items()]
  return sorted(rows, key=lambda row: (-row['ms'], row['pass_'], row['scope']))


def read_events(path):
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def markdown(rows, steps, wall_ms):
  """The rows as a markdown table, with each pass's total first."""
  total = sum(row['ms'] for row in rows)
  lines = [f'{steps} profiled steps, {wall_ms:.2f} ms of wall time per step; the operations '
           f'below ran {total:.2f} ms per step and device (side by side, they may add up to '
           'more).', '']
  if not rows:
    lines.append('No event of the trace named an operation of the compiled step.')
    return '\n'.join(lines) + '\n'
  by_pass = collections.defaultdict(float)
  for row in rows:
    by_pass[row['pass_']] += row['ms']
  lines += ['| pass | ms / step | share |', '|---|---:|---:|']
  for pass_ in PASSES:
    if pass_ in by_pass:
      lines.append(f'| {pass_} | {by_pass[pass_]:.3f} | {by_pass[pass_] / total:.1%} |')
  lines += ['', '| pass | scope | ms / step | share | operations / step |',
            '|---|---|---:|---:|---:|']
  for row in rows:
    lines.append(f"| {row['pass_']} | {row['scope'] or '(top level)'} | {row['ms']:.3f} | "
                 f"{row['ms'] / total:.1%} | {row['ops']:g} |")
  return '\n'.join(lines) + '\n'


def write_summary(directory, hlo_text, steps, wall_ms):
  """profile.md in `directory` from the newest trace there of `steps` steps of the compiled
  program `hlo_text`; returns its path."""
  module, op_names = instruction_op_names(hlo_text)
  rows = summarize(read_events(trace_file(directory)), module, op_names, steps)
  path = os.path.join(directory, 'profile.md')
  with open(path, 'w') as f:
    f.write(markdown(rows, steps, wall_ms))
  return path
