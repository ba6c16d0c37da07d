"""The benchmark command runs end to end, with one JAX device per core and the torch peer."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_train_reports_throughput_mfu_and_the_peer_ratio(tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
      [sys.executable, '-m', 'research.bench', 'train', '--config', 'configs/decoder.py:nanogpt_cpu',
       '--cpu_devices=2', '--peer=torch', '--windows=2', '--window_steps=3', '--warmup_steps=1',
       f'--json={out}'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out))
  assert results['devices'] == 2
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
       f'--json={out}'], cwd=REPO, capture_output=True, text=True, timeout=600)
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


@pytest.mark.parametrize('argument, sentence', [
    ('--repeats=0', '--repeats=0 must be at least 1.'),
    ('--checkpoint_dir=/nonexistent', '--checkpoint_dir /nonexistent is not a directory'),
])
def test_bench_bad_flags_are_one_sentence(argument, sentence):
  result = subprocess.run([sys.executable, '-m', 'research.bench', 'checkpoint', '--config',
                           'configs/decoder.py:tiny', argument], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {sentence}'), result.stderr


def test_bench_rejects_an_unknown_mode():
  result = subprocess.run([sys.executable, '-m', 'research.bench', 'serve'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and 'usage' in result.stderr


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
