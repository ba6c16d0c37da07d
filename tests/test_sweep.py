"""Sweeps: expansion of a sweep file into runs, their names, the registry, the launchers, and a
real sweep that completes, skips, resumes and records a failure."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from launch import sweep as sweep_cli
from research import report
from research import sweeps
import runs as runs_lib

TINY = 'configs/decoder.py:tiny'


def test_product_zip_seeds_and_points_expand_in_order():
  grid = sweeps.product(lr=[1e-3, 3e-4], num_layers=[2, 4]) * sweeps.seeds(2)
  assert list(grid)[:3] == [dict(lr=1e-3, num_layers=2, seed=0),
                            dict(lr=1e-3, num_layers=2, seed=1),
                            dict(lr=1e-3, num_layers=4, seed=0)]
  assert len(grid) == 8
  assert list(sweeps.zipped(a=[1, 2], b=['x', 'y'])) == [dict(a=1, b='x'), dict(a=2, b='y')]
  assert list(sweeps.seeds(2, start=5)) == [dict(seed=5), dict(seed=6)]
  both = sweeps.points(dict(a=1)) + sweeps.product(a=[2, 3])
  assert list(both) == [dict(a=1), dict(a=2), dict(a=3)]
  assert list(sweeps.product(sweeps.seeds(2), a=[1])) == [dict(a=1, seed=0), dict(a=1, seed=1)]


@pytest.mark.parametrize('build, message', [
    (lambda: sweeps.product(a=[1]) * sweeps.points(dict(a=2)), "Both factors of a product set"),
    (lambda: sweeps.zipped(a=[1, 2], b=[1]), 'zipped needs axes of one length'),
    (lambda: sweeps.seeds(0), 'needs at least one seed'),
    (lambda: sweeps.product(a=3), "Axis 'a' needs a list of values"),
])
def test_malformed_spaces_are_one_sentence(build, message):
  with pytest.raises(sweeps.SweepError, match=message):
    build()


def test_runs_are_named_by_the_overrides_that_vary_and_a_config_hash():
  runs = sweeps.expand(list(sweeps.product(lr=[1e-3, 3e-3]) * sweeps.seeds(2)
                            * sweeps.points({'train.num_steps': 10})), TINY)
  names = [run.name for run in runs]
  assert [name.rsplit('-', 1)[0] for name in names] == [
      'lr=0.001,seed=0', 'lr=0.001,seed=1', 'lr=0.003,seed=0', 'lr=0.003,seed=1']
  assert [run.variant for run in runs] == ['lr=0.001'] * 2 + ['lr=0.003'] * 2
  assert runs[0].overrides == {'optim.lr': 1e-3, 'seed': 0, 'train.num_steps': 10}
  assert runs[0].arguments() == ['--config.optim.lr=0.001', '--config.seed=0',
                                 '--config.train.num_steps=10']
  assert runs[0].config.optim.lr == 1e-3 and runs[3].config.seed == 1
  # The same point has the same hash in another sweep (here seed follows from lr, so the name
  # leaves it out); another base config gives another hash.
  again = sweeps.expand([dict(lr=1e-3, seed=0, num_steps=10), dict(lr=3e-3, seed=1,
                                                                   num_steps=10)], TINY)
  assert again[0].name == 'lr=0.001-' + names[0].rsplit('-', 1)[1]
  other = sweeps.expand([dict(lr=1e-3, seed=0, num_steps=10), dict(lr=3e-3, seed=1,
                                                                   num_steps=10)],
                        'configs/decoder.py:nanogpt_cpu')
  assert other[0].name.rsplit('-', 1)[1] != names[0].rsplit('-', 1)[1]


def test_points_may_name_their_own_config():
  runs = sweeps.expand([{'config': TINY}, {'config': 'configs/encoder.py:bert_tiny',
                                           'train.num_steps': 5}], None)
  # num_steps follows from the config here, so the config alone names the runs.
  assert [run.name.rsplit('-', 1)[0] for run in runs] == ['decoder.tiny', 'encoder.bert_tiny']
  assert runs[1].config.model.family == 'encoder' and runs[1].spec.endswith('bert_tiny')


@pytest.mark.parametrize('point, message', [
    (dict(lrr=1e-3), "Sweep key 'lrr' is not a config key; closest: optim.lr"),
    (dict(name='lion'), r"Sweep key 'name' could name \['objective.name', 'optim.name'\]"),
    (dict(num_layers=2.5), r"^Sweep value model.num_layers=2.5 is not a valid value of that key "
                           r"\(an integer is expected\); correct the sweep file.$"),
    (dict(num_layers='a'), r"^Sweep value model.num_layers='a' is not a valid value"),
    (dict(num_layers=True), r"^Sweep value model.num_layers=True is not a valid value of that "
                            r"key \(an integer is expected\)"),
    (dict(lr=False), r"^Sweep value optim.lr=False is not a valid value of that key \(a number "
                     r"is expected\)"),
    (dict(bogus_key=1), r"^Sweep key 'bogus_key' is not a config key and none is close; write a "
                        r"key of the config, dotted \(SECTION.KEY, SECTION one of checkpoint, "
                        r"data, .*model, .*optim.*\) or its last part alone.$"),
    (dict(lr=[1e-3]), 'is not a number, string or boolean'),
    # Every run of the point would be refused as it started.
    ({'objective.alpha': 0.5}, r'^A point of the sweep \(configs/decoder.py:tiny\): '
                               r'objective.alpha is not read by objective.name=causal_lm'),
])
def test_bad_points_are_one_sentence(point, message):
  with pytest.raises(sweeps.SweepError, match=message):
    sweeps.expand([point], TINY)


def test_repeated_points_and_missing_configs_are_refused():
  with pytest.raises(sweeps.SweepError, match='resolve to the same config'):
    sweeps.expand([dict(lr=1e-3), {'optim.lr': 1e-3}], TINY)
  with pytest.raises(sweeps.SweepError, match='names no config'):
    sweeps.expand([dict(lr=1e-3)], None)


def test_a_sweep_file_takes_an_argument(tmp_path):
  path = tmp_path / 'x.py'
  path.write_text(textwrap.dedent('''
      from research.sweeps import product
      CONFIG = 'configs/decoder.py:tiny'
      def get_sweep(layers='2'):
        return product(num_layers=[int(n) for n in layers.split('+')])
  '''))
  assert sweeps.load(str(path)) == ([dict(num_layers=2)], TINY)
  assert sweeps.load(f'{path}:3+4')[0] == [dict(num_layers=3), dict(num_layers=4)]
  with pytest.raises(sweeps.SweepError, match='does not exist'):
    sweeps.load(str(tmp_path / 'missing.py'))
  # The call's mistake is the command line's or the signature's, not the framework's.
  with pytest.raises(sweeps.SweepError, match=rf"^{path}'s get_sweep takes an argument, but "
                     rf"--sweep {path} passes none; add :ARGUMENT to --sweep.$"):
    path.write_text('def get_sweep(layers):\n  return []\n')
    sweeps.load(str(path))
  with pytest.raises(sweeps.SweepError, match=rf"^{path}'s get_sweep takes no argument, but "
                     rf"--sweep {path}:3 passes one; drop the :3.$"):
    path.write_text('def get_sweep():\n  return []\n')
    sweeps.load(f'{path}:3')


def test_a_sweep_file_whose_code_fails_is_one_sentence_naming_the_line(tmp_path):
  path = tmp_path / 'x.py'
  path.write_text('from research.sweeps import product\n\ndef get_sweep(layers):\n'
                  '  return product(num_layers=[int(layers)])\n')
  with pytest.raises(sweeps.SweepError) as error:
    sweeps.load(f'{path}:two')
  assert str(error.value) == (f"{path} failed while it ran at {path}, line 4 (ValueError: "
                              "invalid literal for int() with base 10: 'two'); correct the file.")
  # A sweep helper's own error keeps its sentence.
  with pytest.raises(sweeps.SweepError, match=r'seeds\(0\) needs at least one seed'):
    path.write_text('from research.sweeps import seeds\n\ndef get_sweep():\n  return seeds(0)\n')
    sweeps.load(str(path))


def test_appended_records_are_read_back_latest_first(tmp_path):
  sweeps.append_record(str(tmp_path), dict(run='a', status='running'))
  sweeps.append_record(str(tmp_path), dict(run='b', status='failed'))
  sweeps.append_record(str(tmp_path), dict(run='a', status='finished'))
  assert report.load_registry(str(tmp_path)) == {'a': dict(run='a', status='finished'),
                                                'b': dict(run='b', status='failed')}


def test_parallel_points_share_the_gpus_or_the_cpu_cores(monkeypatch):
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
  assert sweep_cli.slots(2) == [({'CUDA_VISIBLE_DEVICES': '0,1'}, None),
                                ({'CUDA_VISIBLE_DEVICES': '2,3'}, None)]
  with pytest.raises(sweeps.SweepError, match='does not divide the 4 GPUs'):
    sweep_cli.slots(3)
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3, 4, 5})
  assert sweep_cli.slots(3) == [({}, {0, 1}), ({}, {2, 3}), ({}, {4, 5})]
  with pytest.raises(sweeps.SweepError, match='exceeds the 6 CPU cores'):
    sweep_cli.slots(7)


def _sweep_file(tmp_path, body):
  path = tmp_path / 'sweep.py'
  path.write_text('from research.sweeps import product, points, seeds, zipped\n'
                  f'CONFIG = {TINY!r}\n' + textwrap.dedent(body))
  return str(path)


def test_dry_runs_print_one_command_per_point(tmp_path):
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 3e-3])
  ''')
  folder = str(tmp_path / 'runs' / 'lr')
  local = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', folder, '--dry_run',
                              '--', '--cpu_devices=1')
  lines = local.stdout.splitlines()
  assert local.returncode == 0 and len(lines) == 2
  assert lines[0].split()[1:5] == ['-m', 'research.train', '--config', TINY]
  assert lines[0].endswith('--config.optim.lr=0.001 --cpu_devices=1')
  slurm = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', folder, '--dry_run',
                              '--launcher', 'slurm', '--launcher_args=--nodes=2')
  first = slurm.stdout.splitlines()[0].split()
  assert first[:3] == ['sbatch', '--nodes=2', os.path.join(sweep_cli.REPO, 'launch',
                                                           'slurm.sbatch')]
  assert first[3] == TINY and first[4].startswith(os.path.abspath(folder) + '/lr=0.001-')
  pod = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', folder, '--dry_run',
                            '--launcher', 'tpu_pod',
                            '--launcher_args=--name s-{i} --zone z --bucket b')
  second = pod.stdout.splitlines()[1].split()
  assert second[1:9] == ['run', '--name', 's-1', '--zone', 'z', '--bucket', 'b', '--config']
  assert second[9:11] == [TINY, '--run'] and second[11].startswith('lr/lr=0.003-')
  assert second[12:] == ['--', '--config.optim.lr=0.003']
  assert not os.path.exists(folder)  # A dry run writes nothing.
  one_slice = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', folder,
                                  '--launcher', 'tpu_pod', '--launcher_args=--name s --bucket b')
  assert one_slice.returncode == 2
  assert one_slice.stderr.startswith('error: A TPU slice trains one run at a time')


def _finish_fake_run(workdir, steps=10):
  """What research.train leaves in a finished workdir, written by hand."""
  os.makedirs(os.path.join(workdir, 'checkpoints', str(steps)))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(dict(train=dict(num_steps=steps, batch_size=4, seq_len=8)), f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps(dict(step=steps, loss=2.0, eval_loss=2.5)) + '\n')


def test_submitted_points_are_recorded_and_found_finished_later(tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n'
                                  'echo "Submitted batch job 42"\n')
  (bin_dir / 'sbatch').chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}:{os.environ["PATH"]}')
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 3e-3])
  ''')
  folder = str(tmp_path / 'sweep')
  args = ('launch.sweep', '--sweep', path, '--workdir', folder, '--launcher', 'slurm')
  assert runs_lib.in_process(*args).returncode == 0
  records = report.load_registry(folder)
  assert [r['status'] for r in records.values()] == ['submitted'] * 2
  assert {r['job'] for r in records.values()} == {'42'}
  assert len((bin_dir / 'calls').read_text().splitlines()) == 2
  # Submitted points are not submitted twice; a point whose workdir finished is recorded so.
  first = next(iter(records.values()))
  _finish_fake_run(first['workdir'])
  again = runs_lib.in_process(*args)
  assert '2 points: 1 finished before, 0 to submit.' in again.stdout
  records = report.load_registry(folder)
  assert records[first['run']]['status'] == 'finished'
  assert records[first['run']]['final'] == dict(loss=2.0, eval_loss=2.5)
  assert records[first['run']]['tokens'] == 10 * 4 * 8
  assert len((bin_dir / 'calls').read_text().splitlines()) == 2
  # --resubmit submits the unfinished point again, with its index in the whole sweep.
  runs_lib.in_process(*args, '--resubmit', '--launcher_args=--job-name=p{i}')
  calls = (bin_dir / 'calls').read_text().splitlines()
  assert len(calls) == 3 and calls[-1].startswith('--job-name=p1 ')
  # A submission the cluster refuses is recorded failed, named, and the sweep exits 1.
  (bin_dir / 'sbatch').write_text('#!/bin/sh\necho "sbatch: error: Invalid account" >&2\n'
                                  'exit 1\n')
  refused = runs_lib.in_process(*args, '--resubmit')
  assert refused.returncode == 1, refused.stderr
  assert refused.stderr.startswith('1 of 1 points were not submitted: ')
  assert 'not submitted (sbatch: error: Invalid account)' in refused.stdout
  records = report.load_registry(folder)
  [unfinished] = [name for name in records if name != first['run']]
  assert records[unfinished]['status'] == 'failed'


@pytest.mark.parametrize('args, sentence', [
    (('--resubmit',), '--resubmit apply to --launcher slurm or tpu_pod, not to local runs'),
    (('--launcher_args=--nodes=2', '--resubmit'),
     '--launcher_args and --resubmit apply to --launcher slurm or tpu_pod, not to local runs'),
    (('--launcher', 'slurm', '--parallel', '2'), '--parallel applies to --launcher local; the '
                                                 'cluster schedules the points --launcher slurm'),
    (('--launcher', 'slurm', "--launcher_args='unbalanced"),
     "--launcher_args \"'unbalanced\" cannot be split as a shell would (No closing quotation); "
     'balance its quotes.'),
])
def test_options_the_launcher_would_ignore_are_one_sentence(tmp_path, args, sentence):
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 3e-3])
  ''')
  result = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', str(tmp_path / 's'),
                               *args)
  runs_lib.assert_error(result, sentence)
  assert not (tmp_path / 's').exists()


def test_a_cluster_launcher_without_its_program_is_one_sentence(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))  # Neither sbatch nor gcloud here.
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 3e-3])
  ''')
  for launcher, program, extra in (('slurm', 'sbatch', ()),
                                   ('tpu_pod', 'gcloud', ('--launcher_args=--name s{i} --zone z '
                                                          '--bucket b',))):
    result = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir',
                                 str(tmp_path / launcher), '--launcher', launcher, *extra)
    runs_lib.assert_error(result, f'--launcher {launcher} submits with {program}, which is not '
                                  "on this machine's PATH")


@pytest.mark.slow
def test_a_sweep_completes_skips_finished_runs_resumes_interrupted_ones_and_records_failures(
    tmp_path):
  # Four 10-step points and one that stops at validation (3 heads do not divide 32 dimensions).
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        small = points({'data.source': 'markov', 'num_steps': 10, 'num_layers': 1, 'emb_dim': 32,
                        'mlp_dim': 64, 'batch_size': 4, 'seq_len': 16, 'eval_every': 5,
                        'eval_batches': 1, 'log_every': 5, 'every_steps': 5,
                        'sample_tokens': 0, 'tensorboard': False})
        return (product(lr=[1e-3, 3e-3]) * seeds(2) + points(dict(lr=1e-3, num_heads=3))) * small
  ''')
  folder = str(tmp_path / 'sweep')
  command = [sys.executable, '-m', 'launch.sweep', '--sweep', path, '--workdir', folder,
             '--parallel', '2', '--', '--cpu_devices=1', '--config.train.progress_bar=False']

  # First invocation: every run stops at step 5 (as if preempted); the bad point fails.
  first = subprocess.run(command + ['--config.train.stop_at_step=5'], cwd=runs_lib.REPO,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 1, first.stderr
  records = report.load_registry(folder)
  assert sorted(r['status'] for r in records.values()) == ['failed'] + ['interrupted'] * 4
  failed = next(r for r in records.values() if r['status'] == 'failed')
  assert failed['error'].startswith('error: ') and 'num_heads' in failed['error']
  assert {r['step'] for r in records.values() if r['status'] == 'interrupted'} == {5}

  # Second: the interrupted runs resume from their checkpoints and finish.
  second = subprocess.run(command, cwd=runs_lib.REPO, capture_output=True, text=True,
                          timeout=600)
  assert second.returncode == 1 and '5 points: 0 finished before, 5 to run.' in second.stdout
  records = report.load_registry(folder)
  done = [r for r in records.values() if r['status'] == 'finished']
  assert len(done) == 4 and {r['step'] for r in done} == {10}
  for record in done:
    with open(os.path.join(record['workdir'], sweep_cli.LOG_NAME)) as f:
      assert 'resumed from step 5' in f.read()
    assert record['tokens'] == 10 * 4 * 16 and record['git']
    assert record['best']['eval_loss'] <= record['final']['eval_loss']
    assert record['wall_s'] > 0 and record['flops'] > 0

  # Third: nothing finished runs again (their logs are untouched); the bad point is retried.
  sizes = {r['run']: os.path.getsize(os.path.join(r['workdir'], sweep_cli.LOG_NAME))
           for r in done}
  third = subprocess.run(command, cwd=runs_lib.REPO, capture_output=True, text=True, timeout=600)
  assert third.returncode == 1 and '5 points: 4 finished before, 1 to run.' in third.stdout
  assert sizes == {r['run']: os.path.getsize(os.path.join(r['workdir'], sweep_cli.LOG_NAME))
                   for r in done}

  # The report's table holds the registry's numbers.
  out = tmp_path / 'report'
  written = runs_lib.command('research.report', folder, '--out', str(out))
  assert written.returncode == 0, written.stderr
  text = (out / 'report.md').read_text()
  for variant in ('lr=0.001', 'lr=0.003'):
    values = [r['final']['eval_loss'] for r in done if r['variant'] == variant]
    cell = report.mean_std(np.mean(values), np.std(values, ddof=1))
    assert f'| {variant} | - | {variant[3:]} | 2 | {cell} |' in text  # No num_heads: '-'.


_DRIVER = '''
import os, sys
from launch import sweep
# Each point: a process that waits for SIGTERM, then says so in its workdir and exits 0, as a
# trainer that saved a checkpoint does.
CHILD = (
    'import os, signal, sys, time\\n'
    'def stop(*_):\\n'
    '  open(os.path.join(sys.argv[1], "stopped"), "w").close()\\n'
    '  sys.exit(0)\\n'
    'signal.signal(signal.SIGTERM, stop)\\n'
    'open(os.path.join(sys.argv[1], "started"), "w").close()\\n'
    'time.sleep(60)\\n')
sweep.train_command = lambda run, workdir, passthrough: [sys.executable, '-c', CHILD, workdir]
sys.exit(sweep.main(sys.argv))
'''


def test_sigterm_to_a_sweep_stops_its_running_points_which_are_recorded_interrupted(tmp_path):
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 2e-3, 3e-3])
  ''')
  folder = tmp_path / 'sweep'
  driver = subprocess.Popen([sys.executable, '-c', _DRIVER, '--sweep', path, '--workdir',
                             str(folder), '--parallel', '2'], cwd=runs_lib.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 60
  while len(list(folder.glob('*/started'))) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
  driver.send_signal(signal.SIGTERM)
  _, err = driver.communicate(timeout=60)
  assert driver.returncode == 143 and 'Stopped on SIGTERM; run the same command to resume.' in err
  # The two running points were asked to stop; the third never started.
  assert len(list(folder.glob('*/stopped'))) == 2 and len(list(folder.glob('*/started'))) == 2
  statuses = sorted(r['status'] for r in report.load_registry(str(folder)).values())
  assert statuses == ['interrupted', 'interrupted']


@pytest.mark.skipif(sys.platform != 'linux', reason='PR_SET_PDEATHSIG is a Linux request')
def test_a_sweep_killed_outright_still_stops_its_running_points(tmp_path):
  """SIGKILL cannot be caught: the points' processes asked Linux for SIGTERM when the sweep dies,
  on which a trainer saves and stops, rather than running on unwatched."""
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 2e-3])
  ''')
  folder = tmp_path / 'sweep'
  driver = subprocess.Popen([sys.executable, '-c', _DRIVER, '--sweep', path, '--workdir',
                             str(folder), '--parallel', '2'], cwd=runs_lib.REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while len(list(folder.glob('*/started'))) < 2 and time.monotonic() < deadline:
    time.sleep(0.1)
  assert len(list(folder.glob('*/started'))) == 2
  driver.kill()
  driver.wait(timeout=60)
  while len(list(folder.glob('*/stopped'))) < 2 and time.monotonic() < deadline + 30:
    time.sleep(0.1)
  assert len(list(folder.glob('*/stopped'))) == 2


def test_keys_that_follow_from_an_earlier_one_are_left_out_of_names():
  sizes = sweeps.zipped(num_layers=[2, 4, 4], emb_dim=[32, 64, 128], mlp_dim=[88, 176, 352])
  runs = sweeps.expand(list(sizes * sweeps.seeds(2)), TINY)
  # emb_dim tells the points apart (num_layers alone does not); mlp_dim follows from emb_dim.
  assert [run.variant for run in runs[::2]] == ['num_layers=2,emb_dim=32',
                                                'num_layers=4,emb_dim=64',
                                                'num_layers=4,emb_dim=128']
  assert runs[1].name.startswith('num_layers=2,emb_dim=32,seed=1-')
  assert runs[1].overrides['model.mlp_dim'] == 88


def test_a_run_keeps_its_folder_when_seeds_are_added_and_is_regrouped(tmp_path):
  one = sweeps.expand(list(sweeps.product(lr=[1e-3, 3e-3])), TINY)
  recorder = sweep_cli.Recorder(str(tmp_path), 'local')
  recorder.record(one[0], 'finished', final=dict(eval_loss=2.0))
  two = sweeps.expand(list(sweeps.product(lr=[1e-3, 3e-3], num_layers=[4])
                           * sweeps.seeds(2)), TINY)
  assert two[0].name != one[0].name  # Now named by its seed too...
  again = sweep_cli.Recorder(str(tmp_path), 'local')
  again.adopt(two)
  assert two[0].name == one[0].name  # ...but the hash finds its folder,
  record = report.load_registry(str(tmp_path))[one[0].name]
  assert record['status'] == 'finished' and record['final'] == dict(eval_loss=2.0)
  assert record['variant'] == two[0].variant == 'lr=0.001'  # and it is grouped as now.


def test_points_with_one_config_are_refused_whatever_their_names():
  with pytest.raises(sweeps.SweepError, match='resolve to the same config'):
    sweeps.expand(list(sweeps.points({'seed': 0}, {})), TINY)  # seed 0 is the default.


def test_config_changes_after_the_separator_are_refused_run_control_is_not(tmp_path):
  path = _sweep_file(tmp_path, '''
      def get_sweep():
        return product(lr=[1e-3, 3e-3])
  ''')
  bad = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', str(tmp_path / 's'),
                            '--dry_run', '--', '--config.train.num_steps=5')
  assert bad.returncode == 2 and bad.stderr.startswith(
      'error: --config.train.num_steps after -- would change what every run trains')
  ok = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', str(tmp_path / 's'),
                           '--dry_run', '--', '--config.train.stop_at_step=5', '--cpu_devices=1')
  assert ok.returncode == 0
  ok = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', str(tmp_path / 's'),
                           '--dry_run', '--', '--cpu_devices', '2')
  assert ok.returncode == 0 and '--cpu_devices 2' in ok.stdout
  for stray in ('--bogus', '--workdir=elsewhere', 'lr=1'):
    bad = runs_lib.in_process('launch.sweep', '--sweep', path, '--workdir', str(tmp_path / 's'),
                              '--dry_run', '--', stray)
    runs_lib.assert_error(bad, f'{stray} after -- is not a run-control setting of research.train')
  usage = runs_lib.in_process('launch.sweep', '--sweep', path, '--parallel', 'two')
  assert usage.returncode == 2 and usage.stderr.count('\n') == 1
  assert usage.stderr.startswith("error: Argument --parallel: invalid int value: 'two'; usage:")


def test_the_error_line_is_the_last_attempts(tmp_path):
  log = tmp_path / 'sweep.log'
  log.write_text('$ python -m research.train ...\nerror: an old problem.\n'
                 '$ python -m research.train ...\nTraceback (most recent call last):\n'
                 '  File "x.py", line 1\nMemoryError\n')
  assert sweep_cli.error_line(str(log)) == 'MemoryError'


def test_a_torn_registry_line_is_dropped_by_the_next_append(tmp_path):
  sweeps.append_record(str(tmp_path), dict(run='a', status='finished'))
  with open(tmp_path / 'registry.jsonl', 'a') as f:
    f.write('{"run": "b", "sta')  # A writer killed mid-line.
  sweeps.append_record(str(tmp_path), dict(run='c', status='running'))
  assert report.load_registry(str(tmp_path)) == {'a': dict(run='a', status='finished'),
                                                 'c': dict(run='c', status='running')}


def test_a_point_s_command_runs_on_its_cores_only():
  cores = sorted(os.sched_getaffinity(0))
  show = [sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))']
  for given, expected in ((set(cores[:1]), cores[:1]), (None, cores)):
    command = sweep_cli.point_command(show, given)
    assert subprocess.run(command, capture_output=True, text=True).stdout.strip() == str(expected)
