"""Profiles attributed to the model code (research/profiling.py): passes and scopes from op_names,
the program's instructions, the events that count, per-step and per-device figures, and real
traces of a jitted gradient."""

import socket

import jax
import jax.numpy as jnp
import pytest

from research import profiling

STEP = 'jit(train_step)'


@pytest.mark.parametrize('op_name, expected', [
    (f'{STEP}/jvp(Decoder.language_model)/Decoder/layers_3/mlp/fc/dot_general',
     ('forward', 'Decoder/layers_*/mlp/fc')),
    (f'{STEP}/transpose(jvp(Decoder.language_model))/Decoder/layers_12/attn/query/dot_general',
     ('backward', 'Decoder/layers_*/attn/query')),
    # Scanned layers under remat: the recomputed forward pass inside the backward pass.
    (f'{STEP}/transpose(jvp(Decoder.language_model))/Decoder/while/body/closed_call/checkpoint/'
     'rematted_computation/layers/attn/mul', ('recompute', 'Decoder/layers/attn')),
    (f'{STEP}/transpose(jvp(Decoder.language_model))/Decoder/while/body/closed_call/checkpoint/'
     'layers/mlp_norm/mul', ('backward', 'Decoder/layers/mlp_norm')),
    (f'{STEP}/jvp(Encoder)/layers_1/layers_1.layer/attn/jit(_where)/select_n',
     ('forward', 'Encoder/layers_*/layers_*.layer/attn')),
    (f'{STEP}/jvp(Decoder.language_model)/Decoder.logits/token_embed.attend/dot_general',
     ('forward', 'Decoder.logits/token_embed.attend')),
    # A named scope that is the outermost inside the differentiated function.
    ('jit(loss)/jvp(layer)/tanh', ('forward', 'layer')),
    ('jit(loss)/transpose(jvp(layer))/mul', ('backward', 'layer')),
    ('jit(loss)/transpose(jvp(layer))/jvp(layer)/checkpoint/rematted_computation/dot_general',
     ('recompute', 'layer')),
    (f'{STEP}/transpose(jvp(jit(take_along_axis)))/scatter-add', ('backward', '')),
    (f'{STEP}/optimizer/jit(clip)/max', ('optimizer', '')),
    (f'{STEP}/metrics/optimizer/sqrt', ('other', 'metrics/optimizer')),  # Not train_step's.
    (f'{STEP}/metrics/sqrt', ('other', 'metrics')),
    (f'{STEP}/mul;{STEP}', ('other', '')),  # Merged metadata: the first name counts.
    ('reduce_sum', ('other', '')),
])
def test_op_names_give_the_pass_and_the_scope(op_name, expected):
  assert profiling.attribute(op_name) == expected


def _op_name(path):
  return f'metadata={{op_name="jit(s)/{path}"}}'


# A compiled program's text, in the forms XLA prints: operands with and without their shapes,
# tuple shapes, fusions without metadata, asynchronous collectives.
HLO = '\n'.join([
    'HloModule jit_s, is_scheduled=true',
    '',
    '%fused_computation.8 (param_0: f32[8]) -> f32[8] {',
    '  %param_0 = f32[8]{0} parameter(0)',
    f'  %exp.1 = f32[8]{{0}} exponential(%param_0), {_op_name("jvp(M)/M/layers_0/attn/exp")}',
    f'  ROOT %mul.2 = f32[8]{{0}} multiply(%exp.1, %exp.1), {_op_name("jvp(M)/M/layers_0/at/m")}',
    '}',
    '',
    '%wrapped_all_reduce.11 (param_0: f32[8]) -> f32[8] {',
    '  %param_0.1 = f32[8]{0} parameter(0)',
    '  ROOT %all-reduce.12 = f32[8]{0} all-reduce(%param_0.1), to_apply=%sum',
    '}',
    '',
    'ENTRY %main.7 (p.1: f32[8]) -> f32[8] {',
    '  %p.1 = f32[8]{0} parameter(0)',
    '  %ynn_fusion.8 = f32[8]{0} fusion(%p.1), kind=kCustom, calls=%fused_computation.8',
    '  %reduce-window.9 = f32[8]{0} reduce-window(f32[8]{0} %p.1, f32[] %c), window={size=1}',
    '  %wrapped_reduce.10 = f32[8]{0} fusion(f32[8]{0} %reduce-window.9, f32[8]{0} '
    f'%ynn_fusion.8), kind=kLoop, calls=%r, {_op_name("transpose(jvp(M))/M/layers_2/v/sum")}',
    '  %tuple.3 = (f32[8]{0}, f32[8]{0}) tuple(%p.1, %wrapped_reduce.10)',
    f'  %fusion.1 = f32[8]{{0}} fusion(%p.1), kind=kLoop, {_op_name("jvp(M)/M/layers_0/mlp/mul")}',
    f'  %fusion.2 = f32[8]{{0}} fusion(%p.1), kind=kLoop, {_op_name("jvp(M)/M/layers_1/mlp/add")}',
    '  %ynn_fusion.3 = f32[8]{0} fusion(%p.1), kind=kCustom, '
    + _op_name('transpose(jvp(M))/M/layers_0/attn/dot_general'),
    '  %all-reduce-start.4 = f32[8]{0} all-reduce-start(%p.1), to_apply=%sum, '
    + _op_name('transpose(jvp(M))/M/layers_0/attn/dot_general'),
    '  %all-reduce-done.4 = f32[8]{0} all-reduce-done(%all-reduce-start.4)',
    '  %all_reduce_fusion.11 = f32[8]{0} fusion(%p.1), kind=kCustom, '
    'calls=%wrapped_all_reduce.11',
    '  %command_buffer.5 = f32[8]{0} call(%p.1), to_apply=%cb',
    f'  ROOT %copy.6 = f32[8]{{0}} copy(%p.1), {_op_name("optimizer/add")}',
    '}',
])


def test_the_program_names_every_instruction_it_can():
  program = profiling.parse_program(HLO)
  assert program.module == 'jit_s'
  assert program.op_names['fusion.1'] == 'jit(s)/jvp(M)/M/layers_0/mlp/mul'
  # Made by XLA without an op_name: named by the root of the computation it calls, or by the
  # instruction that reads it (operands printed with their shapes, too).
  assert program.op_names['ynn_fusion.8'] == 'jit(s)/jvp(M)/M/layers_0/at/m'
  assert program.op_names['reduce-window.9'] == program.op_names['wrapped_reduce.10']
  assert 'command_buffer.5' not in program.op_names  # Neither its own nor a named reader.
  # Collectives by their opcode, asynchronous halves and fusions around one included.
  assert program.collectives == {'all-reduce-start.4': 'all-reduce',
                                 'all-reduce-done.4': 'all-reduce',
                                 'all-reduce.12': 'all-reduce',
                                 'all_reduce_fusion.11': 'all-reduce'}


def test_text_without_a_module_is_refused():
  for text in (None, '', 'ENTRY %main () -> f32[] {\n}'):
    with pytest.raises(ValueError, match='gave no HLO module text'):
      profiling.parse_program(text)


def _event(instruction, dur, device='0', module='jit_s', ph='X', **args):
  return dict(ph=ph, name=instruction, dur=dur, pid=1,
              args=dict(hlo_op=instruction, hlo_module=module, device_ordinal=device, **args))


def test_events_of_the_step_are_charged_per_step_and_device():
  program = profiling.parse_program(HLO)
  events = []
  for device in ('0', '1'):  # Two steps on each of two devices.
    for _ in range(2):
      events += [_event('fusion.1', 100.0, device), _event('fusion.2', 300.0, device),
                 _event('ynn_fusion.3', 500.0, device),
                 _event('all-reduce-start.4', 150.0, device),
                 _event('all-reduce-done.4', 50.0, device),
                 _event('command_buffer.5', 40.0, device), _event('copy.6', 20.0, device)]
  events += [
      _event('fusion.1', 9e6, module='jit_s_other'),  # Another program's instruction.
      _event('fusion.1', 9e6, ph='B'),  # Not a complete event.
      dict(ph='X', name='fusion.1', dur=9e6, pid=1, args={}),  # A host event naming the op.
      # A GPU kernel whose instruction this text lacks: its own op_name (tf_op) places it.
      _event('loop_fusion.9', 60.0, tf_op='jit(s)/jvp(M)/M/layers_2/mlp/mul'),
  ]
  rows = profiling.summarize(events, program, steps=2)
  assert [(r['pass_'], r['scope'], r['ms'], r['ops']) for r in rows] == [
      ('backward', 'M/layers_*/attn', 0.5, 1.0),
      ('forward', 'M/layers_*/mlp', 0.415, 2.25),  # (100 + 300) x 4 + 60 over 2 steps, 2 devices.
      ('communication', 'all-reduce', 0.2, 2.0),
      ('other', '(command_buffer)', 0.04, 1.0),
      ('optimizer', '', 0.02, 1.0),
  ]
  table = profiling.markdown(rows, steps=2, wall_ms=1.0)
  assert '| forward | 0.415 | 35.3% |' in table  # Of the 1.175 ms the operations ran.
  assert '| backward | M/layers_*/attn | 0.500 | 42.6% | 1 |' in table
  assert '| optimizer | (top level) | 0.020 | 1.7% | 1 |' in table
  assert table.index('| forward | 0.415') < table.index('| backward | 0.500')  # Passes in order.
  assert table.rstrip().endswith('A scope in parentheses names the HLO instructions that XLA made '
                                 'itself (a layout copy, a reduction it split), where neither '
                                 'they, what they call nor what reads them carries an operation '
                                 'of the model to name.')
  assert 'scope in parentheses' not in profiling.markdown(rows[:2], steps=2, wall_ms=1.0)


def test_on_gpus_only_the_kernels_of_the_devices_streams_count():
  program = profiling.parse_program(HLO)
  events = [dict(ph='M', name='process_name', pid=pid, args=dict(name=name))
            for pid, name in ((1, '/host:CPU'), (2, '/device:GPU:0'), (3, '/device:GPU:1'))]
  events += [dict(ph='M', name='thread_name', pid=pid, tid=tid, args=dict(name=name))
             for pid in (2, 3) for tid, name in ((1, 'Stream #13(Compute)'), (2, 'XLA Ops'))]
  for pid in (1, 2, 3):
    for tid in (1, 2):  # The host's launch and the derived "XLA Ops" line must not count.
      event = _event('fusion.1', 100.0 * pid)
      del event['args']['device_ordinal']  # GPU kernels name no ordinal: their process does.
      events.append(dict(event, pid=pid, tid=tid))
  [row] = profiling.summarize(events, program, steps=1)
  assert (row['pass_'], row['scope'], row['ms'], row['ops']) == (
      'forward', 'M/layers_*/mlp', 0.25, 1.0)  # (200 + 300) us over two GPUs.


def test_tables_without_time_say_so():
  program = profiling.parse_program(HLO)
  table = profiling.markdown(profiling.summarize([], program, steps=3), 3, 5.0)
  assert 'No event of the trace named an operation of the compiled step.' in table
  rows = profiling.summarize([_event('fusion.1', 0.0)], program, steps=1)
  assert '| forward | M/layers_*/mlp | 0.000 | - | 1 |' in profiling.markdown(rows, 1, 1.0)


@jax.custom_vjp
def _scaled_tanh(x):
  return jnp.tanh(x) * 2


_scaled_tanh.defvjp(lambda x: (_scaled_tanh(x), x),
                    lambda x, g: (g * 2 * (1 - jnp.tanh(x) ** 2),))


def test_a_real_trace_of_a_jitted_gradient_is_attributed(tmp_path):
  """Every operation XLA:CPU ran is charged to a scope of the model code: named scopes, a custom
  gradient and remat included."""
  def loss(w, x):
    with jax.named_scope('layer'):
      h = jax.checkpoint(lambda h: _scaled_tanh(h @ w))(x)
    with jax.named_scope('head'):
      return jnp.sum(h ** 2)

  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((32, 64))
  program = profiling.parse_program(step.lower(w, x).compile().as_text())
  jax.block_until_ready(step(w, x))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  for _ in range(3):
    jax.block_until_ready(step(w, x))
  jax.profiler.stop_trace()
  path = profiling.write_summary(str(tmp_path), step.lower(w, x).compile().as_text(), 3, 1.0)
  assert path == str(tmp_path / 'profile.md') and '| backward | layer |' in open(path).read()
  rows = profiling.summarize(profiling.read_events(profiling.trace_file(str(tmp_path))),
                             program, steps=3)
  # The checkpointed layer's forward pass runs again inside the backward pass; XLA fuses what is
  # left of the first one into the backward pass.
  scopes = {(r['pass_'], r['scope']) for r in rows}
  assert {('recompute', 'layer'), ('backward', 'layer')} <= scopes, scopes
  assert all(scope in ('layer', 'head') for _, scope in scopes), scopes  # All attributed.
  assert all(r['ms'] > 0 for r in rows)
  # Each traced call ran the same operations: whole numbers of them per step.
  assert all(r['ops'] == int(r['ops']) >= 1 for r in rows)


def test_the_trace_read_is_this_hosts(tmp_path):
  with pytest.raises(FileNotFoundError, match='no trace of this host'):
    profiling.trace_file(str(tmp_path))
  other = tmp_path / 'plugins' / 'profile' / 'run'
  other.mkdir(parents=True)
  (other / 'another-host.trace.json.gz').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='no trace of this host'):
    profiling.trace_file(str(tmp_path))
  (other / f'{socket.gethostname()}.trace.json.gz').write_bytes(b'')
  assert profiling.trace_file(str(tmp_path)).endswith(f'{socket.gethostname()}.trace.json.gz')



def _profiled_run(decoder_config, traced_steps):
  """Three steps of a one-layer decoder over this process's devices, traced from the second."""
  config = decoder_config('tiny')
  config.model.num_layers = 1
  config.train.update(dict(batch_size=8, seq_len=16, num_steps=3, log_every=1, eval_every=3,
                           eval_batches=1, progress_bar=False, tensorboard=False,
                           profile_start_step=1, profile_num_steps=traced_steps))
  config.checkpoint.every_steps = 3
  config.mesh.data = -1
  return config


def _stop_after_step_2(monkeypatch):
  """A stop request (SIGTERM, as on preemption) that arrives after step 2."""
  from research import preemption

  def should_stop(self, step):
    self.signal = self.signal or ('SIGTERM' if step >= 2 else None)
    return self.signal is not None
  monkeypatch.setattr(preemption.StopRequest, 'should_stop', should_stop)


@pytest.mark.parametrize('failing', ['start', 'stop_when_the_run_stops_inside_the_traced_steps'])
def test_a_profiler_that_fails_costs_one_sentence_and_the_run_finishes(
    decoder_config, tmp_path, monkeypatch, capsys, failing):
  """A profile is never worth the run: a profiler that cannot start (another trace running) or
  cannot write its trace out (two processes' traces in one folder once left a truncated file)
  is one printed sentence, and training goes on to its last step and checkpoint. The second
  case stops inside the traced steps, so the trace ends where the run ends, after its saves
  (tests/test_train_cli.py has jax's own failure to write, inside the run)."""
  from research import train  # Imported here: the tests above need no trainer.
  import runs
  folder = tmp_path / 'profile'
  if failing == 'start':
    real, name, last_step = jax.profiler.start_trace, 'start_trace', 3
    error = RuntimeError('Profile has already been started. Only one profile may be run at a '
                         'time.')
    expected = (f'No profile: the profiler could not start in {folder} ({error}); training goes '
                'on (stop the other trace to profile this run).')
  else:
    real, name, last_step = jax.profiler.stop_trace, 'stop_trace', 2
    error = EOFError('Compressed file ended before the end-of-stream marker was reached')
    expected = (f'The profiler trace in {folder} could not be written out ({error}); training '
                'goes on without it (check that the folder is writable and has room).')
    _stop_after_step_2(monkeypatch)

  def fail(*args, **kwargs):
    real(*args, **kwargs)  # jax's state stays sound for the tests after this one.
    if name == 'start_trace':
      jax.profiler.stop_trace()
    raise error

  monkeypatch.setattr(jax.profiler, name, fail)
  train.run(_profiled_run(decoder_config, 1 if failing == 'start' else 2), str(tmp_path))
  said = capsys.readouterr().err
  assert expected in said and 'has no profile.md' not in said
  assert not (folder / 'profile.md').exists()
  assert max(r['step'] for r in runs.metrics(tmp_path)) == last_step
  assert runs.params(tmp_path, last_step)  # The last step's checkpoint.


def test_a_run_stopped_inside_its_traced_steps_keeps_the_trace_and_says_why_no_summary(
    decoder_config, tmp_path, monkeypatch, capsys):
  from research import train
  import runs
  _stop_after_step_2(monkeypatch)
  train.run(_profiled_run(decoder_config, 2), str(tmp_path))
  said = capsys.readouterr().err
  assert (f'The run stopped inside the traced steps, so its trace in {tmp_path / "profile"} has '
          'no profile.md.') in said
  assert 'Stopped at step 2 on SIGTERM' in said
  assert profiling.trace_file(str(tmp_path / 'profile'))  # This host's trace, written out.
  assert not (tmp_path / 'profile' / 'profile.md').exists()
  assert runs.params(tmp_path, 2)


def test_a_run_resumed_past_its_traced_steps_says_it_will_not_profile(decoder_config, tmp_path,
                                                                       capsys):
  from research import train
  config = _profiled_run(decoder_config, 1)
  config.train.profile_start_step = -1
  train.run(config, str(tmp_path))  # Steps 0-2, checkpoint 3.
  config = _profiled_run(decoder_config, 1)
  config.train.num_steps = 4
  train.run(config, str(tmp_path))
  assert ('No profile: this run resumes at step 3, past train.profile_start_step=1; set a later '
          'step to trace this run.') in capsys.readouterr().err
  assert not (tmp_path / 'profile').exists()
