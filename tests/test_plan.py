"""The ahead-of-time planner: per-device memory follows the shardings, for every family."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import pytest

import runs
from research import config as config_lib
from research import plan
from research import word_vectors


def _config(spec, **mesh):
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', spec))
  config.train.batch_size, config.train.seq_len = 8, 64
  for axis in ('data', 'fsdp', 'sequence', 'tensor'):
    config.mesh[axis] = mesh.get(axis, 1)
  return config


def test_fsdp_over_8_devices_holds_an_eighth_of_the_state_per_device():
  one = plan.plan(_config('decoder.py:tiny'), jax.devices()[:1])
  eight = plan.plan(_config('decoder.py:tiny', fsdp=8), jax.devices()[:8])
  state = lambda r: r['params_bytes_per_device'] + r['optimizer_bytes_per_device']
  assert one['params'] == eight['params'] > 0
  assert abs(state(eight) / (state(one) / 8) - 1) <= 0.15, (state(one), state(eight))
  assert eight['activations_bytes_per_device'] > 0
  # Model FLOPs per device divide by the device count.
  assert abs(eight['model_tflops_per_step_per_device'] * 8
             - one['model_tflops_per_step_per_device']) < 1e-9


def test_the_command_line_plans_a_mesh_larger_than_this_machine(tmp_path):
  out = tmp_path / 'plan.json'
  result = runs.command('research.plan', '--config', 'configs/encoder.py:bert_tiny',
                        '--mesh', 'data=4,fsdp=4', '--config.train.batch_size=16',
                        '--plan_json', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['devices'] == 16 and report['platform'] == 'cpu'  # 16 simulated devices.
  assert report['mesh'] == dict(data=4, fsdp=4, sequence=1, tensor=1)
  assert report['family'] == 'encoder' and report['objective'] == 'mlm'
  # FSDP over 4 (of 16) devices: each holds about a quarter of the float32 parameters.
  quarter = report['params'] * 4 / 4
  assert abs(report['params_bytes_per_device'] / quarter - 1) <= 0.15, report
  assert 'optimizer state / device' in result.stdout
  [flops] = [line for line in result.stdout.splitlines() if line.startswith('compiler TFLOPs')]
  assert flops.split()[-1] != 'once)'  # bert_tiny runs its layers unscanned: no loop.
  assert report['compiler_counts_loops_once'] is False
  bad = runs.command('research.plan', '--config', 'configs/decoder.py:tiny', '--mesh', 'fsdp=-1')
  assert bad.returncode == 2
  assert bad.stderr.strip() == ('error: --mesh fsdp=-1 needs explicit positive sizes: a plan is '
                                'for a given topology.')


def test_a_topology_plan_says_its_cpu_devices_stand_in_and_how_xla_counts_a_scan():
  result = runs.command('research.plan', '--config', 'configs/decoder.py:tiny',
                        '--topology', 'h100-80gb:1', '--config.train.batch_size=4')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {line.split('  ')[0]: line for line in result.stdout.splitlines()}
  assert lines['mesh'].endswith('on 1 cpu device standing in for h100-80gb:1'), lines['mesh']
  assert lines['compiler TFLOPs / step / device'].endswith('(loop bodies counted once)')
  assert lines['total / device'].endswith('of 80 GiB HBM: fits')
  # Offloaded activations are planned for the accelerators, measured as dots on CPU devices.
  result = runs.command('research.plan', '--config', 'configs/decoder.py:tiny',
                        '--topology', 'h200:1', '--config.model.remat=offload')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {line.split('  ')[0]: line for line in result.stdout.splitlines()}
  assert lines['activations (temporary) / device'].endswith(
      "MiB (as remat=dots: CPU devices hold 'offloaded' activations in the same memory, so this "
      'is an upper bound)')


def test_a_mesh_the_config_cannot_use_is_refused_before_its_devices_are_simulated():
  started = time.monotonic()
  result = subprocess.run([sys.executable, '-m', 'research.plan', '--config',
                           'configs/decoder.py:tiny', '--mesh', 'data=100000'], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.stderr.strip() == (
      'error: train.batch_size=16 must divide evenly over the data axes (data*fsdp=100000) times '
      'optim.grad_accum_steps=1; use a multiple of 100000.')
  assert result.returncode == 2 and time.monotonic() - started < 60


@pytest.mark.parametrize('spec', ['rnn.py:lstm_tiny', 'rnn_seq2seq.py:gru_attention_tiny'])
def test_the_recurrent_families_plan_though_they_have_no_layer_stack(spec):
  report = plan.plan(_config(spec), jax.devices()[:1])
  assert report['params'] > 0 and report['activations_bytes_per_device'] > 0
  assert (report['remat'], report['scan_layers']) == (None, None)
  assert report['compiler_counts_loops_once']  # Their time steps run in a loop.


def test_the_counted_ngram_family_is_refused_in_one_sentence():
  # The benchmark in a process of its own: on CPU it sets this process's malloc policy.
  for result in (runs.in_process('research.plan', '--config', 'configs/ngram.py'),
                 runs.command('research.bench', 'train', '--config', 'configs/ngram.py')):
    line = runs.error_line(result)
    assert line.startswith('error: model.family=ngram is fitted by counting and has no network')


def test_a_tokenizer_larger_than_the_vocabulary_is_one_sentence_before_any_data_is_read(tmp_path):
  # Skip-gram reads its word frequencies while the step is traced, without the data pipeline.
  (tmp_path / 'a.txt').write_text('words to count\n')
  vocab = word_vectors.train_vocabulary(['words to count'], str(tmp_path / 'vocab'), min_count=1)
  line = runs.error_line(runs.in_process(
      'research.plan', '--config', 'configs/word_vectors.py:skipgram_tiny',
      f'--config.data.paths={tmp_path / "a.txt"}', f'--config.data.tokenizer=hf:{vocab}',
      '--config.model.vocab_size=4'))
  assert line == (f"error: The 'hf:{vocab}' tokenizer has 5 tokens but model.vocab_size=4; "
                  'raise model.vocab_size.')


@pytest.mark.parametrize('sample_tokens', [0, 16])  # Traced; also validated for the prompt.
def test_a_tokenizer_that_is_not_there_is_one_sentence(tmp_path, sample_tokens):
  # The bits-per-byte table reads the tokenizer while the step is traced, as for a paper preset
  # on a machine without its tokenizer files; sampling during training reads it first.
  line = runs.error_line(runs.in_process('research.plan', '--config', 'configs/decoder.py:tiny',
                                         f'--config.data.tokenizer=hf:{tmp_path / "absent"}',
                                         f'--config.train.sample_tokens={sample_tokens}'))
  assert line == (f'error: data.tokenizer=hf:{tmp_path / "absent"} names no folder with a '
                  'tokenizer.json; point it at the Hugging Face model directory.')


@pytest.mark.parametrize('arguments, sentence', [
    (('--mesh=fsdp=2', '--cpu_devices=4'),
     'error: --cpu_devices does not apply with --mesh or --topology, which set the device count; '
     'drop it.'),
    (('--cpu_devices=-1',), 'error: --cpu_devices=-1 must not be negative (0 keeps one CPU '
                            'device).'),
    (('--mesh=data=2,data=2',), "error: --mesh data=2,data=2 sizes the axis 'data' twice; give "
                                "each axis once (e.g. --mesh=data=2,fsdp=4)."),
    ((f'--plan_json={__file__}/plan.json',),
     f'error: --plan_json {__file__}/plan.json lies under the file {__file__}; pass a path in a '
     'folder.'),
])
def test_device_counts_and_outputs_the_plan_cannot_use_are_one_sentence(arguments, sentence):
  line = runs.error_line(runs.in_process('research.plan', '--config', 'configs/decoder.py:tiny',
                                         *arguments))
  assert line == sentence


def test_help_lists_every_topology_form_the_planner_accepts():
  text = ' '.join(runs.ok(runs.in_process('research.plan', '--help')).stdout.split())
  forms = ('v4-N', 'v5p-N', 'v5e-N', 'v5litepod-N', 'h100-80gb:N', 'h200:N')
  for form in forms:
    assert f' {form} ' in text, form
    assert plan.topology(form.replace('N', '8'))[0] > 0, form
  for pattern, _, _ in plan.TOPOLOGIES:  # No slice the planner knows goes unlisted.
    assert any(re.fullmatch(pattern, form.replace('N', '8')) for form in forms), pattern


def _help_examples():
  """The command lines of research.plan --help, without their optional [...] parts."""
  usage = plan.__doc__.replace('\\\n', ' ')
  lines = [re.sub(r'\[[^]]*\]', '', line) for line in usage.splitlines()]
  return [shlex.split(line)[3:] for line in lines if line.strip().startswith('python -m')]


@pytest.mark.slow
def test_every_example_of_the_help_runs_as_written():
  examples = _help_examples()
  assert len(examples) >= 2, examples  # The parse found the usage lines.
  for arguments in examples:  # Each in a process of its own: they set the device count.
    result = runs.command('research.plan', *arguments)
    assert result.returncode == 0, (arguments, result.stderr[-3000:])
    assert result.stdout.startswith('model '), result.stdout


def _cpu_seconds(pid):
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # utime + stime.


def test_ctrl_c_during_a_long_plan_ends_it_at_once_with_one_sentence():
  # Unscanned layers and no compilation cache: tracing and compiling take far longer than the
  # wait; the imports (under 2 s of CPU) are over before it.
  process = subprocess.Popen(
      [sys.executable, '-m', 'research.plan', '--config', 'configs/decoder.py:llama2_7b',
       '--mesh', 'data=16,fsdp=16', '--config.model.scan_layers=False'], cwd=runs.REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_ENABLE_COMPILATION_CACHE='false'),
      preexec_fn=runs.default_ctrl_c)
  try:
    while _cpu_seconds(process.pid) < 4 and process.poll() is None:
      time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == 130 and time.monotonic() - sent < 10, err[-3000:]
  assert err.strip().splitlines()[-1] == 'Interrupted; nothing was written.', err[-3000:]
  assert 'Traceback' not in err
