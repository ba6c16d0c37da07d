"""Profiles attributed to the model code (research/profiling.py): passes and scopes from op_names,
the events that count, per-step and per-device figures, and a real trace of a jitted gradient."""

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
    (f'{STEP}/transpose(jvp(jit(take_along_axis)))/scatter-add', ('backward', '')),
    (f'{STEP}/optimizer/jit(clip)/max', ('optimizer', '')),
    (f'{STEP}/metrics/sqrt', ('other', 'metrics')),
    (f'{STEP}/mul;{STEP}', ('other', '')),  # Merged metadata: the first name counts.
    ('reduce_sum', ('other', '')),
])
def test_op_names_give_the_pass_and_the_scope(op_name, expected):
  assert profiling.attribute(op_name) == expected


HLO = '''HloModule jit_train_step, is_scheduled=true

%fused_computation.8 (param_0: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  %exp.1 = f32[8]{0} exponential(%param_0), metadata={op_name="jit(train_step)/jvp(M)/M/layers_0/attn/exp"}
  ROOT %mul.2 = f32[8]{0} multiply(%exp.1, %exp.1), metadata={op_name="jit(train_step)/jvp(M)/M/layers_0/attn/mul"}
}

ENTRY %main.7 (p.1: f32[8]) -> f32[8] {
  %p.1 = f32[8]{0} parameter(0)
  %ynn_fusion.8 = f32[8]{0} fusion(%p.1), kind=kCustom, calls=%fused_computation.8
  %reduce-window.9 = f32[8]{0} reduce-window(%p.1), window={size=1}, to_apply=%sum
  %wrapped_reduce.10 = f32[8]{0} fusion(%reduce-window.9, %ynn_fusion.8), kind=kLoop, calls=%r, metadata={op_name="jit(train_step)/transpose(jvp(M))/M/layers_2/attn/value/reduce_sum"}
  %fusion.1 = f32[8]{0} fusion(%p.1), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/jvp(M)/M/layers_0/mlp/mul"}
  %fusion.2 = f32[8]{0} fusion(%p.1), kind=kLoop, calls=%g, metadata={op_name="jit(train_step)/jvp(M)/M/layers_1/mlp/add"}
  %ynn_fusion.3 = f32[8]{0} fusion(%p.1), kind=kCustom, calls=%h, metadata={op_name="jit(train_step)/transpose(jvp(M))/M/layers_0/attn/dot_general"}
  %all-reduce.4 = f32[8]{0} all-reduce(%p.1), to_apply=%sum, metadata={op_name="jit(train_step)/transpose(jvp(M))/M/layers_0/attn/dot_general/jit(train_step)/transpose(jvp(M))/M/layers_1/attn/dot_general"}
  %command_buffer.5 = f32[8]{0} call(%p.1), to_apply=%cb
  ROOT %copy.6 = f32[8]{0} copy(%p.1), metadata={op_name="jit(train_step)/optimizer/add"}
}
'''


def _event(instruction, dur, device='0', module='jit_train_step', ph='X', **args):
  return dict(ph=ph, name=instruction, dur=dur, pid=1,
              args=dict(hlo_op=instruction, hlo_module=module, device_ordinal=device, **args))


def test_events_of_the_step_are_charged_per_step_and_device():
  module, op_names = profiling.instruction_op_names(HLO)
  assert module == 'jit_train_step'
  assert op_names['fusion.1'] == 'jit(train_step)/jvp(M)/M/layers_0/mlp/mul'
  assert 'command_buffer.5' not in op_names  # Neither its own op_name nor a named reader.
  # Made by XLA without an op_name: named by the root of the computation it calls, or by the
  # instruction that reads it.
  assert op_names['ynn_fusion.8'] == 'jit(train_step)/jvp(M)/M/layers_0/attn/mul'
  assert op_names['reduce-window.9'] == op_names['wrapped_reduce.10']
  events = []
  for device in ('0', '1'):  # Two steps on each of two devices.
    for _ in range(2):
      events += [_event('fusion.1', 100.0, device), _event('fusion.2', 300.0, device),
                 _event('ynn_fusion.3', 500.0, device), _event('all-reduce.4', 200.0, device),
                 _event('command_buffer.5', 40.0, device), _event('copy.6', 20.0, device)]
  events += [
      _event('fusion.1', 9e6, module='jit_other'),  # Another program's instruction of that name.
      _event('fusion.1', 9e6, ph='B'),  # Not a complete event.
      dict(ph='X', name='fusion.1', dur=9e6, pid=1, args={}),  # A host event naming the op.
      # A GPU kernel whose instruction this text lacks: its own op_name (tf_op) places it.
      _event('loop_fusion.9', 60.0, tf_op='jit(train_step)/jvp(M)/M/layers_2/mlp/mul'),
  ]
  rows = profiling.summarize(events, module, op_names, steps=2)
  assert [(r['pass_'], r['scope'], r['ms'], r['ops']) for r in rows] == [
      ('backward', 'M/layers_*/attn', 0.5, 1.0),
      ('forward', 'M/layers_*/mlp', 0.415, 2.25),  # (100 + 300) x 4 + 60 over 2 steps, 2 devices.
      ('communication', 'all-reduce', 0.2, 1.0),
      ('other', '(command_buffer)', 0.04, 1.0),
      ('optimizer', '', 0.02, 1.0),
  ]
  table = profiling.markdown(rows, steps=2, wall_ms=1.0)
  assert '| forward | 0.415 | 35.3% |' in table  # Of the 1.175 ms the operations ran.
  assert '| backward | M/layers_*/attn | 0.500 | 42.6% | 1 |' in table
  assert '| optimizer | (top level) | 0.020 | 1.7% | 1 |' in table
  assert table.index('| forward | 0.415') < table.index('| backward | 0.500')  # Passes in order.


def test_on_gpus_only_the_devices_timelines_count():
  module, op_names = profiling.instruction_op_names(HLO)
  events = [dict(ph='M', name='process_name', pid=pid, args=dict(name=name))
            for pid, name in ((1, '/host:CPU'), (2, '/device:GPU:0'), (3, '/device:GPU:1'))]
  for pid in (1, 2, 3):  # The host's launch of the kernel names it too; it must not count.
    event = _event('fusion.1', 100.0 * pid)
    del event['args']['device_ordinal']  # GPU kernels name no ordinal: their process does.
    events.append(dict(event, pid=pid))
  [row] = profiling.summarize(events, module, op_names, steps=1)
  assert (row['pass_'], row['scope'], row['ms'], row['ops']) == (
      'forward', 'M/layers_*/mlp', 0.25, 1.0)  # (200 + 300) us over two GPUs.


def test_a_trace_without_the_step_says_so():
  table = profiling.markdown(profiling.summarize([], 'jit_train_step', {}, steps=3), 3, 5.0)
  assert 'No event of the trace named an operation of the compiled step.' in table


def test_a_real_trace_of_a_jitted_gradient_is_attributed(tmp_path):
  def loss(w, x):
    with jax.named_scope('layer'):
      h = jnp.tanh(x @ w)
    with jax.named_scope('head'):
      return jnp.sum(h ** 2)

  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((64, 64)) * 0.01, jnp.ones((32, 64))
  module, op_names = profiling.instruction_op_names(step.lower(w, x).compile().as_text())
  jax.block_until_ready(step(w, x))
  jax.profiler.start_trace(str(tmp_path), create_perfetto_trace=True)
  for _ in range(3):
    jax.block_until_ready(step(w, x))
  jax.profiler.stop_trace()
  events = profiling.read_events(profiling.trace_file(str(tmp_path)))
  rows = profiling.summarize(events, module, op_names, steps=3)
  scopes = {(r['pass_'], r['scope']) for r in rows}
  assert ('forward', 'layer') in scopes and ('backward', 'layer') in scopes, scopes
  assert all(r['ms'] > 0 for r in rows)
  # Each traced call ran the same operations: whole numbers of them per step.
  assert all(r['ops'] == int(r['ops']) >= 1 for r in rows)


def test_no_trace_file_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no \\*.trace.json.gz under'):
    profiling.trace_file(str(tmp_path))
