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
import datetime
import glob
import gzip
import json
import os
import re
import socket
from typing import NamedTuple

import jax

from research import config as config_lib

PASSES = ('forward', 'backward', 'recompute', 'optimizer', 'communication', 'other')
# What writing a trace out or summarising it can raise: jax's profiler its own errors (a
# RuntimeError), files OSError, a truncated trace EOFError, a malformed trace or program ValueError.
FAILURES = (RuntimeError, OSError, ValueError, EOFError)
# Op-name segments that say how the program is built, not which module ran.
_STRUCTURE = frozenset({'while', 'body', 'cond', 'closed_call', 'checkpoint',
                        'rematted_computation', 'remat', 'scan', 'shard_map',
                        'custom_vjp_call', 'custom_jvp_call'})
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
                'collective-permute', 'collective-broadcast')
_MODULE = re.compile(r'^HloModule ([\w.\-]+)', re.MULTILINE)
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%?([\w.\-]+) = (.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_DIFFERENTIATED = re.compile(r'transpose\(jvp\((.*)\)\)|jvp\((.*)\)')


class Program(NamedTuple):
  """What a profile needs of a compiled program: its module name, each instruction's op_name
  and the collective (all-reduce, ...) each communicating instruction runs."""
  module: str
  op_names: dict
  collectives: dict


def _opcode_and_operands(rest):
  """(opcode, operand names) of an instruction's text after `name = `: its shape (a tuple in
  parentheses, or one token), the opcode, and the operands up to the matching parenthesis, each
  printed as [shape] [%]name."""
  if rest.startswith('('):  # A tuple shape.
    depth = 0
    for end, char in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        break
    rest = rest[end + 1:].lstrip()
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  opcode, _, rest = rest.partition('(')
  depth, operands, current = 1, [], ''
  for char in rest:
    depth += {'(': 1, '[': 1, '{': 1, ')': -1, ']': -1, '}': -1}.get(char, 0)
    if depth == 0 or (depth == 1 and char == ','):
      operands.append(current.strip())
      current = ''
      if depth == 0:
        break
    else:
      current += char
  names = [operand.split()[-1].lstrip('%') for operand in operands if operand]
  return opcode.strip(), names


def _collective(opcode):
  """The collective an opcode runs (all-reduce for all-reduce-start too), or None."""
  base = re.sub(r'-(start|done)$', '', opcode)
  return base if base in _COLLECTIVES else None


def parse_program(hlo_text):
  """The Program of an HLO module's text (a compiled step's `as_text()`).

  An instruction that carries no op_name of its own (XLA made it) takes that of the computation
  it calls (its root's, or else the first one named there), or else that of an instruction that
  reads it; a fusion around a collective counts as that collective."""
  if not hlo_text or not _MODULE.search(hlo_text):
    raise ValueError('the compiled step gave no HLO module text to attribute the trace with')
  op_names, calls, operands, collectives = {}, {}, {}, {}
  computation_op_names, computation_collectives = {}, {}
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    root, name, rest = instruction.groups()
    opcode, operands[name] = _opcode_and_operands(rest)
    op_name = _OP_NAME.search(rest)
    if op_name:
      op_names[name] = op_name.group(1)
      if computation and (root or computation not in computation_op_names):
        computation_op_names[computation] = op_name.group(1)
    if _collective(opcode):
      collectives[name] = _collective(opcode)
      computation_collectives[computation] = collectives[name]
    called = _CALLS.search(rest)
    if called:
      calls[name] = called.group(1)
  for name, called in calls.items():
    if called in computation_collectives:
      collectives[name] = computation_collectives[called]
    if name not in op_names and called in computation_op_names:
      op_names[name] = computation_op_names[called]
  for name, inputs in reversed(operands.items()):  # Readers after what they read.
    for operand in inputs:
      if operand in operands and operand not in op_names and name in op_names:
        op_names[operand] = op_names[name]
  return Program(_MODULE.search(hlo_text).group(1), op_names, collectives)


def _differentiated_scope(segment, following):
  """X of a jvp(X) or transpose(jvp(X)) segment: the outermost scope inside the differentiated
  function, unless it is a flax method (`Decoder.language_model`) the module path after it
  repeats; '' for none; None where the segment is not such a wrapper."""
  match = _DIFFERENTIATED.fullmatch(segment)
  if not match:
    return None
  scope = match.group(1) or match.group(2) or ''
  module = scope.split('.')[0]
  if '(' in scope or following == module or following.startswith(module + '.'):
    return ''
  return scope


def attribute(op_name):
  """(pass, scope) of an op_name: the pass is one of PASSES; the scope is the module path
  without the transformation wrappers and the primitive, every layer index as `*`."""
  segments = op_name.split(';')[0].split('/')[:-1]  # The last segment is the primitive.
  kept = []
  for i, segment in enumerate(segments):
    following = segments[i + 1] if i + 1 < len(segments) else ''
    scope = _differentiated_scope(segment, following)
    if scope and kept[-1:] != [scope]:  # transpose(jvp(X))/jvp(X)/...: remat names X twice.
      kept.append(scope)
    elif scope is None and '(' not in segment and segment not in _STRUCTURE:
      kept.append(segment)
  if 'rematted_computation' in segments:
    pass_ = 'recompute'  # The backward pass running part of the forward pass again (remat).
  elif any(s.startswith('transpose(') for s in segments):
    pass_ = 'backward'
  elif any(s.startswith('jvp(') for s in segments):
    pass_ = 'forward'
  elif kept[:1] == ['optimizer']:  # train_step's own named scope.
    pass_, kept = 'optimizer', kept[1:]
  else:
    pass_ = 'other'
  return pass_, re.sub(r'(layers_)\d+', r'\1*', '/'.join(kept))


def trace_file(trace_dir):
  """This host's newest Chrome-format trace (`<hostname>.trace.json.gz`, as jax.profiler names
  it) under trace_dir, where several hosts may write theirs."""
  pattern = os.path.join(trace_dir, '**', f'{socket.gethostname()}.trace.json.gz')
  files = glob.glob(pattern, recursive=True)
  if not files:
    raise FileNotFoundError(f'no trace of this host ({pattern}) was written')
  return max(files, key=os.path.getmtime)


def read_events(path):
  with gzip.open(path, 'rt') as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def _executed(events, module):
  """The events of operations the runtime executed for `module`, and the device each ran on.

  Such an event is complete ('X') and its args name the program (hlo_module) and the instruction
  (hlo_op), as XLA's CPU runtime and GPU kernels record them. Where some come from a device's own
  timeline (a process named /device:..., a GPU's), only those count, and of them only the
  kernels of its streams where there are any (not the lines the profiler derives from them)."""
  processes, threads = {}, {}
  for event in events:
    if event.get('ph') == 'M' and event.get('name') == 'process_name':
      processes[event.get('pid')] = (event.get('args') or {}).get('name', '')
    elif event.get('ph') == 'M' and event.get('name') == 'thread_name':
      threads[event.get('pid'), event.get('tid')] = (event.get('args') or {}).get('name', '')
  executed = [event for event in events
              if event.get('ph') == 'X' and 'dur' in event
              and (event.get('args') or {}).get('hlo_op')
              and event['args'].get('hlo_module') == module]
  on_devices = [event for event in executed
                if processes.get(event.get('pid'), '').startswith('/device:')]
  if not on_devices:
    return [(event, str(event['args'].get('device_ordinal', event.get('pid'))))
            for event in executed]
  streams = [event for event in on_devices
             if threads.get((event.get('pid'), event.get('tid')), '').startswith('Stream')]
  return [(event, str(event.get('pid'))) for event in streams or on_devices]


def summarize(events, program, steps):
  """Rows {pass_, scope, ms, ops} per step and device, the slowest first, from the trace events
  of `steps` steps of `program` (see _executed). A collective counts as communication, whichever
  scopes it serves; an instruction without an op_name gets a row of its own. That includes a
  GPU command buffer, which runs many kernels as one, in a trace taken with
  --xla_enable_command_buffers_during_profiling=true (by default XLA runs their kernels one by
  one under a profiler). Operations that run side by side (CPU threads, GPU streams) each count
  in full, so the rows may add up to more than the wall time."""
  totals = collections.defaultdict(float)
  counts = collections.Counter()
  devices = set()
  for event, device in _executed(events, program.module):
    devices.add(device)
    instruction = event['args']['hlo_op']
    op_name = program.op_names.get(instruction)
    if op_name is None and '/' in event['args'].get('tf_op', ''):  # GPU kernels carry it.
      op_name = event['args']['tf_op']
    if instruction in program.collectives:
      key = ('communication', program.collectives[instruction])
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


def heading(command, note=''):
  """profile.md's first line: what was profiled (`command`, then `note`), on which devices and
  when (the trace itself names none of it)."""
  device = jax.local_devices()[0]
  where = device.device_kind
  if device.platform == 'cpu':
    where += f' ({config_lib.host_processor()})'
  when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  return (f'Profile of `{command}`{note} on {jax.local_device_count()} x {where}, jax '
          f'{jax.__version__}, {when}.')


def markdown(rows, steps, wall_ms, title=''):
  """The rows as a markdown table, with each pass's total first, under `title` (heading())."""
  total = sum(row['ms'] for row in rows)
  share = lambda ms: f'{ms / total:.1%}' if total else '-'
  lines = [title, ''] if title else []
  lines += [f'{steps} profiled steps, {wall_ms:.2f} ms of wall time per step; the operations '
            f'below ran {total:.2f} ms per step and device (side by side, they may add up to '
            'more).', '']
  if not rows:
    lines.append('No event of the trace named an operation of the compiled step.')
    return '\n'.join(lines) + '\n'
  by_pass = collections.defaultdict(float)
  for row in rows:
    by_pass[row['pass_']] += row['ms']
  lines += ['| pass | ms / step | share |', '|---|---:|---:|']
  lines += [f'| {pass_} | {by_pass[pass_]:.3f} | {share(by_pass[pass_])} |'
            for pass_ in PASSES if pass_ in by_pass]
  lines += ['', '| pass | scope | ms / step | share | operations / step |',
            '|---|---|---:|---:|---:|']
  lines += [f"| {row['pass_']} | {row['scope'] or '(top level)'} | {row['ms']:.3f} | "
            f"{share(row['ms'])} | {row['ops']:g} |" for row in rows]
  if any(row['scope'].startswith('(') for row in rows):
    lines += ['', 'A scope in parentheses names the HLO instructions that XLA made itself (a '
              'layout copy, a reduction it split), where neither they, what they call nor what '
              'reads them carries an operation of the model to name.']
  return '\n'.join(lines) + '\n'


def write_summary(directory, hlo_text, steps, wall_ms, title=''):
  """profile.md in `directory` from this host's newest trace there of `steps` steps of the
  compiled program `hlo_text`, under `title`; returns its path."""
  rows = summarize(read_events(trace_file(directory)), parse_program(hlo_text), steps)
  path = os.path.join(directory, 'profile.md')
  with open(path, 'w') as f:
    f.write(markdown(rows, steps, wall_ms, title))
  return path
