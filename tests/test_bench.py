"""The benchmark command runs end to end, with one JAX device per core and the torch peer; its
results file and table, the CPU peak behind MFU, the benchmark configs and the GPU script."""

import json
import os
import subprocess
import sys
import types

import jax
import pytest

import runs
from configs import bench as bench_configs
from research import bench
from research import config as config_lib
from research import metrics
from research import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


@pytest.mark.slow
def test_bench_train_reports_throughput_mfu_and_the_peer_ratio(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'train', '--config',
       'configs/decoder.py:nanogpt_cpu', '--cpu_devices=2', '--peer=torch', '--windows=2',
       '--window_steps=3', '--warmup_steps=1', f'--profile_dir={tmp_path / "profile"}',
       f'--json={out}', f'--results={tmp_path / "results.jsonl"}'], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['devices'] == 2
  # The profile: every pass of a data-parallel step, each layer's products, per device.
  profile = (tmp_path / 'profile' / 'profile.md').read_text()
  title, blank, steps = profile.splitlines()[:3]  # What was profiled, on what, when; then steps.
  assert title.startswith('Profile of `python -m research.bench train --config '
                          'configs/decoder.py:nanogpt_cpu --cpu_devices=2 ')
  assert f'` on 2 x cpu ({config_lib.host_processor()}), jax {jax.__version__}, ' in title
  assert blank == '' and steps.startswith('3 profiled steps')
  assert profile in result.stdout  # Printed, last.
  assert result.stdout.index('ratio_to_torch') < result.stdout.index('3 profiled steps')
  for row in ('| forward | Decoder/layers_*/mlp/fc | ', '| backward | Decoder/layers_*/mlp/fc | ',
              '| optimizer | (top level) | ', '| communication | all-reduce | '):
    assert row in profile, row
  [fc] = [line for line in profile.splitlines()
          if line.startswith('| forward | Decoder/layers_*/mlp/fc |')]
  products = float(fc.split('|')[-2])
  assert products == int(products) >= 4  # At least the product of each layer, every step.
  assert len(open(tmp_path / 'results.jsonl').readlines()) == 1
  assert len(results['tokens_per_s_windows']) == 2
  assert results['tokens_per_s'] > 0 and results['torch_tokens_per_s'] > 0
  assert results['ratio_to_torch'] == results['tokens_per_s'] / results['torch_tokens_per_s']
  assert 0 < results['mfu'] < 1 and results['peak_source'] == 'measured float32 matmul peak'
  assert results['flops_per_token'] == 6 * 794_752 + 6 * 4 * 64 * 128  # The README's formula.


@pytest.mark.slow
def test_bench_data_reports_the_pipeline_against_the_step_and_start_memory(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(20):
    (corpus / f'{i}.txt').write_text(f'document {i}: ' + 'some words here\n' * (300 + i))
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'data', '--config', 'configs/encoder.py:bert_tiny',
       '--config.data.source=text', f'--config.data.paths={corpus}', '--config.train.batch_size=8',
       '--data_steps=4', '--windows=1', '--window_steps=2', '--warmup_steps=1',
       f'--json={out}'], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['objective'] == 'mlm' and results['tokenizer'] == 'bytes'
  assert results['pretokenize_mb'] > 0.09 and results['pretokenize_mb_per_s'] > 0
  assert results['pipeline_over_train_step'] == (results['pipeline_tokens_per_s']
                                                 / results['train_step_tokens_per_s'])
  assert results['fed_tokens_per_s'] > 0 and 0 <= results['input_wait_share'] < 1
  assert results['device_kind'] == 'cpu' and results['processor'] == config_lib.host_processor()


def test_bench_data_measures_the_peak_memory_of_a_fresh_process(tmp_path):
  from research.data import benchmark
  small, _ = benchmark._measured([sys.executable, '-c', 'pass'])
  large, _ = benchmark._measured([sys.executable, '-c', 'x = bytearray(300 << 20); x[::4096] = '
                                  'b"1" * len(x[::4096])'])
  assert 250 < large - small < 400, (small, large)  # The child's own peak, not the parent's.
  corpus = benchmark._write_corpus(str(tmp_path / 'corpus'), 70)
  sizes = sorted(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus))
  assert sizes == [6 << 20, 64 << 20]  # Files of at most 64 MB, 70 MB in all.
  text = open(os.path.join(corpus, 'part0000.txt'), 'rb').read(1 << 20)
  assert text.count(b'\n') > 10 and set(text) <= set(b'abcdefghijklmnopqrstuvwxyz \n')


@pytest.mark.slow
def test_bench_train_of_an_encoder_against_transformers(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'train', '--config', 'configs/encoder.py:bert_tiny',
       '--cpu_devices=2', '--peer=torch', '--windows=2', '--window_steps=2', '--warmup_steps=1',
       f'--json={out}', f'--results={tmp_path / "results.jsonl"}'], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['tokens_per_s'] > 0 and results['torch_tokens_per_s'] > 0
  assert results['ratio_to_torch'] == results['tokens_per_s'] / results['torch_tokens_per_s']
  assert 0 < results['mfu'] < 1
  # Full bidirectional attention, the MLM head over 20 gathered positions of 128, NSP once a row.
  body = 6 * 2 * (4 * 128 * 128 + 2 * 128 * 512) + 12 * 2 * 128 * 128
  head = 6 * (128 * 128 + 128 * 264) * 20 / 128 + 6 * (128 * 128 + 128 * 2) / 128
  assert abs(results['flops_per_token'] - (body + head)) < 1e-6 * body


@pytest.mark.slow
def test_bench_decode_reports_prefill_and_per_token_rates(tmp_path):
  out = tmp_path / 'decode.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'decode', '--config', 'configs/decoder.py:tiny',
       '--decode_batch=2', '--prompt_len=8', '--new_tokens=48', '--repeats=3', f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['prefill_tokens_per_s'] > 0 and results['decode_tokens_per_s'] > 0
  assert results['generate_s'] > results['prefill_s']
  # The prefill is the first token's time less one decode step.
  assert results['prefill_s'] + results['decode_step_ms'] / 1000 < results['generate_s']


@pytest.mark.parametrize('mode, argument, sentence', [
    ('checkpoint', '--repeats=0', '--repeats=0 must be at least 1.'),
    ('checkpoint', f'--checkpoint_dir={__file__}', f'--checkpoint_dir {__file__} is a file; '
                                                   'pass a folder (it is made if missing).'),
    ('checkpoint', f'--checkpoint_dir={__file__}/c',
     f'--checkpoint_dir {__file__}/c lies under the file {__file__}; pass a path in a folder.'),
    ('checkpoint', '--checkpoint_dir=/proc/checkpoints', '--checkpoint_dir /proc/checkpoints '
                                                         'cannot be written ('),
    ('decode', '--new_tokens=1', '--new_tokens=1 leaves no decode step to time apart from the '
                                 'prefill; generate at least 2.'),
    ('decode', '--prompt_len=250', '--prompt_len=250 and --new_tokens=64 do not fit '
                                   'model.max_len=256 (a decoder needs their sum within it, an '
                                   'encoder-decoder each of them); lower them.'),
    ('data', '--corpus_mb=0', '--corpus_mb=0 must list positive whole megabytes, e.g. 100,1000.'),
    ('data', '--corpus_mb=100,-5', '--corpus_mb=100,-5 must list positive whole megabytes'),
    ('data', '--corpus_mb=1.5', '--corpus_mb=1.5 must list positive whole megabytes'),
    ('train', '--profile_steps=2', '--profile_steps applies only with --profile_dir; add '
                                   '--profile_dir DIR or drop it.'),
    ('train', f'--profile_dir={__file__}/p', f'--profile_dir {__file__}/p lies under the file '),
    ('checkpoint', '--profile_dir=/tmp/p', '--profile_dir does not apply here; drop it (the flags '
                                           'are --config, --cpu_devices, --repeats, '
                                           '--checkpoint_dir, --json).'),
    ('train', '--workdir=/tmp/w', '--workdir does not apply here; drop it'),
    ('train', 'stray', "Unexpected argument 'stray'; every input is a flag"),
    ('train', '--cpu_devices=-2', '--cpu_devices=-2 must not be negative'),
    ('train', '--results=/', '--results / is a folder; pass the path of a file.'),
    ('train', f'--results={__file__}/results.jsonl',
     f'--results {__file__}/results.jsonl lies under the file {__file__}; pass a path in a '
     'folder.'),
    ('decode', f'--json={__file__}/out.json', f'--json {__file__}/out.json lies under the file'),
    ('train', '--json=/tmp/out/', '--json /tmp/out/ is a folder; pass the path of a file.'),
    ('decode', '--json=/proc/bench.json', '--json /proc/bench.json is not writable; pass another '
                                          'path.'),  # Tried, not asked: os.access grants root.
    ('train', '--json=bench/results.jsonl', '--json bench/results.jsonl is also --results, which '
                                            'it would overwrite; pass another path.'),
    ('train', f'--profile_dir={__file__}', f'--profile_dir {__file__} is a file; pass a folder'),
    ('train', '--profile_steps=0', '--profile_steps=0 must be at least 1.'),
])
def test_bench_bad_flags_are_one_sentence(mode, argument, sentence):
  result = subprocess.run([sys.executable, '-m', 'research.bench', mode, '--config',
                           'configs/decoder.py:tiny', argument], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {sentence}'), result.stderr


def test_a_profile_that_cannot_be_summarised_leaves_the_figures(tmp_path, monkeypatch):
  from research import profiling

  def no_trace(directory):
    raise FileNotFoundError(f'no trace of this host under {directory}')
  monkeypatch.setattr(profiling, 'trace_file', no_trace)
  results = tmp_path / 'results.jsonl'
  result = runs.in_process(
      'research.bench', 'train', '--config', 'configs/decoder.py:tiny',
      '--config.model.num_layers=1', '--config.model.emb_dim=32', '--config.model.mlp_dim=64',
      '--config.train.batch_size=8', '--config.train.seq_len=16', '--windows=1',
      '--window_steps=1', '--warmup_steps=0', '--profile_steps=1', f'--results={results}',
      f'--json={tmp_path / "bench.json"}', f'--profile_dir={tmp_path / "profile"}')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: the figures above stand, but the profile in {tmp_path / 'profile'} could not be "
      f"written out or summarised: no trace of this host under {tmp_path / 'profile'}.")
  assert 'tokens_per_s:' in result.stdout and json.load(open(tmp_path / 'bench.json'))['mfu'] > 0
  assert len(results.read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_trace_jax_cannot_write_out_leaves_the_figures(tmp_path):
  """jax's own failure to write the trace (its plugins/ folder taken by a file, past the check of
  --profile_dir itself) is one sentence after the figures, in a process of its own: jax keeps a
  failed profiler session."""
  folder = tmp_path / 'profile'
  folder.mkdir()
  (folder / 'plugins').write_text('')
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'train', '--config', 'configs/decoder.py:tiny',
       '--config.model.num_layers=1', '--config.train.batch_size=8', '--config.train.seq_len=16',
       '--windows=1', '--window_steps=1', '--warmup_steps=0', '--profile_steps=1',
       f'--results={tmp_path / "results.jsonl"}', f'--profile_dir={folder}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: the figures above stand, but the profile in {folder} could not '
                         'be written out or summarised: ') and 'not a directory' in last, last
  assert 'Traceback' not in result.stderr and 'tokens_per_s:' in result.stdout
  assert len((tmp_path / 'results.jsonl').read_text().splitlines()) == 1


def test_bench_rejects_an_unknown_mode_by_name_and_shows_usage_without_one():
  result = subprocess.run([sys.executable, '-m', 'research.bench', 'serve'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: 'serve' is not a benchmark mode; run python -m "
                                          'research.bench train|decode'), result.stderr
  result = subprocess.run([sys.executable, '-m', 'research.bench'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.startswith('usage: python -m research.bench')


def test_decoding_a_family_that_does_not_generate_names_those_that_do():
  line = runs.error_line(runs.command('research.bench', 'decode', '--config',
                                      'configs/encoder.py:bert_tiny'))
  assert line == ("error: model.family='encoder' does not generate text; benchmark decoding with "
                  'a config of decoder, encoder_decoder, rnn, rnn_seq2seq.')


@pytest.mark.slow
def test_bench_checkpoint_reports_the_checksum_cost_next_to_save_and_restore(tmp_path):
  out = tmp_path / 'checkpoint.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'checkpoint', '--config', 'configs/decoder.py:tiny',
       '--repeats=2', f'--checkpoint_dir={tmp_path}', f'--json={out}'], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['state_gb'] > 0 and results['checksum_s'] > 0
  # Each save and restore includes the checksums of every array, so they take longer.
  assert 0 < results['checksum_share_of_save'] < 1
  assert 0 < results['checksum_share_of_restore'] < 1
  assert os.listdir(tmp_path) == ['checkpoint.json']  # The temporary checkpoints are gone.


def test_the_cpu_peak_is_the_fastest_product_over_sizes_and_repeats():
  """Each size runs once untimed, then `repeats` times; its fastest run gives its rate and the
  best rate over the sizes is the peak (fake products and clock: exact numbers)."""
  ran = []
  durations = {4: [5.0, 2.0, 3.0], 8: [9.0, 8.0, 16.0]}  # Seconds of the timed runs of each size.
  ticks = []

  def product(size):
    def run():
      ran.append(size)
      if ran.count(size) > 1:  # Timed: the clock moves by this run's duration.
        ticks.append(ticks[-1] + durations[size][ran.count(size) - 2])
    return run

  def clock():
    ticks.append(ticks[-1] if ticks else 0.0)
    return ticks[-1]

  rate = metrics.best_matmul_rate(product, (4, 8), 3, clock)
  assert ran == [4] * 4 + [8] * 4  # One untimed run each, then three timed.
  assert rate == max(2 * 4 ** 3 / 2.0, 2 * 8 ** 3 / 8.0) == 128.0


def test_a_cpu_device_gets_its_share_of_the_peak_in_the_compute_dtype(monkeypatch):
  monkeypatch.setitem(metrics._measured_peaks, 'bfloat16', 16e9)
  monkeypatch.setitem(metrics._measured_peaks, 'float32', 8e9)
  assert jax.local_device_count() == 8
  assert metrics.device_peak('bfloat16') == (2e9, 'measured bfloat16 matmul peak')
  assert metrics.device_peak('float32') == (1e9, 'measured float32 matmul peak')


def test_each_gpu_gets_the_published_peak_of_its_own_part(monkeypatch):
  """The PCIe H100 has its own (lower) peak; an NVL card, whose per-GPU figure NVIDIA's
  datasheets disagree on, gets none rather than the SXM part's."""
  def peak(kind, dtype='bfloat16'):
    device = types.SimpleNamespace(platform='gpu', device_kind=kind)
    monkeypatch.setattr(jax, 'local_devices', lambda: [device])
    return metrics.device_peak(dtype)

  assert peak('NVIDIA H100 80GB HBM3') == (989e12, 'published bfloat16 dense peak of NVIDIA '
                                            'H100 80GB HBM3')
  assert peak('NVIDIA H200')[0] == 989e12
  assert peak('NVIDIA H100 PCIe')[0] == 756e12
  assert peak('NVIDIA H100 PCIe', 'float32')[0] == 51e12
  assert peak('NVIDIA H100 NVL') == (None, 'unknown peak for NVIDIA H100 NVL')
  assert peak('NVIDIA H200 NVL')[0] is None
  assert peak('NVIDIA B200') == (None, 'unknown peak for NVIDIA B200')


def test_checking_an_output_leaves_no_file_and_keeps_an_old_one(tmp_path, monkeypatch):
  new, old = tmp_path / 'new' / 'results.jsonl', tmp_path / 'old.jsonl'
  old.write_text('a line\n')
  for path in (new, old):
    monkeypatch.setattr(config_lib.flags.FLAGS['results'], 'value', str(path))
    config_lib.check_output('results')
  assert not new.parent.exists()  # Made with the file, once the benchmark has run.
  assert old.read_text() == 'a line\n'


def test_one_usable_core_is_named_in_the_singular(monkeypatch):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0})
  assert config_lib.host_processor().endswith(', 1 core')


def test_figures_print_whole_rates_in_one_aligned_column(capsys):
  bench._print(dict(tokens_per_s=23874.4, tokens_per_s_windows=[23874.2, 24000.9],
                    step_time_ms=33.81, model_tflops_per_s_per_device=0.1128,
                    compiled_peak_bytes=55402152, bf16=True, device_peak_bytes=None))
  assert capsys.readouterr().out.splitlines() == [
      '                 tokens_per_s: 23,874',
      '         tokens_per_s_windows: [23,874, 24,001]',
      '                 step_time_ms: 33.81',
      'model_tflops_per_s_per_device: 0.1128',
      '          compiled_peak_bytes: 55,402,152',
      '                         bf16: True']


def test_steps_are_split_over_the_windows():
  assert bench.window_sizes(10, 4, 20) == [3, 3, 2, 2]
  assert bench.window_sizes(3, 7, 20) == [1, 1, 1]  # Fewer steps than windows: one step each.
  assert bench.window_sizes(0, 2, 5) == [5, 5]  # No --steps: windows x window_steps.


def _record(variant, date, tokens_per_s, mfu=0.5, batch=8, device='NVIDIA H100 80GB HBM3',
            **more):
  return dict(dict(variant=variant, device_kind=device, seq_len=1024, target_len=None,
                   per_device_batch=batch, mfu=mfu, tokens_per_s_per_device=tokens_per_s,
                   model_tflops_per_s_per_device=tokens_per_s * 1e9 / 1e12,
                   compiled_peak_bytes=3 * GIB, device_peak_bytes=None, date=date), **more)


def test_the_table_shows_the_latest_run_of_each_device_model_length_and_batch(tmp_path):
  results = tmp_path / 'results.jsonl'
  lines = [_record('gpt2_small_1024', '2026-01-01T10:00:00+00:00', 100_000, mfu=0.4),
           _record('t5_1_1_base_512', '2026-01-02T10:00:00+00:00', 50_000, seq_len=512,
                   target_len=114, device_peak_bytes=int(1.5 * GIB), mfu=None),
           _record('gpt2_small_1024', '2026-01-03T10:00:00+00:00', 123_456, mfu=0.4567),
           _record('gpt2_small_1024', '2026-01-04T10:00:00+00:00', 90_000, batch=4,
                   device='cpu', compiled_peak_bytes=5 << 20),
           # The same model on two processors: a row each, the ratio to the peer where it ran.
           _record('nanogpt_cpu', '2026-01-05T10:00:00+00:00', 20_000, batch=12, device='cpu',
                   platform='cpu', processor='AMD EPYC, 2 cores', ratio_to_torch=1.2345),
           _record('nanogpt_cpu', '2026-01-06T10:00:00+00:00', 21_000, batch=12, device='cpu',
                   platform='cpu', processor='Intel Xeon, 2 cores', ratio_to_torch=0.8)]
  results.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  out = tmp_path / 'table.md'
  runs.ok(runs.in_process('research.bench', 'table', f'--results={results}',
                          f'--markdown={out}'))
  table = out.read_text().splitlines()
  assert table[0].startswith('| device | model | length | batch / device | MFU |')
  assert table[2:7] == [
      '| NVIDIA H100 80GB HBM3 | gpt2_small_1024 | 1024 | 8 | 45.7% | 123,456 | 123.5 | - | '
      '3.0 GiB | 2026-01-03 |',
      '| NVIDIA H100 80GB HBM3 | t5_1_1_base_512 | 512 / 114 | 8 | no peak known | 50,000 | '
      '50 | - | 1.5 GiB | 2026-01-02 |',  # The device's own peak wins over the compiled estimate.
      '| cpu | gpt2_small_1024 | 1024 | 4 | 50.0% | 90,000 | 90 | - | 5.0 MiB | 2026-01-04 |',
      '| cpu (AMD EPYC, 2 cores) | nanogpt_cpu | 1024 | 12 | 50.0% | 20,000 | 20 | 1.23x | '
      '3.0 GiB | 2026-01-05 |',
      '| cpu (Intel Xeon, 2 cores) | nanogpt_cpu | 1024 | 12 | 50.0% | 21,000 | 21 | 0.80x | '
      '3.0 GiB | 2026-01-06 |']
  assert table[7:] == ['', bench.MFU_FORMULA]
  printed = runs.ok(runs.in_process('research.bench', 'table', f'--results={results}'))
  assert printed.stdout == out.read_text()


def test_the_table_of_a_missing_results_file_is_one_sentence(tmp_path):
  result = runs.in_process('research.bench', 'table', f'--results={tmp_path / "none.jsonl"}')
  runs.assert_error(result, f'--results {tmp_path / "none.jsonl"} does not exist')
  result = runs.in_process('research.bench', 'table', f'--results={tmp_path}')
  runs.assert_error(result, f'--results {tmp_path} is a folder')


@pytest.mark.parametrize('line, lacks', [
    ('{"variant": "nanogpt_cpu", "device_', 'a JSON object'),  # Cut short.
    ('{"variant": "x"}', 'device_kind, seq_len, per_device_batch'),  # Another file's line.
    ('[1, 2]', 'a JSON object'),
])
def test_a_results_line_the_table_cannot_read_is_named(tmp_path, line, lacks):
  results = tmp_path / 'results.jsonl'
  good = json.dumps(_record('gpt2_small_1024', '2026-01-01T10:00:00+00:00', 100_000))
  results.write_text(f'{good}\n\n{line}\n{good}\n')
  line = runs.error_line(runs.in_process('research.bench', 'table', f'--results={results}'))
  assert line.startswith(f'error: Line 3 of {results} is not a results line of `research.bench '
                         f'train` (it lacks {lacks}') and line.endswith('delete or mend that line.')


def test_the_table_of_an_empty_results_file_or_to_an_unwritable_path_is_one_sentence(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  runs.assert_error(runs.in_process('research.bench', 'table', f'--results={empty}'),
                    f'--results {empty} holds no results; run `python -m research.bench train`')
  results = tmp_path / 'results.jsonl'
  results.write_text(json.dumps(_record('gpt2_small_1024', '2026-01-01T10:00:00+00:00', 1)) + '\n')
  runs.assert_error(runs.in_process('research.bench', 'table', f'--results={results}',
                                    f'--markdown={results}/table.md'),
                    f'--markdown {results}/table.md lies under the file {results}')
  out = tmp_path / 'new' / 'table.md'  # A missing folder is made.
  runs.ok(runs.in_process('research.bench', 'table', f'--results={results}', f'--markdown={out}'))
  assert out.read_text().startswith('| device | model |')


def test_help_lists_each_modes_flags():
  result = runs.ok(runs.command('research.bench', '--help'))
  assert result.stdout.startswith('Benchmarks.')
  assert 'train flags:\n  --config: Config file and variant' in result.stdout
  assert '  --profile_steps: train: steps traced for --profile_dir. (default: 3)\n' in result.stdout
  assert 'table flags:\n  --results:' in result.stdout
  result = runs.ok(runs.command('research.bench', 'decode', '--help'))
  listed = [line.split(':')[0].strip() for line in result.stdout.split('flags:\n')[1].splitlines()
            if line.startswith('  --')]
  assert listed == ['--config', '--cpu_devices', '--decode_batch', '--prompt_len', '--new_tokens',
                    '--repeats', '--json']


def test_a_file_that_cannot_be_written_after_the_run_leaves_the_figures_and_the_results(
    tmp_path):
  """A full disk (/dev/full) under --json: the figures are printed and the results line is
  appended first, then one sentence."""
  results = tmp_path / 'results.jsonl'
  result = runs.in_process(
      'research.bench', 'train', '--config', 'configs/decoder.py:tiny',
      '--config.model.num_layers=1', '--config.train.batch_size=8', '--config.train.seq_len=16',
      '--windows=1', '--window_steps=1', '--warmup_steps=0', f'--results={results}',
      '--json=/dev/full')
  runs.assert_error(result, '--json /dev/full could not be written (No space left on device); '
                            'check the path and its disk.')
  assert 'tokens_per_s:' in result.stdout
  assert json.loads(results.read_text())['variant'] == 'tiny'


@pytest.mark.parametrize('raised, reason', [
    ("ModuleNotFoundError(\"No module named 'torch'\", name='torch')",
     'needs torch, which is not installed here'),
    ("ImportError('cannot import name nn')",  # An installed PyTorch of another version.
     'could not be imported (cannot import name nn)'),
])
def test_a_peer_that_is_not_installed_is_one_sentence(tmp_path, raised, reason):
  """--peer=torch where PyTorch is missing (requirements.txt alone) or does not import names
  what to install."""
  shadow = tmp_path / 'shadow'
  shadow.mkdir()
  (shadow / 'torch.py').write_text(f'raise {raised}\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), REPO]))
  results = tmp_path / 'results.jsonl'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'train', '--config', 'configs/decoder.py:tiny',
       '--config.model.num_layers=1', '--config.train.batch_size=8',
       '--config.train.seq_len=16', '--windows=1', '--window_steps=1', '--warmup_steps=0',
       '--peer=torch', f'--results={results}'], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  line = runs.error_line(result)
  assert line == (f'error: --peer=torch {reason}; install the peers with pip install -r '
                  'requirements-bench.txt, which pins versions that work.'), line
  assert not results.exists()


@pytest.mark.parametrize('name', sorted(bench_configs.BENCHMARKS))
def test_each_benchmark_config_validates_on_one_device_in_bfloat16_over_float32(name):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', f'bench.py:{name}'))
  assert config_lib.validate(config, 1) == dict(data=1, fsdp=1, sequence=1, tensor=1)
  assert (config.model.dtype, config.model.param_dtype) == ('bfloat16', 'float32')
  record = bench_configs.BENCHMARKS[name]
  assert config.train.seq_len == record['settings']['train.seq_len'] == int(name.split('_')[-1])
  assert config.model.remat == record['settings']['model.remat']
  assert 0.4 < record['target_mfu'] < 0.6 and record['planned'].endswith('GiB')
  if config.model.family == 'encoder_decoder':
    assert config.train.target_len == 114


def test_an_unknown_benchmark_names_the_benchmarks():
  with pytest.raises(config_lib.ConfigError, match=r"benchmark 'gpt3'; choose one of \['bert_"):
    config_lib.load_config_file(os.path.join(REPO, 'configs', 'bench.py:gpt3'))


def test_a_benchmark_refused_before_it_runs_makes_no_results_folder(tmp_path):
  results = tmp_path / 'new' / 'results.jsonl'
  line = runs.error_line(runs.in_process('research.bench', 'train', '--config',
                                         'configs/decoder.py:tiny', '--config.model.num_heads=3',
                                         f'--results={results}'))
  assert line.startswith('error: model.num_heads=3 must divide model.emb_dim=128')
  assert not (tmp_path / 'new').exists()


def test_the_gpu_script_parses_and_refuses_bad_usage():
  script = os.path.join(REPO, 'launch', 'bench_gpu.sh')
  assert subprocess.run(['bash', '-n', script]).returncode == 0
  result = subprocess.run(['bash', script], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'bench_gpu.sh wheels' in result.stderr  # The header.
  # Run as its messages say, launch/bench_gpu.sh ...: executable, with its header as --help.
  assert os.access(script, os.X_OK)
  for flag in ('--help', '-h', 'help'):
    shown = subprocess.run([script, flag], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout == result.stderr and not shown.stderr
  for args, sentence in ((['serve'], "unknown command 'serve'"),
                         (['run'], 'run takes one argument, the folder for the results'),
                         (['wheels', 'x'], 'wheels takes no arguments')):
    result = subprocess.run(['bash', script, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: {sentence}; run 'launch/bench_gpu.sh wheels' (with network) "
                             "or 'launch/bench_gpu.sh run OUT_DIR' (on the GPU).\n")


def test_the_gpu_script_refuses_bad_settings_in_one_sentence_and_keeps_its_wheels(tmp_path):
  script = os.path.join(REPO, 'launch', 'bench_gpu.sh')
  (tmp_path / 'a_file').write_text('')
  for env, args, sentence in [
      ({'PYTHON': '/nonexistent/python'}, ['wheels'],
       'PYTHON=/nonexistent/python is not a Python here; set PYTHON to one (the default is '
       'python3).'),
      ({'BENCH_BUDGET': 'abc'}, ['run', str(tmp_path / 'out')],
       'BENCH_BUDGET=abc is not a whole number of seconds or steps; give one.'),
      ({'BENCH_STEPS': '08'}, ['run', str(tmp_path / 'out')],  # Bash would read it as octal.
       'BENCH_STEPS=08 is not a whole number of seconds or steps; give one.'),
      ({}, ['run', str(tmp_path / 'a_file')], f'{tmp_path}/a_file is a file; pass a folder for '
                                              'the results.'),
      ({}, ['run', str(tmp_path / 'a_file' / 'out')],
       f'cannot make the folder {tmp_path}/a_file/out; pass one that can be written.')]:
    result = subprocess.run(['bash', script, *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, 'PYTHON': sys.executable, **env})
    assert (result.returncode, result.stderr) == (2, f'error: {sentence}\n'), result.stderr
  # A download that fails (no index to reach) leaves the wheels already there, and no scratch.
  wheels = tmp_path / 'wheels'
  wheels.mkdir()
  (wheels / 'kept.whl').write_text('')
  result = subprocess.run(['bash', script, 'wheels'], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHON=sys.executable,
                                                BENCH_WHEELS=str(wheels), PIP_NO_INDEX='1',
                                                PIP_CONFIG_FILE=os.devnull))
  assert result.returncode != 0, result.stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'wheels']
  assert [p.name for p in wheels.iterdir()] == ['kept.whl']


# The planner's verdict on one H100 80 GB (whose bytes also decide an H200's), in this process:
# one of the 8 simulated devices compiles each step, with jax's persistent compilation cache.
@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(bench_configs.BENCHMARKS))
def test_each_benchmark_config_fits_one_h100_and_one_h200(name):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', f'bench.py:{name}'))
  devices, hbm = plan.topology('h100-80gb:1')
  report = plan.plan(config, jax.devices()[:devices], hbm_bytes=hbm)
  assert report['fits'] and report['total_bytes_per_device'] < 0.85 * hbm, report
  assert plan.fit(report, plan.topology('h200:1')[1])['fits']
  assert (report['batch_size'], report['seq_len']) == (config.train.batch_size,
                                                       config.train.seq_len)
  # The figure the config records, within 10%: the models' memory moves as their code does.
  planned = float(bench_configs.BENCHMARKS[name]['planned'].split()[-2])
  assert abs(report['total_bytes_per_device'] / GIB - planned) < 0.1 * planned, report


def test_the_gpu_script_keeps_to_its_time_budget(tmp_path):
  """Each part's limit is cut to what BENCH_BUDGET leaves: with 30 s in all, no benchmark gets
  the 15 s it needs, and each is named as skipped, in well under the budget."""
  env = dict(os.environ, PYTHON=sys.executable, BENCH_TESTS='0', BENCH_BUDGET='30',
             BENCH_CONFIGS='configs/decoder.py:tiny configs/decoder.py:nanogpt_cpu')
  result = subprocess.run(['bash', 'launch/bench_gpu.sh', 'run', str(tmp_path / 'out')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-3:] == ['tiny: skipped, the 30 s budget is spent.',
                                             'nanogpt_cpu: skipped, the 30 s budget is spent.',
                                             'no benchmark finished: no table.']


@pytest.mark.slow
def test_the_gpu_script_runs_a_tiny_config_on_cpu_into_results_and_a_table(tmp_path):
  """`run` mode end to end with the project's packages already there (nothing to install): the
  results line of `research.bench train --steps` and the table row made from it."""
  out = tmp_path / 'out'
  env = dict(os.environ, PYTHON=sys.executable, BENCH_TESTS='0', BENCH_STEPS='3',
             BENCH_WARMUP='1', BENCH_CONFIGS='configs/decoder.py:tiny',
             BENCH_OVERRIDES=' '.join([
                 '--cpu_devices=1', '--config.model.num_layers=1', '--config.model.emb_dim=32',
                 '--config.model.mlp_dim=64', '--config.train.batch_size=2',
                 '--config.train.seq_len=16', '--config.train.progress_bar=False']))
  result = subprocess.run(['bash', 'launch/bench_gpu.sh', 'run', str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['environment.txt', 'profile_tiny', 'results.jsonl',
                                     'table.md', 'tiny.log']
  profile = (out / 'profile_tiny' / 'profile.md').read_text()
  assert profile.startswith('Profile of `python -m research.bench train --config '
                            'configs/decoder.py:tiny ')
  assert '\n2 profiled steps' in profile and '| backward | Decoder/layers/mlp/' in profile
  assert profile in (out / 'tiny.log').read_text()  # Printed after the figures, too.
  [line] = [json.loads(text) for text in (out / 'results.jsonl').read_text().splitlines()]
  assert line['config'] == 'configs/decoder.py:tiny' and line['variant'] == 'tiny'
  assert '--config.model.emb_dim=32' in line['overrides']
  assert '--cpu_devices=1' not in line['overrides']  # Only config overrides are recorded.
  assert (line['devices'], line['device_kind'], line['platform']) == (1, 'cpu', 'cpu')
  assert line['processor'] == config_lib.host_processor()
  cores = len(os.sched_getaffinity(0))
  assert line['processor'].endswith(f' {cores} core' + ('s' if cores > 1 else ''))
  assert (line['seq_len'], line['target_len'], line['batch_size'], line['per_device_batch']) == (
      16, None, 2, 2)
  assert (line['dtype'], line['param_dtype'], line['remat'], line['attention']) == (
      'float32', 'float32', 'dots', 'explicit')
  assert line['jax'] == jax.__version__ and line['git'] and line['date'].endswith('+00:00')
  assert line['timed_steps'] == 3 and len(line['tokens_per_s_windows']) == 3
  assert line['tokens_per_s_per_device'] == line['tokens_per_s'] > 0
  assert line['model_tflops_per_s_per_device'] == pytest.approx(
      line['tokens_per_s'] * line['flops_per_token'] / 1e12)
  assert line['mfu'] == pytest.approx(line['model_tflops_per_s_per_device']
                                      / line['peak_tflops_per_s'])
  assert line['compile_s'] > 0 and line['compiled_peak_bytes'] > 0
  assert line['device_peak_bytes'] is None  # A CPU keeps no memory statistics.
  table = (out / 'table.md').read_text().splitlines()
  assert table[2].startswith(f"| cpu ({line['processor']}) | tiny | 16 | 2 | "
                            f"{100 * line['mfu']:.1f}% | ")
  assert table[2].endswith(f" | {line['date'][:10]} |")


def test_the_peer_trains_in_a_process_of_its_own_and_its_refusal_is_one_sentence():
  """The torch peer runs in a child process (its threads never share ours): it answers the
  tokens of the steps asked for, and a config it cannot train comes back as its own sentence."""
  from research import config as config_lib
  from research.peers import serve
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'decoder.py:nanogpt_cpu'))
  peer = serve.PeerProcess('research.peers.torch_gpt', config, 2, 8)
  try:
    assert peer.process.pid != os.getpid()
    assert peer(3) == 3 * 2 * 8
  finally:
    peer.close()
  assert peer.process.returncode == 0
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'decoder.py:tiny'))
  with pytest.raises(ValueError, match=r'^The torch peer of the decoder implements the GPT-2 '
                     r'style only; use a gpt2 variant such as nanogpt_cpu\.$'):
    serve.PeerProcess('research.peers.torch_gpt', config, 2, 8)


def test_the_generation_library_run_as_a_command_names_the_commands():
  """research.decode is what `bench decode` times, not a command: run as one (--help, say) it
  names the two commands instead of doing nothing."""
  result = runs.command('research.decode', '--help')
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr.strip() == (
      'research.decode is the generation library; run python -m research.sample (text from a '
      'trained run) or python -m research.bench decode (its speed), each with --help.')
