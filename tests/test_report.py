"""Sweep and run reports: the table's numbers are the registry's, best first; the plots are real
PNGs; the latest registry line and the last line of a step win; bad inputs are one sentence."""

import json
import math
import os
import statistics
import warnings

import numpy as np
import pytest
from matplotlib import image

import runs
from research import report

LRS = (1e-3, 1e-2, 1e-1)
LAYERS = (1, 2)


def _final(lr, layers, seed):
  """Made-up final metrics of a run: distinct per variant and seed."""
  eval_loss = 3.0 + 0.1 * (math.log10(lr) + 2.3) ** 2 - 0.2 * layers + 0.013 * seed
  return dict(loss=eval_loss - 0.05, eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss),
              eval_accuracy=0.5 - 0.03 * eval_loss + 0.001 * seed, tokens_per_s=1e4)


def _curve_lines(final, steps=30, eval_every=10):
  """metrics.jsonl lines ending at `final`, with steps 11..20 logged twice (a resumed run) and
  the first copies off by +10, so a reader that keeps the first copy is caught."""
  lines = []
  for step in list(range(1, 21)) + list(range(11, steps + 1)):
    resumed_copy = len(lines) >= 20
    line = dict(step=step, loss=final['loss'] + 1.0 / step + (0 if resumed_copy or step <= 10
                                                                    else 10.0),
                tokens_per_s=1e4)
    if step % eval_every == 0:
      line.update(eval_loss=final['eval_loss'] + 1.0 / step,
                  **{k: v for k, v in final.items() if k == 'eval_accuracy'})
    lines.append(line)
  evals = {k: v for k, v in final.items() if k in ('eval_loss', 'eval_accuracy')}
  lines.append(dict(step=steps, loss=final['loss'], grad_norm=None, **evals))
  return lines


def _record(sweep, run, variant, overrides, seed, status, final=None, error=None):
  return dict(run=run, workdir=str(sweep / run), config='configs/decoder.py:tiny',
              overrides=dict(overrides, seed=seed), variant=variant, seed=seed, status=status,
              error=error, step=30 if status == 'finished' else 12, num_steps=30, tokens=30 * 256,
              wall_s=12.5 + seed, flops=1e12 * overrides.get('model.num_layers', 1),
              final=final or {}, best={}, git='abc123', updated='2026-12-02T00:00:00')


def make_sweep(root, name='sweep', lrs=LRS, layers=LAYERS, seeds=(0, 1, 2), final=_final):
  """A sweep directory as the sweep runner writes it: lr x layers variants, every seed finished
  (but one variant with a single seed), a superseded earlier line per run, one failed run."""
  sweep = root / name
  sweep.mkdir(parents=True)
  lines = []
  for lr in lrs:
    for n in layers:
      variant = f'lr{lr:g}_l{n}'
      overrides = {'optim.lr': lr, 'model.num_layers': n, 'train.num_steps': 30}
      for seed in (seeds[:1] if (lr, n) == (lrs[0], layers[0]) else seeds):
        run = f'{variant}_s{seed}'
        workdir = sweep / run
        workdir.mkdir()
        metrics = final(lr, n, seed)
        (workdir / 'metrics.jsonl').write_text(
            ''.join(json.dumps(line) + '\n' for line in _curve_lines(metrics)))
        (workdir / 'config.json').write_text(json.dumps({'optim': {'lr': lr}, 'seed': seed}))
        # An earlier line with other numbers, then the current one.
        lines.append(_record(sweep, run, variant, overrides, seed, 'running',
                             {k: v + 5 for k, v in metrics.items()}))
        lines.append(_record(sweep, run, variant, overrides, seed, 'finished', metrics))
  failed = {'optim.lr': 1.0, 'model.num_layers': 1, 'train.num_steps': 30}
  lines.append(_record(sweep, 'lr1_l1_s0', 'lr1_l1', failed, 0, 'running'))
  lines.append(_record(sweep, 'lr1_l1_s0', 'lr1_l1', failed, 0, 'failed',
                       error='FloatingPointError: loss=nan at step 12'))
  (sweep / 'registry.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  return sweep


def tables(markdown):
  """Every Markdown table of a report, as lists of {header: cell}."""
  found, current = [], None
  for line in markdown.splitlines() + ['']:
    if line.startswith('|'):
      cells = [c.strip() for c in line.strip()[1:-1].split(' | ')]
      if current is None:
        current = dict(header=cells, rows=[])
      elif not set(line) <= set('|-'):
        current['rows'].append(dict(zip(current['header'], cells)))
    elif current is not None:
      found.append(current['rows'])
      current = None
  return found


def _expected(sweep, metric):
  """{variant: (n, mean, std or None)} computed here from the registry's last lines."""
  last = {}
  for line in (sweep / 'registry.jsonl').read_text().splitlines():
    record = json.loads(line)
    last[record['run']] = record
  values = {}
  for record in last.values():
    if record['status'] == 'finished':
      values.setdefault(record['variant'], []).append(record['final'][metric])
  return {v: (len(x), statistics.mean(x), statistics.stdev(x) if len(x) > 1 else None)
          for v, x in values.items()}


def _close(cell, value):
  return math.isclose(float(cell), value, rel_tol=1e-4)


def _check_png(path):
  assert path.stat().st_size > 0
  pixels = image.imread(str(path))  # Reads PNGs only: a wrong format fails here.
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert pixels.shape[2] in (3, 4)
  assert np.ptp(pixels[..., :3]) > 0  # Something was drawn.


@pytest.mark.parametrize('metric, mode', [('eval_loss', 'min'), ('eval_accuracy', 'max')])
def test_the_table_holds_the_registry_numbers_best_first(tmp_path, metric, mode):
  sweep = make_sweep(tmp_path)
  path = report.report([str(sweep)], metric)
  results, others = tables(open(path).read())
  expected = _expected(sweep, metric)
  assert {row['variant'] for row in results} == set(expected) and len(expected) == 6
  means = []
  for row in results:
    n, mean, std = expected[row['variant']]
    shown_mean, shown_std = row[f'{metric} (mean ± std)'].split(' ± ')
    assert int(row['n']) == n and _close(shown_mean, mean)
    assert shown_std == '-' if std is None else _close(shown_std, std)
    lr, layers = (float(x) for x in row['variant'][2:].split('_l'))
    assert float(row['optim.lr']) == lr and int(row['model.num_layers']) == layers
    means.append(mean)
  assert means == sorted(means, reverse=mode == 'max') and len(set(means)) == len(means)
  # The swept axes only: train.num_steps never varies, seed is no axis.
  assert 'train.num_steps' not in results[0] and 'seed' not in results[0]
  assert int(results[0]['tokens'].replace(',', '')) == 30 * 256
  assert [row['run'] for row in others] == ['lr1_l1_s0']
  assert others[0]['status'] == 'failed' and 'loss=nan at step 12' in others[0]['error']


def test_pngs_are_written_one_per_swept_axis_and_embedded(tmp_path):
  sweep = make_sweep(tmp_path)
  out = tmp_path / 'out'
  text = open(report.report([str(sweep)], out=str(out))).read()
  pngs = sorted(p.name for p in out.glob('*.png'))
  assert pngs == ['curves.png', 'vs_model.num_layers.png', 'vs_optim.lr.png']
  for name in pngs:
    _check_png(out / name)
    assert f']({name})' in text  # Relative links.


def test_last_line_of_a_step_and_latest_registry_line_win(tmp_path):
  sweep = make_sweep(tmp_path)
  curves = report.load_curves(sweep / 'lr0.01_l2_s1')
  steps, losses = curves['loss']
  assert steps.tolist() == list(range(1, 31))
  final = _final(1e-2, 2, 1)
  # Steps 11..20 hold their resumed (second) values, not the first copies' +10.
  np.testing.assert_allclose(losses[10:20], [final['loss'] + 1.0 / s for s in range(11, 21)])
  assert losses[-1] == final['loss']  # Step 30 logged twice: the later line.
  assert curves['eval_loss'][0].tolist() == [10, 20, 30]
  assert 'grad_norm' not in curves  # Logged only as null.
  records = report.load_registry(str(sweep))
  assert len(records) == 6 * 3 - 2 + 1
  assert records['lr0.01_l2_s1']['status'] == 'finished'
  assert records['lr0.01_l2_s1']['final'] == final
  assert records['lr1_l1_s0']['status'] == 'failed'


def test_one_run_report(tmp_path):
  sweep = make_sweep(tmp_path)
  workdir = sweep / 'lr0.1_l2_s0'
  path = report.report([str(workdir)])
  assert path == str(workdir / 'report' / 'report.md')
  (metrics,) = tables(open(path).read())
  by_name = {row['metric']: row for row in metrics}
  final = _final(1e-1, 2, 0)
  assert _close(by_name['eval_loss']['last'], final['eval_loss'])
  assert by_name['eval_loss']['best'] == f'{final["eval_loss"]:.5g} (step 30)'
  assert by_name['tokens_per_s']['best'] == '-'  # No known direction.
  _check_png(workdir / 'report' / 'curves.png')


def test_two_sweeps_side_by_side(tmp_path):
  a = make_sweep(tmp_path, 'base')
  b = make_sweep(tmp_path, 'wider', lrs=(1e-2, 1e-1),
                 final=lambda lr, n, seed: _final(lr, n, seed + 3))
  path = report.report([str(a), str(b)], out=str(tmp_path / 'both'))
  text = open(path).read()
  assert '## base' in text and '## wider' in text
  results = tables(text)
  assert len(results) == 4  # A results table and a failed-runs table per sweep.
  expected = _expected(b, 'eval_loss')
  assert {row['variant'] for row in results[2]} == set(expected) and len(expected) == 4
  for row in results[2]:
    assert _close(row['eval_loss (mean ± std)'].split(' ± ')[0], expected[row['variant']][1])
  for name in ('curves.png', 'vs_optim.lr.png', 'vs_model.num_layers.png'):
    _check_png(tmp_path / 'both' / name)
  # By default beside the first sweep's own report, which it leaves alone.
  own = report.report([str(a)])
  assert report.report([str(a), str(b)]) == str(a / 'report_vs_wider' / 'report.md')
  assert open(own).read().startswith('# ') and '## wider' not in open(own).read()


def test_power_law_fit_recovers_exact_data():
  x = np.asarray([1e6, 3e6, 1e7, 1e8])
  a, b = report.power_law_fit(x, 4.2 * x ** -0.076)
  assert math.isclose(a, 4.2, rel_tol=1e-9) and math.isclose(b, -0.076, rel_tol=1e-9)
  with pytest.raises(ValueError, match='positive'):
    report.power_law_fit([1, 2], [1, -1])


def test_the_report_fits_a_power_law_on_an_axis(tmp_path):
  # eval_loss = 7 * layers^-0.25 per lr: the fitted exponent of each line is -0.25.
  def final(lr, n, seed):
    return dict(loss=1.0, eval_loss=7 * n ** -0.25 * (1 + lr))
  sweep = make_sweep(tmp_path, layers=(1, 4, 16), lrs=(1e-2, 1e-1), seeds=(0, 1), final=final)
  text = open(report.report([str(sweep)], fit_axis='model.num_layers')).read()
  fits = tables(text)[-1]
  assert [row['line'] for row in fits] == ['optim.lr=0.01', 'optim.lr=0.1']
  for row, lr in zip(fits, (1e-2, 1e-1)):
    assert _close(row['b (exponent)'], -0.25) and _close(row['a'], 7 * (1 + lr))
  _check_png(sweep / 'report' / 'vs_model.num_layers.png')


def test_direction_by_name():
  assert [report.direction(n) for n in ('eval_loss', 'mlm_loss', 'eval_perplexity',
                                        'bits_per_byte', 'eval_kl', 'hidden_mse')] == ['min'] * 6
  assert [report.direction(n) for n in ('eval_accuracy', 'sequence_accuracy', 'f1',
                                        'eval_exact_match', 'matthews')] == ['max'] * 5
  assert report.direction('tokens_per_s') is None and report.direction('grad_norm') is None


def test_bad_inputs_are_one_sentence(tmp_path):
  sweep = make_sweep(tmp_path)
  empty = tmp_path / 'empty'
  empty.mkdir()
  runs.assert_error(runs.command('research.report', str(empty)), 'holds neither registry.jsonl')
  line = runs.error_line(runs.in_process('research.report', str(sweep), '--metric', 'eval_los'))
  assert 'eval_accuracy, eval_loss, eval_perplexity, loss, tokens_per_s' in line
  runs.assert_error(runs.in_process('research.report', str(sweep), '--metric', 'tokens_per_s'),
                    'pass --mode min or --mode max')
  runs.assert_error(runs.in_process('research.report', str(sweep), '--fit_power_law', 'seed'),
                    'not a swept axis; pass one of: model.num_layers, optim.lr')
  runs.assert_error(runs.in_process('research.report', str(sweep), '--mode', 'best'),
                    "invalid choice: 'best'")
  runs.assert_error(runs.in_process('research.report', str(sweep), str(sweep / 'lr0.1_l2_s0')),
                    'pass two sweep directories')
  # With --mode, a metric of unknown direction ranks as told.
  runs.ok(runs.in_process('research.report', str(sweep), '--metric', 'tokens_per_s', '--mode',
                          'max'))


def test_a_recorded_size_is_fitted_across_zipped_axes_as_one_line(tmp_path):
  # Four zipped sizes with repeated depths (as configs/sweeps/scaling.py): the fit on the
  # recorded non-embedding parameter count is one line through all four.
  sweep = tmp_path / 'scaling'
  sweep.mkdir()
  lines = []
  for layers, width, params in ((2, 48, 5e4), (4, 64, 2e5), (4, 128, 8e5), (8, 192, 3.2e6)):
    variant = f'num_layers={layers},emb_dim={width}'
    record = _record(sweep, variant, variant, {'model.num_layers': layers,
                                               'model.emb_dim': width}, 0, 'finished',
                     dict(loss=1.0, eval_loss=9 * params ** -0.1))
    lines.append(dict(record, params=params + 3e4, non_embedding_params=params, group=variant))
  (sweep / 'registry.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  text = open(report.report([str(sweep)], fit_axis='non_embedding_params')).read()
  (fit,) = tables(text)[-1]
  assert _close(fit['b (exponent)'], -0.1) and _close(fit['a'], 9)
  # emb_dim tells the sizes apart and determines the depth: one plot of it, one of the size
  # (and no curves: these runs have no metrics.jsonl).
  assert sorted(p.name for p in (sweep / 'report').glob('*.png')) == [
      'vs_model.emb_dim.png', 'vs_non_embedding_params.png']
  header = text.split('\n| variant')[1].split('\n')[0]
  assert header.count('non_embedding_params') == 1


def test_seeds_of_different_configs_are_not_averaged_together(tmp_path):
  # Two runs with one variant label but different configs (a default changed in between).
  sweep = tmp_path / 'sweep'
  sweep.mkdir()
  lines = [dict(_record(sweep, f'lr=0.001-{group}', 'lr=0.001', {'optim.lr': 1e-3}, 0,
                        'finished', dict(loss=1.0, eval_loss=loss)), group=group)
           for group, loss in (('aaaaaa', 2.0), ('bbbbbb', 3.0))]
  (sweep / 'registry.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  rows = report.summarize(report.load_registry(str(sweep)), 'eval_loss')
  assert [(row['variant'], row['n'], row['mean']) for row in rows] == [
      ('lr=0.001 [config aaaaaa]', 1, 2.0), ('lr=0.001 [config bbbbbb]', 1, 3.0)]


def test_a_counted_run_with_only_a_final_evaluation_reports_without_warnings(tmp_path):
  workdir = tmp_path / 'kn3'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(dict(variant='kn3', model=dict(
      family='ngram', order=3))))
  (workdir / 'metrics.jsonl').write_text(json.dumps(dict(step=30, eval_loss=1.9,
                                                         eval_bits_per_byte=2.7)) + '\n')
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # A legend over no lines warns: there is no train loss.
    path = report.report([str(workdir)])
  assert os.path.exists(path)
  _check_png(workdir / 'report' / 'curves.png')


def test_a_misspelt_alternative_metric_is_one_sentence(tmp_path):
  sweep = make_sweep(tmp_path)
  runs.assert_error(
      runs.in_process('research.report', str(sweep), '--metric', 'eval_acuracy,eval_loss'),
      'No finished run logged eval_acuracy (of --metric eval_acuracy,eval_loss); correct or drop '
      'it: the runs logged eval_accuracy, eval_loss,')
  # An alternative that some run of the sweeps logged is taken where a run has it.
  other = make_sweep(tmp_path, 'other', final=lambda lr, n, seed: {
      k: v for k, v in _final(lr, n, seed).items() if k != 'eval_accuracy'})
  for lines in ([], ['--metric', 'eval_accuracy,eval_loss']):
    runs.ok(runs.in_process('research.report', str(sweep), str(other), '--out',
                            str(tmp_path / f'out{len(lines)}'), *lines))


def _unfinished_sweep(root):
  """A sweep of one failed run and one still running, neither finished."""
  sweep = root / 'unfinished'
  sweep.mkdir(parents=True)
  lines = [_record(sweep, 'lr1_s0', 'lr1', {'optim.lr': 1.0}, 0, 'failed',
                   error='FloatingPointError: loss=nan at step 12'),
           _record(sweep, 'lr0.1_s0', 'lr0.1', {'optim.lr': 0.1}, 0, 'running')]
  (sweep / 'registry.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines))
  return sweep


def test_a_sweep_with_no_finished_run_reports_every_run_status(tmp_path):
  sweep = _unfinished_sweep(tmp_path)
  out = tmp_path / 'out'
  text = open(report.report([str(sweep)], out=str(out))).read()
  assert '2 runs, 0 finished' in text and 'No run has finished yet.' in text
  (others,) = tables(text)
  assert {row['run']: (row['status'], row['step'], row['error']) for row in others} == {
      'lr1_s0': ('failed', '12/30', 'FloatingPointError: loss=nan at step 12'),
      'lr0.1_s0': ('running', '12/30', '')}
  assert not list(out.glob('*.png'))  # Nothing to plot yet.
  runs.assert_error(runs.in_process('research.report', str(sweep), '--fit_power_law',
                                    'optim.lr'), 'No run has finished yet, so there is nothing')
