"""Markdown reports and plots of a sweep, of one run, or of two sweeps side by side.

  python -m research.report SWEEP [--metric eval_loss] [--mode min|max] [--out DIR] \
      [--fit_power_law AXIS]
  python -m research.report RUN_WORKDIR          (one run: its final and best metrics, its curves)
  python -m research.report SWEEP_A SWEEP_B      (two tables; plots with both sweeps overlaid)

A sweep directory holds registry.jsonl (one JSON record per line; a run's last line is its current
record) and one workdir per run, each with metrics.jsonl (a step logged twice, after a resume,
keeps its last line). The report goes to DIR/report.md (DIR defaults to PATH/report, and to
SWEEP_A/report_vs_B for two sweeps, where B is SWEEP_B's folder name) with PNGs
beside it: curves.png (train loss and the chosen metric against step, mean over seeds with a
min..max band) and, for each swept axis (an override key, seed excepted, whose value differs
between variants; one that an earlier axis determines, as zipped axes do, is not plotted again),
vs_<axis>.png (the metric's mean with std error bars against that value, one line per
combination of the other axes that it does not determine). --fit_power_law takes a swept axis or
a number the registry records of every run (RECORD_AXES: parameters, tokens, FLOPs).

The table has one row per variant (the runs of one config but for the seed), best first; its
numbers are the registry's `final` values (mean and std over the finished seeds, std with
ddof=1; a single seed shows `± -`, since its spread is unknown, not zero). Runs that failed, have
not finished, or lack the metric are listed in a second table (before any run has finished, the
only one). matplotlib is imported only when plotting, so that importing this module stays light.
"""

import json
import math
import os
import re
import sys

import numpy as np

from research import cli

REGISTRY = 'registry.jsonl'
METRICS = 'metrics.jsonl'
REPORT_DIR = 'report'
# Numbers the registry records of every run, which a plot or a fit may use as its x axis.
RECORD_AXES = ('params', 'non_embedding_params', 'tokens', 'flops')

# Name endings (after any eval_ prefix) of metrics whose direction is known: `mlm_loss`,
# `hidden_mse` and `sequence_accuracy` follow their last word.
_LOWER_IS_BETTER = ('loss', 'perplexity', 'bits_per_byte', 'kl', 'mse', 'cross_entropy', 'error',
                    'error_rate')
_HIGHER_IS_BETTER = ('accuracy', 'exact_match', 'f1', 'matthews', 'matthews_corr', 'bleu',
                     'rouge', 'auc', 'recall', 'precision')


def direction(name):
  """'min' or 'max' for a metric whose better direction is known by its name, else None."""
  base = name[len('eval_'):] if name.startswith('eval_') else name
  for suffixes, mode in ((_LOWER_IS_BETTER, 'min'), (_HIGHER_IS_BETTER, 'max')):
    if any(base == s or base.endswith('_' + s) for s in suffixes):
      return mode
  return None


def _finite(value):
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _read_jsonl(path):
  """The parsed lines of a JSONL file; a torn last line (a writer mid-append) is left out."""
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):  # No newline yet: still being written.
        continue
      raise ValueError(f'{path} line {number} is not JSON; fix or remove that line.') from None
  return records


def load_registry(path):
  """{run: record} of a sweep directory (or its registry.jsonl): each run's last line."""
  if os.path.isdir(path):
    path = os.path.join(path, REGISTRY)
  records = {}
  for record in _read_jsonl(path):
    if not isinstance(record, dict) or 'run' not in record:
      raise ValueError(f'{path} holds a line without a "run" field; every line must be a run '
                       'record.')
    records.pop(record['run'], None)  # Keep the order of the latest updates.
    records[record['run']] = record
  return records


def metric_lines(workdir):
  """{step: {metric: value}} of a run's metrics.jsonl by increasing step ({} before its first
  log): a step logged again after a resume keeps its last line; null (not finite) values are
  left out."""
  path = os.path.join(workdir, METRICS)
  if not os.path.exists(path):
    return {}
  by_step = {}
  for line in _read_jsonl(path):
    if isinstance(line, dict) and _finite(line.get('step')):
      by_step[int(line['step'])] = {name: value for name, value in line.items()
                                    if name != 'step' and _finite(value)}
  return dict(sorted(by_step.items()))


def load_curves(workdir):
  """{metric: (steps, values)} of a run's metrics.jsonl (see metric_lines)."""
  series = {}
  for step, line in metric_lines(workdir).items():
    for name, value in line.items():
      series.setdefault(name, ([], []))
      series[name][0].append(step)
      series[name][1].append(float(value))
  return {name: (np.asarray(steps), np.asarray(values))
          for name, (steps, values) in series.items()}


def _variant(record):
  return record.get('variant') or record['run']


def _key(value):
  """A hashable, comparable stand-in for an override value (lists and dicts included)."""
  return json.dumps(value, sort_keys=True)


def swept_axes(records):
  """The override keys, seed excepted, whose values differ between the variants, sorted."""
  by_variant = {}
  for record in records.values():
    by_variant.setdefault(_variant(record), record.get('overrides') or {})
  keys = sorted({k for overrides in by_variant.values() for k in overrides} - {'seed'})
  return [k for k in keys if len({_key(o.get(k)) for o in by_variant.values()}) > 1]


def metrics_present(records):
  """The metrics with a finite final value in at least one finished run, sorted."""
  return sorted({name for r in records.values() if r.get('status') == 'finished'
                 for name, value in (r.get('final') or {}).items() if _finite(value)})


def pick(values, metric):
  """The value of `metric` in `values` (a dict by metric name): with alternatives `a,b`, the
  first one present, for families whose objectives name one measure differently (a classifier's
  eval_accuracy, an encoder-decoder's eval_sequence_accuracy); None when none is."""
  for name in metric.split(','):
    if name in values and values[name] is not None:
      return values[name]
  return None


def _mode(metric, mode):
  if mode in ('min', 'max'):
    return mode
  if mode is not None:
    raise ValueError(f'--mode={mode} is not min or max; pass one of those.')
  found = direction(metric.split(',')[0])
  if found is None:
    raise ValueError(f'Whether a higher or a lower {metric} is better is unknown; pass --mode min '
                     'or --mode max.')
  return found


def _mean(values):
  return float(np.mean(values)) if values else None


def summarize(records, metric, mode=None):
  """One row per variant with finished runs that logged `metric`, best first: a dict with the
  variant, its overrides (seed left out), runs, seeds, n, the metric's values, mean and std over
  seeds (ddof=1; None for one seed), and the mean final `loss`, tokens, wall_s and flops."""
  mode = _mode(metric, mode)
  groups = {}
  for record in records.values():
    value = pick(record.get('final') or {}, metric)
    if record.get('status') == 'finished' and _finite(value):
      # Seeds of one config: the same variant label and the same hash of the config but for
      # its seed (runs from before a config default changed form another row).
      groups.setdefault((_variant(record), record.get('group')), []).append(record)
  labels = [variant for variant, _ in groups]
  rows = []
  for (variant, config_hash), group in groups.items():
    if labels.count(variant) > 1:
      variant = f'{variant} [config {config_hash}]'
    group.sort(key=lambda r: (r.get('seed') is None, r.get('seed') or 0, r['run']))
    values = [float(pick(r['final'], metric)) for r in group]
    field = lambda name: [float(r[name]) for r in group if _finite(r.get(name))]
    overrides = dict(group[0].get('overrides') or {})
    overrides.pop('seed', None)
    rows.append(dict(
        variant=variant, overrides=overrides, runs=[r['run'] for r in group],
        seeds=[r.get('seed') for r in group], n=len(values), values=values,
        mean=float(np.mean(values)),
        std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
        loss=_mean([float(r['final']['loss']) for r in group
                    if _finite((r.get('final') or {}).get('loss'))]),
        **{name: _mean(field(name)) for name in RECORD_AXES + ('wall_s',)}))
  sign = 1 if mode == 'min' else -1
  rows.sort(key=lambda row: (sign * row['mean'], row['variant']))
  return rows


def power_law_fit(x, y):
  """(a, b) of y = a * x**b, by least squares on log y against log x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.size < 2 or np.any(x <= 0) or np.any(y <= 0):
    raise ValueError('A power-law fit needs at least two points with positive x and y.')
  if np.unique(x).size < 2:
    raise ValueError('A power-law fit needs at least two distinct x values.')
  b, log_a = np.polyfit(np.log(x), np.log(y), 1)
  return float(np.exp(log_a)), float(b)


# Markdown and number formatting.

def _number(value, digits=5):
  return '-' if value is None else f'{value:.{digits}g}'


def mean_std(mean, std):
  """A table's `mean ± std` cell (std None: a single seed, `± -`)."""
  return f'{_number(mean)} ± {"-" if std is None else _number(std)}'


def _value(value):
  """An override value as a table cell."""
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:g}'
  if value == '':
    return "''"
  if isinstance(value, str):  # A path is named by its last part, as run names do.
    return os.path.basename(value.rstrip(os.sep)) if os.sep in value else value
  return json.dumps(value)


def _cell(text):
  return str(text).replace('\n', ' ').replace('|', '\\|')


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
  return lines


def _results_table(rows, axes, metric):
  axes = _independent(rows, axes)
  extra = [('loss', 'loss')] if metric != 'loss' else []
  extra += [('tokens', 'tokens'), ('wall_s', 'wall_s')]
  extra += [(name, name) for name in ('flops', 'params', 'non_embedding_params')
            if name not in axes and any(row[name] is not None for row in rows)]
  header = ['variant'] + axes + ['n', f'{metric} (mean ± std)'] + [name for name, _ in extra]
  body = []
  for row in rows:
    cells = [row['variant']] + [f'{row[axis]:,.0f}' if axis in RECORD_AXES and row[axis]
                                else _value(row['overrides'].get(axis)) for axis in axes]
    cells += [row['n'], mean_std(row['mean'], row['std'])]
    for _, key in extra:
      value = row[key]
      cells.append('-' if value is None else f'{value:,.0f}' if key in ('tokens', 'params',
                                                                        'non_embedding_params')
                   else _number(value, 4))
    body.append(cells)
  return _table(header, body)


def _others_table(records, rows, metric):
  """Runs outside the results: failed, unfinished, or finished without the metric."""
  listed = {run for row in rows for run in row['runs']}
  body = []
  for run in sorted(set(records) - listed):
    record = records[run]
    status = record.get('status', '?')
    note = record.get('error') or ''
    if status == 'finished':
      note = note or f'no {metric} in its final metrics'
    step, last = (_value(record.get(key)) for key in ('step', 'num_steps'))
    body.append([run, status, f'{step}/{last}', note])
  return _table(['run', 'status', 'step', 'error'], body) if body else []


# Plots (matplotlib's object API on the Agg canvas: no pyplot state, no display needed).

def _figure(panels):
  from matplotlib.figure import Figure
  figure = Figure(figsize=(6.4 * panels, 4.4), layout='constrained')
  return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _save(figure, path):
  figure.savefig(path, dpi=100)
  return os.path.basename(path)


def _mean_curve(curves):
  """(steps, mean, low, high) over seeds, at every step any seed logged."""
  steps = np.unique(np.concatenate([s for s, _ in curves]))
  table = np.full((len(curves), len(steps)), np.nan)
  for i, (s, v) in enumerate(curves):
    table[i, np.searchsorted(steps, s)] = v
  return steps, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def _run_curves(sweep, record):
  """The curves of a sweep's run: its recorded workdir, else the folder of its name (a sweep
  copied elsewhere); None without metrics."""
  for workdir in (record.get('workdir'), os.path.join(sweep, record['run'])):
    if workdir and os.path.isfile(os.path.join(workdir, METRICS)):
      return load_curves(workdir)
  return None


def _colors(labels):
  from matplotlib import colormaps
  palette = colormaps['tab10' if len(labels) <= 10 else 'tab20'].colors
  return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def plot_curves(path, series, metric):
  """curves.png: train loss (and `metric` when it is another) against step. `series` is a list of
  (label, color key, linestyle, [curves of each seed]); each line is the mean over seeds with a
  min..max band. Lines of the same key share a color (a variant in both of two sweeps)."""
  names = ['loss'] + ([metric] if metric != 'loss' else [])
  figure, axes = _figure(len(names))
  colors = _colors(list(dict.fromkeys(key for _, key, _, _ in series)))
  for ax, name in zip(axes, names):
    for label, key, style, seeds in series:
      curves = [pick(c, name) for c in seeds if pick(c, name) is not None]
      if not curves:
        continue
      steps, mean, low, high = _mean_curve(curves)
      color = colors[key]
      ax.plot(steps, mean, style, color=color, label=label, linewidth=1.2,
              marker='o' if len(steps) < 3 else None)
      if len(curves) > 1:
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.set_title(f'{name} (mean over seeds, min..max band)', fontsize=9)
    ax.grid(alpha=0.3)
  # The first panel with lines holds the legend (a counted run has no train loss curve).
  labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
  if labelled:
    labelled[0].legend(fontsize=7)
  return _save(figure, path)


def _numeric(values):
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _file_name(axis):
  return 'vs_' + re.sub(r'[^A-Za-z0-9._-]', '_', axis) + '.png'


def _determines(rows, axis, other):
  """Whether the value of `axis` fixes that of `other` across `rows`."""
  pairs = {(_key(row['overrides'].get(axis)), _key(row['overrides'].get(other))) for row in rows}
  return len(pairs) == len({a for a, _ in pairs})


def _independent(rows, axes, keep=None):
  """The axes that no earlier one of them determines (zipped axes show once), and `keep`."""
  chosen = []
  for axis in axes:
    if axis == keep or not any(_determines(rows, a, axis) for a in chosen):
      chosen.append(axis)
  return chosen


def plot_axis(path, axis, sweeps, metric, fit=False):
  """vs_<axis>.png: `metric` against `axis`, one line per combination of the other axes of each
  (name, rows, axes) sweep; with `fit`, log-log axes and a power-law fit per line. Returns the
  file name (None when no row sets the axis) and [(line label, a, b)] of the fits."""
  lines = []
  for name, rows, axes in sweeps:
    # Axes this one determines (zipped with it, or a recorded size) draw no lines of their own.
    others = [a for a in axes if a != axis and not _determines(rows, axis, a)]
    groups = {}
    for row in rows:
      if axis in row['overrides'] and row['overrides'][axis] is not None:
        label = ', '.join(f'{a}={_value(row["overrides"].get(a))}' for a in others) or metric
        groups.setdefault(f'{name}: {label}' if name else label, []).append(row)
    lines += list(groups.items())
  values = [row['overrides'][axis] for _, group in lines for row in group]
  if not values:  # The axis varies through runs outside the table only.
    return None, []
  numeric = _numeric(values)
  if numeric:
    position = float
  else:  # Categories in a stable order, each at an integer position.
    order = sorted({_key(v) for v in values})
    position = lambda v: order.index(_key(v))
  figure, (ax,) = _figure(1)
  colors = _colors([label for label, _ in lines])
  fits = []
  for label, group in lines:
    group = sorted(group, key=lambda row: position(row['overrides'][axis]))
    x = np.asarray([position(row['overrides'][axis]) for row in group])
    y = np.asarray([row['mean'] for row in group])
    err = np.asarray([row['std'] or 0.0 for row in group])
    # Categories have no order between them: points without joining lines.
    ax.errorbar(x, y, yerr=err, color=colors[label], label=label, marker='o', capsize=3,
                linewidth=1.2, linestyle='-' if numeric else 'none')
    if fit:
      if np.unique(x).size < 2:
        raise ValueError(f'The line {label!r} has one {axis} value, so no power law fits it; '
                         'fit an axis that varies within each line.')
      a, b = power_law_fit(x, y)
      grid = np.geomspace(x.min(), x.max(), 50)
      ax.plot(grid, a * grid ** b, '--', color=colors[label], linewidth=1,
              label=f'fit {a:.3g}·x^{b:.3g}')
      fits.append((label, a, b))
  if fit:
    from matplotlib.ticker import LogFormatter
    ax.set_xscale('log')
    ax.set_yscale('log')
    # Plain numbers, not 2.6 x 10^0: a metric often spans less than a decade.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter())
  elif numeric and min(values) > 0 and max(values) >= 10 * min(values):
    ax.set_xscale('log')
  if not numeric:
    ax.set_xticks(range(len(order)), [_value(json.loads(k)) for k in order], rotation=20,
                  ha='right', fontsize=7)
  ax.set_xlabel(axis)
  ax.set_ylabel(f'{metric} (mean ± std over seeds)')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  return _save(figure, path), fits


# Reports.

class _Sweep:
  """A sweep directory read once: its records, the metrics its finished runs logged, its swept
  axes, and (once `rank` has run) its table's rows."""

  def __init__(self, path, name=''):
    self.path, self.name = path, name
    self.records = load_registry(path)
    if not self.records:
      raise ValueError(f'{os.path.join(path, REGISTRY)} holds no runs yet; report it once a run '
                       'has been registered.')
    self.present = metrics_present(self.records)
    self.axes = swept_axes(self.records)
    self.rows = []

  def rank(self, metric, mode):
    # Before any run has finished the report still lists every run's status (a failed sweep's
    # errors, a running one's progress), with an empty table.
    if self.present and not set(metric.split(',')) & set(self.present):
      raise ValueError(f'No finished run of {self.path} has the metric {metric}; pass --metric '
                       f'with one of: {", ".join(self.present)}.')
    self.rows = summarize(self.records, metric, mode)

  def curves(self, label_prefix, style):
    """(label, color key, style, curves of each seed) per variant of the table."""
    series = []
    for row in self.rows:
      seeds = [_run_curves(self.path, self.records[run]) for run in row['runs']]
      seeds = [c for c in seeds if c]
      if seeds:
        series.append((label_prefix + row['variant'], row['variant'], style, seeds))
    return series


def _names(paths):
  """Labels of the sweeps: their folder names, with the parent folder when those coincide."""
  names = [os.path.basename(os.path.normpath(p)) for p in paths]
  if len(set(names)) < len(names):
    names = [os.path.join(*os.path.normpath(os.path.abspath(p)).split(os.sep)[-2:]) for p in paths]
  return names


def sweep_report(paths, metric='eval_loss', mode=None, out=None, fit_axis=None):
  """Writes the report of one sweep, or of two side by side; returns the report's path."""
  names = _names(paths) if len(paths) > 1 else ['']
  sweeps = [_Sweep(p, n) for p, n in zip(paths, names)]
  logged = {name for sweep in sweeps for name in sweep.present}
  unlogged = [name for name in metric.split(',') if name not in logged]
  if ',' in metric and logged and unlogged:  # An alternative no run logged is a misspelling.
    raise ValueError(f'No finished run logged {", ".join(unlogged)} (of --metric {metric}); '
                     f'correct or drop it: the runs logged {", ".join(sorted(logged))}.')
  for sweep in sweeps:
    sweep.rank(metric, mode)
  mode = _mode(metric, mode)
  axes = sorted({a for s in sweeps for a in s.axes})
  if fit_axis in RECORD_AXES:  # A recorded number, plotted and fitted like a swept axis.
    for sweep in sweeps:
      for row in sweep.rows:
        row['overrides'][fit_axis] = row[fit_axis]
      sweep.axes = sweep.axes + [fit_axis]
    axes.append(fit_axis)
  if fit_axis is not None:
    if fit_axis not in axes:
      raise ValueError(f'--fit_power_law={fit_axis} is not a swept axis; pass one of: '
                       f'{", ".join(axes + list(RECORD_AXES))}.')
    if not any(sweep.rows for sweep in sweeps):
      raise ValueError('No run has finished yet, so there is nothing to fit; drop '
                       '--fit_power_law, or report once runs have finished.')
    values = [row['overrides'].get(fit_axis) for s in sweeps for row in s.rows]
    means = [row['mean'] for s in sweeps for row in s.rows]
    if not _numeric(values) or min(values) <= 0 or min(means) <= 0:
      raise ValueError(f'A power law needs positive {fit_axis} values and a positive {metric}; '
                       'fit another axis or metric.')
  # Beside the first sweep's own report, which a comparison must not replace.
  out = out or os.path.join(paths[0], REPORT_DIR + ''.join(
      f'_vs_{os.path.basename(os.path.normpath(p))}' for p in paths[1:]))
  cli.check_folder(out, '--out')
  os.makedirs(out, exist_ok=True)
  title = ' vs '.join(names) if len(paths) > 1 else os.path.basename(os.path.normpath(paths[0]))
  lines = [f'# Sweep report: {title}', '',
           f'Metric: `{metric}` ({"lower" if mode == "min" else "higher"} is better), the final '
           'value of each finished run; mean ± std over seeds (std with ddof=1, `-` for a single '
           'seed). Rows best first.', '']
  for sweep in sweeps:
    finished = sum(r.get('status') == 'finished' for r in sweep.records.values())
    heading = f'## {sweep.name}' if sweep.name else '## Results'
    lines += [heading, '', f'`{sweep.path}`: {len(sweep.records)} runs, '
              f'{finished} finished; swept axes: {", ".join(sweep.axes) or "none"}.', '']
    lines += (_results_table(sweep.rows, sweep.axes, metric) if sweep.rows else
              ['No run has finished yet.']) + ['']
    others = _others_table(sweep.records, sweep.rows, metric)
    if others:
      lines += ['Not in the table (failed, unfinished, or without the metric):', ''] + others
      lines += ['']
  if any(sweep.rows for sweep in sweeps):
    lines += _plots(sweeps, axes, metric, fit_axis, out)
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


def _plots(sweeps, axes, metric, fit_axis, out):
  """The report's curves and its plots against each swept axis, written to `out`; returns their
  Markdown lines."""
  lines = []
  styles = ('-', '--')
  series = [s for i, sweep in enumerate(sweeps)
            for s in sweep.curves(f'{sweep.name}: ' if sweep.name else '', styles[i])]
  lines += ['## Curves', '']
  if series:
    curves = plot_curves(os.path.join(out, 'curves.png'), series, metric)
    lines += [f'![curves]({curves})', '']
  else:
    lines += ['No finished run of the table has a metrics.jsonl.', '']
  plotted = _independent([row for sweep in sweeps for row in sweep.rows], axes, fit_axis)
  for axis in plotted:
    fit = axis == fit_axis
    name, fits = plot_axis(os.path.join(out, _file_name(axis)), axis,
                           [(s.name, s.rows, s.axes) for s in sweeps], metric, fit)
    lines += [f'## {metric} vs {axis}', '']
    lines += [f'![{metric} vs {axis}]({name})' if name else
              f'No run of the table sets {axis}.', '']
    if fit:
      lines += [f'Power-law fits {metric} = a · {axis}^b (least squares in log space):', '']
      lines += _table(['line', 'a', 'b (exponent)'],
                      [[label, _number(a), _number(b)] for label, a, b in fits]) + ['']
  return lines


def run_report(workdir, metric='eval_loss', mode=None, out=None):
  """Writes the report of one run workdir (last and best value of each metric, its curves);
  returns the report's path."""
  curves = load_curves(workdir)
  metric = next((name for name in metric.split(',') if name in curves), metric)
  if metric not in curves:
    raise ValueError(f'{workdir}/{METRICS} has no value of {metric}; pass --metric with one of: '
                     f'{", ".join(sorted(curves)) or "(none yet)"}.')
  mode = _mode(metric, mode)
  out = out or os.path.join(workdir, REPORT_DIR)
  cli.check_folder(out, '--out')
  os.makedirs(out, exist_ok=True)
  name = os.path.basename(os.path.normpath(workdir))
  steps, values = curves[metric]
  pick = np.argmin if mode == 'min' else np.argmax
  best = int(pick(values))
  last_step = max(int(s[-1]) for s, _ in curves.values())
  lines = [f'# Run report: {name}', '', f'`{workdir}`, last logged step '
           f'{last_step}. `{metric}`: last {_number(float(values[-1]))} (step {int(steps[-1])}), '
           f'best {_number(float(values[best]))} (step {int(steps[best])}).', '']
  body = []
  for key in sorted(curves):
    s, v = curves[key]
    way = direction(key)
    if way is None:
      best_cell = '-'
    else:
      i = int((np.argmin if way == 'min' else np.argmax)(v))
      best_cell = f'{_number(float(v[i]))} (step {int(s[i])})'
    body.append([key, _number(float(v[-1])), int(s[-1]), best_cell])
  lines += _table(['metric', 'last', 'step', 'best'], body) + ['']
  figure = plot_curves(os.path.join(out, 'curves.png'), [(name, name, '-', [curves])], metric)
  lines += ['## Curves', '', f'![curves]({figure})', '']
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


def report(paths, metric='eval_loss', mode=None, out=None, fit_axis=None):
  """The report of a sweep, of a run workdir, or of two sweeps; returns its path."""
  kinds = []
  for path in paths:
    if os.path.isfile(os.path.join(path, REGISTRY)):
      kinds.append('sweep')
    elif os.path.isfile(os.path.join(path, METRICS)):
      kinds.append('run')
    else:
      raise ValueError(f'{path} holds neither {REGISTRY} (a sweep) nor {METRICS} (a run '
                       'workdir); pass a sweep directory or a run workdir.')
  if len(paths) > 1 and kinds != ['sweep', 'sweep']:
    raise ValueError('Two paths are compared as two sweeps, and '
                     + ' and '.join(p for p, k in zip(paths, kinds) if k != 'sweep')
                     + ' is a run workdir; pass two sweep directories, or one path.')
  if kinds == ['run']:
    if fit_axis is not None:
      raise ValueError('--fit_power_law fits across the variants of a sweep; drop it for a '
                       'single run.')
    return run_report(paths[0], metric, mode, out)
  return sweep_report(paths, metric, mode, out, fit_axis)


def _parser():
  parser = cli.Parser(prog='python -m research.report', description=__doc__.split('\n\n')[0])
  parser.add_argument('path', help='A sweep directory (registry.jsonl) or a run workdir.')
  parser.add_argument('path2', nargs='?', help='A second sweep directory, reported beside it.')
  parser.add_argument('--metric', default='eval_loss', help='The final metric the table ranks '
                      '(NAME,OTHER: the first of them a run has).')
  parser.add_argument('--mode', choices=('min', 'max'),
                      help='Whether lower or higher is better (default: known from the name).')
  parser.add_argument('--out', help='Output folder (default: PATH/report; for two sweeps '
                      'PATH/report_vs_NAME, NAME the second folder\'s name).')
  parser.add_argument('--fit_power_law', metavar='AXIS',
                      help='Fit metric = a * AXIS^b on that axis\'s plot (log-log).')
  return parser


def main(argv):
  try:
    args = _parser().parse_args(argv[1:])
    paths = [args.path] + ([args.path2] if args.path2 else [])
    path = report(paths, args.metric, args.mode, args.out, args.fit_power_law)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
