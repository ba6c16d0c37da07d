"""Benchmarks.

  python -m research.bench train --config configs/decoder.py:nanogpt_cpu [--peer=torch]
  python -m research.bench train --config configs/bench.py:llama_1b_2048 --steps 60 \
      [--results bench/results.jsonl] [--profile_dir DIR]
  python -m research.bench table [--results bench/results.jsonl] [--markdown table.md]
  python -m research.bench decode --config configs/decoder.py:tiny [--decode_batch=8 ...]
  python -m research.bench checkpoint --config configs/decoder.py:gpt2_small [--checkpoint_dir=DIR]
  python -m research.bench data --config configs/decoder.py:tiny [--corpus_mb=100,1000]

`data` times the input pipeline (pretokenization, rows of the objective, prefetching) against
the train step it feeds, and the peak memory of training starts on generated corpora of several
sizes (research/data/benchmark.py).

`train` times full training steps (host-to-device transfer, forward, backward, optimizer) on
synthetic full-length token batches (a few, made before timing and used in turn) after warm-up,
and reports the median over several timed windows of tokens/s, step time and MFU, plus the
compile time. With --peer=torch it also trains the same model in PyTorch (the family's
TORCH_PEER: research/peers/torch_gpt.py, nanoGPT-equivalent; research/peers/torch_bert.py,
transformers' BERT, RoBERTa and ALBERT; research/peers/torch_t5.py, transformers' T5) in a
process of its own (research/peers/serve.py: the two runtimes' spinning threads would otherwise
steal each other's cores), alternating timed windows between the two so that both see the same
machine, and reports the ratio.
--steps N times N steps in all, split as evenly as they go over --windows windows (N windows of
one step when N is smaller); without it each of the --windows windows runs --window_steps steps.
Every figure is per device: tokens/s, model TFLOP/s and

  MFU = tokens/s per device x model FLOPs per token / peak FLOP/s of one device

where model FLOPs per token are the objective's flops_per_token (research/objectives: training =
3 x forward, a multiply-add = 2 FLOPs, every matrix product where the model applies it, and no
recompute of remat) and the peak is the published dense peak of the device in the compute dtype
(H100 SXM and H200: 989 TFLOP/s in bfloat16; H100 PCIe: 756) or, on CPU, a measured one
(research/metrics.py device_peak). Peak memory is the compiled step's (arguments + outputs +
temporaries - donated aliases, from XLA's memory_analysis) and, where the device keeps memory
statistics (GPU, TPU), the peak bytes it held. Each run appends one JSON line to --results (default
bench/results.jsonl under the working directory) with the config, the device (and the host's
processor), the shapes, the versions and the figures; `table` turns that file into a markdown
table (device, model, length, batch, MFU, tokens/s, TFLOP/s, ratio to the peer, peak memory, date)
for the README's Performance section: the latest run of each device (on CPU, each processor),
model, length and per-device batch. `--help` lists the flags of every mode.
With --profile_dir, `train` then (after printing and recording its figures) traces
--profile_steps more steps with jax.profiler into that folder (a trace for Perfetto or
TensorBoard) and writes profile.md beside it: the time of each pass (forward, backward, remat's
recompute, optimizer, communication, other) and of each model scope (`Decoder/layers_*/mlp/fc`:
all layers together), from research/profiling.py.

`checkpoint` times the per-array content checksums (research/checkpoint.py) against the save and
the restore they protect, on a freshly initialised train state of the config's model.

`decode` times batched KV-cache generation (research/decode.py) with random parameters: the
prefill of the prompts and the per-token decode step separately: generating 1 and then
--new_tokens tokens (the fastest of --repeats runs each), whose difference is the steps after the
first, and the first token's time less one such step is the prefill. Short runs make both
figures noisy (use the defaults, or more repeats, for numbers to compare).
"""

import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags
from flax import linen as nn

from research import checkpoint as checkpoint_lib
from research import cli
from research import config as config_lib
from research import decode
from research import device_memory
from research import host_memory
from research import mesh as mesh_lib
from research import metrics as metrics_lib
from research import models
from research import optim
from research import partitioning
from research import profiling
from research import train
from research import train_state
from research.data import benchmark as data_benchmark
from research.data import global_batch
from research.models import attention as attention_lib
from research.peers import serve

_WARMUP = flags.DEFINE_integer('warmup_steps', 5, 'Untimed steps after compilation.')
_WINDOWS = flags.DEFINE_integer('windows', 7, 'Number of timed windows.')
_WINDOW_STEPS = flags.DEFINE_integer('window_steps', 20, 'Training steps per timed window.')
_PEER = flags.DEFINE_enum('peer', None, ['torch'], 'Also time this peer implementation.')
_STEPS = flags.DEFINE_integer('steps', 0, 'train: timed steps in all, split over --windows '
                              'windows; 0 runs --windows x --window_steps.')
_JSON = flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
_RESULTS = flags.DEFINE_string('results', 'bench/results.jsonl', 'train: the JSON-lines file each '
                               'run appends its line to (table: the file read); empty: none.')
_MARKDOWN = flags.DEFINE_string('markdown', '', 'table: write the markdown table to this file '
                                'instead of printing it.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 8, 'decode: prompts per batch.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'decode: prompt length in tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'decode: generated tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'decode, checkpoint: timed repeats (the fastest '
                                'counts).')
_DATA_STEPS = flags.DEFINE_integer('data_steps', 50, 'data: training steps timed per measure.')
_CORPUS_MB = flags.DEFINE_list('corpus_mb', [], 'data: sizes (MB) of generated corpora whose '
                               'tokenization and training start are measured in new processes.')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'train: after the timed windows, trace '
                                   '--profile_steps steps with jax.profiler into this folder and '
                                   'write profile.md there: time per pass and model scope.')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'train: steps traced for --profile_dir.')
_CHECKPOINT_DIR = flags.DEFINE_string('checkpoint_dir', None, 'checkpoint: the folder (made if '
                                      'missing) on whose disk to save (default: a temporary '
                                      'folder).')


# The flags of each mode (besides --config); any other is refused in one sentence.
_MODE_FLAGS = {
    'train': ('cpu_devices', 'warmup_steps', 'windows', 'window_steps', 'steps', 'peer',
              'results', 'json', 'profile_dir', 'profile_steps'),
    'decode': ('cpu_devices', 'decode_batch', 'prompt_len', 'new_tokens', 'repeats', 'json'),
    'checkpoint': ('cpu_devices', 'repeats', 'checkpoint_dir', 'json'),
    'data': ('cpu_devices', 'warmup_steps', 'windows', 'window_steps', 'data_steps', 'corpus_mb',
             'json'),
    'table': ('results', 'markdown'),
}

_NO_DATA = object()


# Host batches made before timing and used in turn: training makes its rows ahead of the steps
# (research/data/prefetch.py), and some objectives' synthetic batches (masking, span corruption)
# take as long in Python as a GPU's step, which would then time the host instead.
_BATCH_POOL = 4


class _JaxTrainer:
  """Our train step on synthetic batches; run_steps(n) returns the tokens it trained on."""

  def __init__(self, config):
    self.mesh_shape = config_lib.validate(config, jax.device_count())
    self.trainer = train.setup(config, mesh_lib.make_mesh(self.mesh_shape),
                               pipeline=_NO_DATA)  # Batches are synthetic.
    self.state = self.trainer.state
    self.rng = np.random.default_rng(0)
    self.batches = [self.trainer.objective.synthetic_batch(self.rng) for _ in range(_BATCH_POOL)]
    self.taken = 0
    self.config = config
    start = time.perf_counter()
    # Compiled ahead of the first step, which then finds it in jit's cache: the compile time
    # excludes the step, and XLA's analyses of the very program that runs are at hand.
    batch = global_batch.to_global(self.batches[0], self.trainer.batch_shardings)
    compiled = self.trainer.train_step.lower(self.state, batch, self.trainer.dropout_rng).compile()
    self.compile_s = time.perf_counter() - start
    self.compiled_bytes = _compiled_peak_bytes(compiled.memory_analysis())
    self.compiled = compiled  # Its text attributes a profile.
    self.run_steps(1)

  def run_steps(self, count):
    tokens = 0.0
    for _ in range(count):
      batch = self.batches[self.taken % len(self.batches)]
      self.taken += 1
      self.state, self.metrics = self.trainer.train_step(
          self.state, global_batch.to_global(batch, self.trainer.batch_shardings),
          self.trainer.dropout_rng)
      tokens += float(self.trainer.objective.tokens(batch))
    jax.block_until_ready((self.state, self.metrics))
    self.tokens_per_step = tokens / count
    return tokens

  def profile(self, directory, steps, command):
    """Traces `steps` steps with jax.profiler into `directory` and writes profile.md there (see
    research/profiling.py), titled with `command`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    start = time.perf_counter()
    try:
      self.run_steps(steps)
    finally:
      wall_ms = (time.perf_counter() - start) * 1000 / steps
      jax.profiler.stop_trace()
    return profiling.write_summary(directory, self.compiled.as_text(), steps, wall_ms,
                                   profiling.heading(command))


def _compiled_peak_bytes(memory):
  """Bytes the compiled step holds at its peak: its arguments, outputs and temporaries, less the
  outputs written over donated arguments (counted twice otherwise)."""
  if memory is None:
    return None
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _device_peak_bytes():
  """The largest number of bytes the first device has held, where it keeps such statistics (GPU,
  TPU; a CPU does not)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def window_sizes(steps, windows, window_steps):
  """Timed steps per window: `steps` split as evenly as they go over at most `windows` windows
  (the first ones one step longer), or `windows` x `window_steps` when `steps` is 0."""
  if not steps:
    return [window_steps] * windows
  count = min(windows, steps)
  return [steps // count + (i < steps % count) for i in range(count)]


def _timed_rate(run_steps, steps=None):
  start = time.perf_counter()
  tokens = run_steps(steps or _WINDOW_STEPS.value)
  return tokens / (time.perf_counter() - start)


def bench_train(config, argv):
  t = config.train
  ours = _JaxTrainer(config)
  runners = {'ours': ours.run_steps}
  peer = None
  if _PEER.value == 'torch':  # In a process of its own: research/peers/serve.py says why.
    try:
      peer = serve.PeerProcess(models.get(config.model.family).TORCH_PEER, config, t.batch_size,
                               t.seq_len)
    except ValueError as error:
      raise config_lib.ConfigError(str(error)) from None
    runners['torch'] = peer
  try:
    for run_steps in runners.values():
      if _WARMUP.value:
        run_steps(_WARMUP.value)
    rates = {name: [] for name in runners}
    windows = window_sizes(_STEPS.value, _WINDOWS.value, _WINDOW_STEPS.value)
    for steps in windows:  # Alternate windows so that all runners see the same machine.
      for name, run_steps in runners.items():
        rates[name].append(_timed_rate(run_steps, steps))
  finally:
    if peer is not None:
      peer.close()

  family = models.get(config.model.family)
  devices = jax.device_count()
  tokens_per_s = statistics.median(rates['ours'])
  flops_per_token = ours.trainer.objective.flops_per_token(
      family, family.spec_from_config(config.model))
  peak, peak_label = metrics_lib.device_peak(config.model.dtype)
  results = dict(
      variant=config.variant, devices=devices, device_kind=jax.devices()[0].device_kind,
      tokens_per_s=tokens_per_s, tokens_per_s_windows=rates['ours'],
      tokens_per_s_per_device=tokens_per_s / devices, timed_steps=sum(windows),
      step_time_ms=1000 * ours.tokens_per_step / tokens_per_s,
      compile_s=ours.compile_s, model_tflops_per_s=tokens_per_s * flops_per_token / 1e12,
      model_tflops_per_s_per_device=tokens_per_s * flops_per_token / devices / 1e12,
      flops_per_token=flops_per_token, final_loss=float(ours.metrics['loss']),
      compiled_peak_bytes=ours.compiled_bytes, device_peak_bytes=_device_peak_bytes(),
      mesh=ours.mesh_shape, per_device_batch=t.batch_size // math.prod(
          ours.mesh_shape[axis] for axis in mesh_lib.BATCH_AXES))
  if peak:
    results.update(mfu=tokens_per_s * flops_per_token / (peak * devices),
                   peak_tflops_per_s=peak * devices / 1e12, peak_source=peak_label)
  if 'torch' in rates:
    peer = statistics.median(rates['torch'])
    results.update(torch_tokens_per_s=peer, torch_tokens_per_s_windows=rates['torch'],
                   ratio_to_torch=tokens_per_s / peer)
  # Reported and recorded before the profile, which a time limit may cut short.
  _print(results)
  if _RESULTS.value:
    config_lib.write_output('results', json.dumps(run_record(config, argv, results),
                                                  sort_keys=True) + '\n', append=True)
  _write_json(results)
  if _PROFILE_DIR.value:
    try:
      path = ours.profile(_PROFILE_DIR.value, _PROFILE_STEPS.value,
                          'python -m research.bench ' + ' '.join(argv[1:]))
    except profiling.FAILURES as error:
      raise config_lib.ConfigError(f'the figures above stand, but the profile in '
                                   f'{_PROFILE_DIR.value} could not be written out or '
                                   f'summarised: {error}.')
    with open(path) as f:
      print('\n' + f.read(), end='')
  return None  # Reported above.


def run_record(config, argv, results):
  """One line of the results file: what ran (config file and overrides, model, shapes, dtypes,
  remat, the attention implementation it resolved to, device, versions, date) and `results`."""
  m, t = config.model, config.train
  attention = None
  if 'attention' in m:
    # Synthetic rows carry segment ids (packed); a Pallas kernel is ruled out where the sequence
    # is split over devices (research/models/attention.py resolve_implementation).
    attention = attention_lib.resolve_implementation(
        m.attention, m.dtype, packed=True, kernel_fits=results['mesh'][mesh_lib.SEQUENCE] == 1)
  record = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      config=config_lib.config_spec(argv), overrides=[a for a in argv if a.startswith('--config.')],
      family=m.family, objective=config.objective.name, seq_len=t.seq_len,
      target_len=t.get('target_len'), batch_size=t.batch_size, dtype=m.dtype,
      param_dtype=m.get('param_dtype'), remat=m.get('remat'), attention=attention,
      platform=jax.devices()[0].platform, processor=config_lib.host_processor(),
      jax=jax.__version__, git=config_lib.git_revision())
  return dict(record, **results)


# Under the table: how its MFU column is computed.
MFU_FORMULA = ('MFU = tokens/s per device x model FLOPs per token / peak FLOP/s of one device; '
               'model FLOPs per token count training as 3 x forward (2 FLOPs a multiply-add, '
               'every matrix product including attention and the output head) and no remat '
               'recompute; the peak is the published dense peak in the compute dtype (H100 SXM '
               'and H200, bfloat16: 989 TFLOP/s; H100 PCIe: 756) or, on CPU, the measured '
               'matmul peak.')


def _length(record):
  if record.get('target_len'):
    return f"{record['seq_len']} / {record['target_len']}"
  return str(record['seq_len'])


def _bytes(count):
  if count is None:
    return 'n/a'
  if count < 1 << 30:
    return f'{count / (1 << 20):.1f} MiB'
  return f'{count / (1 << 30):.1f} GiB'


def _device(record):
  """The device's kind, on CPU with the processor where the record names it."""
  if record.get('platform') == 'cpu' and record.get('processor'):
    return f"{record['device_kind']} ({record['processor']})"
  return record['device_kind']


def results_table(records):
  """Markdown table of the latest record (the file's order is the runs' order) of each device,
  model, length and per-device batch, in that order, then the MFU formula. `vs torch` is the
  ratio of our tokens/s to the PyTorch peer's in the same run (--peer=torch)."""
  latest = {}
  for record in records:
    key = (_device(record), record['variant'], _length(record), record['per_device_batch'])
    latest[key] = record
  lines = ['| device | model | length | batch / device | MFU | tokens/s / device | '
           'TFLOP/s / device | vs torch | peak memory | date |',
           '|---|---|---|---:|---:|---:|---:|---:|---:|---|']
  for (device, variant, length, batch), r in sorted(latest.items()):
    mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') is not None else 'no peak known'
    memory = r.get('device_peak_bytes') or r.get('compiled_peak_bytes')
    ratio = f"{r['ratio_to_torch']:.2f}x" if r.get('ratio_to_torch') else '-'
    lines.append(f"| {device} | {variant} | {length} | {batch} | {mfu} | "
                 f"{r['tokens_per_s_per_device']:,.0f} | "
                 f"{r['model_tflops_per_s_per_device']:.4g} | {ratio} | {_bytes(memory)} | "
                 f"{r['date'][:10]} |")
  return '\n'.join(lines + ['', MFU_FORMULA]) + '\n'


# What a line needs to make a row of the table.
_RECORD_KEYS = ('device_kind', 'variant', 'seq_len', 'per_device_batch', 'tokens_per_s_per_device',
                'model_tflops_per_s_per_device', 'date')


def read_records(path):
  """The records of the results file `path`, in the order they were appended; a line that is not
  one (cut short, or from another file) is one sentence naming it."""
  if not path:
    raise config_lib.ConfigError('--results is empty; pass the results file (default '
                                 f'{_RESULTS.default}).')
  if not os.path.isfile(path):
    state = 'is a folder' if os.path.isdir(path) else 'does not exist'
    raise config_lib.ConfigError(f'--results {path} {state}; run `python -m research.bench train` '
                                 'first or pass the file it wrote.')
  records = []
  try:
    with open(path, encoding='utf-8', errors='replace') as f:  # Bytes of another file: not JSON.
      lines = list(f)
  except OSError as error:
    raise config_lib.ConfigError(f'--results {path} could not be read '
                                 f'({error.strerror or error}).') from None
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    missing = ([key for key in _RECORD_KEYS if key not in record]
               if isinstance(record, dict) else ['a JSON object'])
    if missing:
      raise config_lib.ConfigError(f'Line {number} of {path} is not a results line of '
                                   f'`research.bench train` (it lacks {", ".join(missing)}); '
                                   'delete or mend that line.')
    records.append(record)
  if not records:
    raise config_lib.ConfigError(f'--results {path} holds no results; run `python -m '
                                 'research.bench train` first.')
  return records


def table(argv):
  """`table`: reads --results, prints the table or writes it to --markdown."""
  config_lib.parse_command_flags([argv[0]] + argv[2:], __doc__, _MODE_FLAGS['table'])
  config_lib.check_output('markdown', others=('results',))
  text = results_table(read_records(_RESULTS.value))
  if _MARKDOWN.value:
    config_lib.write_output('markdown', text)
  else:
    print(text, end='')


def bench_decode(config):
  family = models.get(config.model.family)
  if not getattr(family, 'GENERATES_TEXT', False):
    generating = sorted(name for name in models.FAMILIES
                        if getattr(models.get(name), 'GENERATES_TEXT', False))
    raise config_lib.ConfigError(f'model.family={config.model.family!r} does not generate text; '
                                 f'benchmark decoding with a config of {", ".join(generating)}.')
  model = family.build(config.model)
  batch, prompt_len, new = _DECODE_BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  if new < 2:  # The steps after the first are what tells the prefill from a step.
    raise config_lib.ConfigError(f'--new_tokens={new} leaves no decode step to time apart from '
                                 'the prefill; generate at least 2.')
  try:  # The timed runs generate 1 and then `new` tokens after each prompt.
    decode.check_inputs(model.spec, [[0] * prompt_len], decode.SamplingConfig(max_new_tokens=new),
                        encoder_decoder=hasattr(model, 'encode'))
  except ValueError:
    raise config_lib.ConfigError(
        f'--prompt_len={prompt_len} and --new_tokens={new} do not fit model.max_len='
        f'{model.spec.max_len} (a decoder needs their sum within it, an encoder-decoder each of '
        'them); lower them.') from None
  params = jax.jit(lambda key: model.init(key, **family.init_inputs(8), method='initialize'))(
      jax.random.key(0))['params']
  params = nn.meta.unbox(params)
  prompts = np.random.default_rng(0).integers(3, config.model.vocab_size, (batch, prompt_len))
  prompts = prompts.tolist()

  def seconds(new_tokens):
    sampling = decode.SamplingConfig(max_new_tokens=new_tokens)
    decode.generate(model, params, prompts, sampling)  # Compile.
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      decode.generate(model, params, prompts, sampling)  # Returns host lists: synchronised.
      times.append(time.perf_counter() - start)
    return min(times)  # The least disturbed run.

  first_token_s = seconds(1)  # The prefill and one decode step.
  total_s = seconds(new)
  per_token_s = (total_s - first_token_s) / max(new - 1, 1)
  prefill_s = first_token_s - per_token_s
  if per_token_s <= 0 or prefill_s <= 0:
    raise config_lib.ConfigError('The prefill and the decode steps could not be told apart in '
                                 'these timings; raise --new_tokens or --repeats.')
  return dict(variant=config.variant, device_kind=jax.devices()[0].device_kind, batch=batch,
              prompt_len=prompt_len, new_tokens=new, prefill_s=prefill_s,
              prefill_tokens_per_s=batch * prompt_len / prefill_s,
              decode_step_ms=1000 * per_token_s, decode_tokens_per_s=batch / per_token_s,
              generate_s=total_s)


def _fastest(run, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def bench_checkpoint(config):
  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  family = models.get(config.model.family)
  model = family.build(config.model, partitioning.ActivationSharding(mesh))
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  state, shardings = train_state.create(model, tx, mesh, family.init_inputs(8), jax.random.key(0))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  checkpoint_lib.checksums(state)  # Compile.
  checksum_s = _fastest(lambda: checkpoint_lib.checksums(state), _REPEATS.value)
  record = checkpoint_lib.make_record(0, jax.random.key(0), {}, config)
  if _CHECKPOINT_DIR.value:
    os.makedirs(_CHECKPOINT_DIR.value, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=_CHECKPOINT_DIR.value) as root, \
      cli.removed_on_interrupt(root):
    saves = iter(range(1000))

    def save():  # Each repeat saves a new step and waits until it is on disk.
      checkpointer.save(next(saves), state, record)
      checkpointer.wait()

    checkpointer = checkpoint_lib.Checkpointer(os.path.join(root, 'checkpoints'), keep=2)
    save_s = _fastest(save, _REPEATS.value)
    settings = checkpoint_lib.settings(config)
    restore_s = _fastest(lambda: jax.block_until_ready(
        checkpointer.restore(state, shardings, settings)[0]), _REPEATS.value)
    checkpointer.close()
  return dict(variant=config.variant, devices=jax.device_count(),
              device_kind=jax.devices()[0].device_kind, state_gb=state_bytes / 1e9,
              checksum_s=checksum_s, checksum_gb_per_s=state_bytes / 1e9 / checksum_s,
              save_s=save_s, restore_s=restore_s, checksum_share_of_save=checksum_s / save_s,
              checksum_share_of_restore=checksum_s / restore_s)


def bench_data(config, argv):
  """The input pipeline against the train step (research/data/benchmark.py)."""
  def trainer_factory(config):
    ours = _JaxTrainer(config)
    ours.run_steps(_WARMUP.value)
    rate = statistics.median(_timed_rate(ours.run_steps) for _ in range(_WINDOWS.value))
    return ours.trainer, ours.state, rate

  try:
    sizes = [int(size) for size in _CORPUS_MB.value]
  except ValueError:
    sizes = [0]
  if min(sizes, default=1) < 1:
    raise config_lib.ConfigError(f'--corpus_mb={",".join(_CORPUS_MB.value)} must list positive '
                                 'whole megabytes, e.g. 100,1000.')
  overrides = [a for a in argv[2:] if a.startswith('--config.')]
  spec = config_lib.config_spec(argv)
  results = data_benchmark.run(config, trainer_factory, _DATA_STEPS.value, config.data.prefetch,
                               sizes, spec, overrides)
  # Its figures are of this host's processor and cores as much as of the train step's device.
  return dict(results, device_kind=jax.devices()[0].device_kind,
              processor=config_lib.host_processor())


def _check_flags(mode):
  """One sentence for a flag value the benchmarks cannot use."""
  if _STEPS.value < 0:
    raise config_lib.ConfigError(f'--steps={_STEPS.value} must not be negative.')
  counts = dict(windows=_WINDOWS, window_steps=_WINDOW_STEPS, decode_batch=_DECODE_BATCH,
                prompt_len=_PROMPT_LEN, new_tokens=_NEW_TOKENS, repeats=_REPEATS,
                data_steps=_DATA_STEPS, profile_steps=_PROFILE_STEPS)
  for name, flag in counts.items():
    if flag.value < 1:
      raise config_lib.ConfigError(f'--{name}={flag.value} must be at least 1.')
  if _WARMUP.value < 0:
    raise config_lib.ConfigError(f'--warmup_steps={_WARMUP.value} must not be negative.')
  if flags.FLAGS['profile_steps'].present and not _PROFILE_DIR.value:
    raise config_lib.ConfigError('--profile_steps applies only with --profile_dir; add '
                                 '--profile_dir DIR or drop it.')
  for name in ('profile_dir', 'checkpoint_dir'):
    if flags.FLAGS[name].value:
      _check_folder(name)
  if 'results' in _MODE_FLAGS[mode]:
    config_lib.check_output('results')
  config_lib.check_output('json', others=('results',) if 'results' in _MODE_FLAGS[mode] else ())


def _check_folder(name):
  """Checks the folder of flag --name before any work (cli.check_folder); it is made where it
  is used, so that a run refused before then leaves nothing."""
  path = flags.FLAGS[name].value
  try:
    cli.check_folder(path, f'--{name}')
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None


def main(argv):
  modes = {'train': lambda config: bench_train(config, argv), 'decode': bench_decode,
           'checkpoint': bench_checkpoint,
           'data': lambda config: bench_data(config, argv)}
  usage = ('python -m research.bench train|decode|checkpoint|data --config '
           'configs/<family>.py:VARIANT, or python -m research.bench table [--results FILE] '
           '[--markdown FILE]')
  if len(argv) < 2:
    print(f'usage: {usage}', file=sys.stderr)
    return 2
  if argv[1] in config_lib.HELP_FLAGS or (argv[1] not in _MODE_FLAGS
                                          and any(a in config_lib.HELP_FLAGS for a in argv)):
    print(config_lib.commands_help_text(__doc__, {
        mode: names if mode == 'table' else ('config', *names)
        for mode, names in _MODE_FLAGS.items()}))
    return 0
  if argv[1] not in list(modes) + ['table']:
    print(f'error: {argv[1]!r} is not a benchmark mode; run {usage}.', file=sys.stderr)
    return 2
  config = None
  try:
    if argv[1] == 'table':
      table(argv)
      return 0
    config = config_lib.parse_flags([argv[0]] + argv[2:], __doc__, _MODE_FLAGS[argv[1]])
    _check_flags(argv[1])
    mesh_lib.configure_cpu_devices()
    if argv[1] in ('train', 'decode'):  # The data and checkpoint timings keep glibc's heap.
      host_memory.reuse_freed_memory()
    results = modes[argv[1]](config)
    if results is not None:  # `train` reports its own, ahead of its profile.
      _print(results)
      _write_json(results)
  except (config_lib.ConfigError, mesh_lib.MeshError, data_benchmark.DataError,
          device_memory.MemoryShortage) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except jax.errors.JaxRuntimeError as error:
    return device_memory.exit_status(error, config and config.model)
  return 0


def _shown(value):
  """A figure as a person reads it: rates and counts whole with thousands separators (23,874,
  not 2.387e+04), smaller ones to four significant digits."""
  if isinstance(value, list):
    return '[' + ', '.join(_shown(v) for v in value) + ']'
  if isinstance(value, float):
    return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:,.4g}'
  if isinstance(value, int) and not isinstance(value, bool):
    return f'{value:,}'
  return str(value)


def _print(results):
  shown = {key: _shown(value) for key, value in results.items() if value is not None}
  width = max(map(len, shown), default=0)
  for key, value in shown.items():
    print(f'{key:>{width}}: {value}')


def _write_json(results):
  if _JSON.value:
    config_lib.write_output('json', json.dumps(results, indent=2))


if __name__ == '__main__':
  cli.exit_on_interrupt('Interrupted; a benchmark that had not printed its figures recorded '
                        'nothing.')
  sys.exit(main(sys.argv))
