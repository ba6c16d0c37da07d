"""The trainer's command line under misuse: a second trainer, bad workdirs, divergence, a step out
of memory, a changed batch size or sequence length on resume, and evaluation on its own
cadence."""

import json
import os
import time

import numpy as np
import pytest

import runs
from research import config as config_lib
from research import device_memory
from research.data import pipeline as pipeline_lib

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return runs.write_corpus(tmp_path_factory.mktemp('data') / 'corpus')


def test_a_second_trainer_on_the_same_workdir_refuses_and_a_dead_ones_lock_is_stale(tmp_path,
                                                                                    corpus):
  workdir = tmp_path / 'run'
  first = runs.start(workdir, corpus, '--config.train.num_steps=100000',
                     '--config.checkpoint.every_steps=100000')
  deadline = time.time() + 300
  while not (workdir / 'metrics.jsonl').exists():
    assert first.poll() is None and time.time() < deadline, open(f'{workdir}.log').read()[-3000:]
    time.sleep(0.1)
  line = runs.error_line(runs.train(workdir, corpus))
  assert line.startswith(f'error: Another trainer (pid {first.pid} on '), line
  assert line.endswith(f'is running in {workdir}; wait for it to finish or stop it, or pass '
                       'another --workdir.'), line
  first.kill()  # Dies without releasing anything by hand: the kernel drops its lock.
  first.wait()
  result = runs.ok(runs.train(workdir, corpus, '--config.train.num_steps=6',
                              '--config.checkpoint.every_steps=3'))
  assert 'fresh initialisation' in result.stderr  # Killed before its first checkpoint.
  assert not (workdir / 'train.lock').exists()  # Released on exit.


@pytest.mark.parametrize('kind', ['file', 'unwritable'])
def test_a_workdir_that_cannot_be_used_is_one_sentence(tmp_path, corpus, kind):
  if kind == 'file':
    workdir = tmp_path / 'a_file'
    workdir.write_text('not a directory')
    expected = f'error: --workdir {workdir} is a file; pass a folder (it is made if missing).'
  else:
    workdir = '/sys/research-test-workdir'  # Refused even to root.
    expected = f'error: --workdir {workdir} cannot be written ('
  line = runs.error_line(runs.train(workdir, corpus))
  assert line.startswith(expected), line


def test_divergence_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, corpus):
  workdir = tmp_path / 'run'
  stopped = runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=4',
                               '--config.checkpoint.every_steps=2', '--config.checkpoint.keep=1'))
  assert ('Stopped at step 4 (train.stop_at_step) with its checkpoint saved; rerun without '
          'train.stop_at_step, or with a later one, to continue to train.num_steps=20.'
          in stopped.stderr), stopped.stderr[-2000:]
  assert ('Note: optim.warmup_steps=100 is not shorter than train.num_steps=20, so the learning '
          'rate never reaches optim.lr=0.003; shorten the warm-up for a run this short.'
          in stopped.stderr), stopped.stderr[-2000:]
  assert os.listdir(workdir / 'checkpoints') == ['4']
  again = runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=4'))
  assert (f'The run in {workdir} is already at step 4; raise or drop '
          '--config.train.stop_at_step to continue it' in again.stderr), again.stderr[-2000:]
  # An absurd learning rate makes the parameters overflow within a few steps.
  result = runs.train(workdir, corpus, '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
                      '--config.checkpoint.every_steps=2', '--config.checkpoint.keep=1')
  line = runs.error_line(result, code=1)
  assert line.startswith('error: Training diverged: step '), line
  assert 'so nothing after step 4 was saved; lower optim.lr' in line, line
  diverged = int(line.split()[4])
  assert diverged > 4
  assert os.listdir(workdir / 'checkpoints') == ['4']  # Never rotated out by a bad save.
  records = runs.metrics(workdir)  # Strict JSON throughout.
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert max(r['step'] for r in records) < diverged


def _a_million_positions(workdir):
  """A run whose state fits and whose attention over a million positions needs terabytes."""
  length = 1 << 20
  return ('--config', 'configs/decoder.py:tiny', '--workdir', str(workdir),
          f'--config.model.max_len={length}', f'--config.train.seq_len={length}',
          '--config.train.batch_size=1', '--config.mesh.data=1', '--config.mesh.sequence=-1',
          '--config.train.progress_bar=False')


def test_a_step_that_cannot_fit_is_refused_before_it_runs(tmp_path):
  workdir = tmp_path / 'run'
  line = runs.error_line(runs.command('research.train', *_a_million_positions(workdir)))
  assert line.startswith('error: A train step needs '), line
  assert 'TiB beyond the state on this host' in line and 'lower train.batch_size' in line, line
  assert not (workdir / 'config.json').exists()


def test_a_step_that_runs_out_of_memory_is_one_sentence(tmp_path, monkeypatch):
  # Where the memory left is not known, the check passes and XLA's allocation fails: at once
  # where the kernel refuses what it cannot back, as it does by default (vm.overcommit_memory 0).
  with open('/proc/sys/vm/overcommit_memory') as f:
    if f.read().strip() == '1':
      pytest.skip('this host grants any allocation (vm.overcommit_memory=1), so terabytes '
                  'would reach its out-of-memory killer instead of XLA\'s error')
  monkeypatch.setattr(device_memory, '_room', lambda devices, in_use: None)
  result = runs.in_process('research.train', *_a_million_positions(tmp_path / 'run'))
  line = runs.error_line(result, code=1)
  assert line.startswith('error: A compiled step ran out of cpu memory (Out of memory '
                         'allocating '), line
  assert 'lower train.batch_size' in line and 'python -m research.plan' in line, line


def test_a_run_that_diverged_before_its_first_checkpoint_gives_way_to_the_next_start(tmp_path,
                                                                                      corpus):
  workdir = tmp_path / 'run'
  result = runs.train(workdir, corpus, '--config.optim.lr=1e30', '--config.optim.warmup_steps=0',
                      '--config.model.mlp_dim=96', '--config.checkpoint.every_steps=1000')
  line = runs.error_line(result, code=1)
  assert 'so no checkpoint had been saved; lower optim.lr' in line, line
  assert line.endswith('then rerun to start afresh.'), line
  assert not (workdir / 'checkpoints').exists()
  runs.ok(runs.train(workdir, corpus, '--config.train.num_steps=2'))
  # config.json is the record of the run whose checkpoints the workdir now holds.
  assert [name for name in os.listdir(workdir) if name.startswith('config')] == ['config.json']
  saved = json.loads((workdir / 'config.json').read_text())
  assert (saved['model']['mlp_dim'], saved['optim']['lr']) == (128, 3e-3)
  # A resume with another setting keeps config.json and adds a dated copy, as before.
  runs.ok(runs.train(workdir, corpus, '--config.train.num_steps=3', '--config.optim.lr=1e-3'))
  assert json.loads((workdir / 'config.json').read_text())['optim']['lr'] == 3e-3
  assert len([name for name in os.listdir(workdir) if name.startswith('config.')]) == 2


def test_a_resume_with_other_settings_names_them(tmp_path, decoder_config, capsys):
  config = decoder_config('tiny')
  config_lib.record_run(config, str(tmp_path), resumed=False)
  config_lib.record_run(config, str(tmp_path))  # The same settings: nothing to say.
  assert capsys.readouterr().err == ''
  config.optim.lr, config.train.num_steps = 1e-3, 7
  config_lib.record_run(config, str(tmp_path))
  [dated] = [name for name in os.listdir(tmp_path) if name.startswith('config.2')]
  assert capsys.readouterr().err == (
      "Note: resumed with settings other than config.json's: optim.lr (0.003 there, 0.001 "
      "here), train.num_steps (1200 there, 7 here); config.json keeps the run's first settings "
      f'and {dated} records these.\n')


def _rows_tokens(corpus, start, stop):
  """Target tokens in rows [start, stop) of the training stream `runs.train_command` reads."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs/decoder.py:tiny'))
  config.data.source, config.data.paths = 'text', str(corpus)
  config.data.data_dir = str(corpus.parent / 'tfds')
  config.train.seq_len = 32
  return float(pipeline_lib.build(config).train.rows(start, stop)['weights'].sum())


@pytest.fixture(scope='module')
def short_documents(tmp_path_factory):
  """Documents shorter than a row, of varied lengths: rows hold different numbers of tokens."""
  root = tmp_path_factory.mktemp('short') / 'corpus'
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(300):
    (root / f'd{i}.txt').write_text('x' * int(rng.integers(2, 30)))
  return root


def test_a_changed_batch_size_continues_from_the_next_unseen_row(tmp_path, short_documents):
  workdir, corpus = tmp_path / 'run', short_documents
  runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=5'))  # Rows 0..39.
  first_row = 40
  for new_batch_size, stop in ((16, 7), (4, 9)):  # A larger batch, then a smaller one.
    runs.ok(runs.train(workdir, corpus, f'--config.train.batch_size={new_batch_size}',
                       f'--config.train.stop_at_step={stop}'))
    tokens = {r['step']: r['tokens'] for r in runs.metrics(workdir) if 'tokens' in r}
    for step in (stop - 1, stop):
      expected = _rows_tokens(corpus, first_row, first_row + new_batch_size)
      assert tokens[step] == expected, (step, tokens[step], expected)
      first_row += new_batch_size
    # Rows counted from the step alone would have been others.
    assert tokens[stop - 1] != _rows_tokens(corpus, (stop - 2) * new_batch_size,
                                            (stop - 1) * new_batch_size)


def test_a_changed_sequence_length_on_resume_is_refused(tmp_path, corpus):
  workdir = tmp_path / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=2'))
  line = runs.error_line(runs.train(workdir, corpus, '--config.train.seq_len=64'))
  assert line == ('error: The checkpoint counts its data position in rows of train.seq_len=32 '
                  'but this run has 64; resume with --config.train.seq_len=32, or warm start a '
                  'new --workdir with --config.checkpoint.init_from.')


def test_evaluation_runs_on_its_own_cadence(tmp_path, corpus):
  workdir = tmp_path / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.num_steps=7', '--config.train.log_every=3',
                     '--config.train.eval_every=2'))
  records = runs.metrics(workdir)
  assert [r['step'] for r in records if 'eval_loss' in r] == [2, 4, 6, 7]
  assert [r['step'] for r in records if 'loss' in r] == [3, 6, 7]
  environment = json.load(open(workdir / 'environment.json'))
  assert environment['data']['sources'][0]['spec'] == f'text:{corpus}'


def test_resuming_on_other_data_names_the_settings_that_differ(tmp_path, corpus):
  workdir = tmp_path / 'run'
  runs.ok(runs.train(workdir, corpus, '--config.train.stop_at_step=2'))
  line = runs.error_line(runs.train(workdir, corpus, '--config.data.validation_percent=20'))
  assert line == ('error: The checkpoint was trained on other data (the run recorded other data '
                  'settings: data.validation_percent: 5 there, 20 here); resume with the '
                  'same data settings, or warm start a new --workdir with '
                  '--config.checkpoint.init_from.'), line
