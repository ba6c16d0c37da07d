"""Stacked (scanned) and per-layer parameter layouts convert into each other, optimizer state
included, and a converted checkpoint resumes training exactly."""

import json
import shutil

import jax
import numpy as np
import pytest

import runs
from research import layout
from research import train
from research import workdir as workdir_lib


def test_a_train_state_converts_both_ways_without_changing_a_number(decoder_config):
  config = decoder_config('tiny')
  config.model.num_layers, config.model.emb_dim, config.model.mlp_dim = 3, 32, 64
  from research import mesh as mesh_lib
  trainer = train.setup(config, mesh_lib.make_mesh({}, jax.devices()[:1]))
  state = trainer.state
  per_layer = layout.convert(state, 3, scan_layers=False)
  assert 'layers' not in per_layer.params and per_layer.params['layers_2']
  mu = per_layer.opt_state[1][0].mu  # Adam's first moment follows the parameters.
  assert set(mu) == set(per_layer.params)
  np.testing.assert_array_equal(per_layer.params['layers_1']['mlp']['up']['kernel'],
                                np.asarray(state.params['layers']['mlp']['up']['kernel'][1]))
  back = layout.convert(per_layer, 3, scan_layers=True)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), state, back)
  assert all(jax.tree.leaves(same))


@pytest.mark.slow
def test_a_converted_checkpoint_resumes_with_the_losses_of_the_original_layout(tmp_path):
  corpus = runs.write_corpus(tmp_path / 'corpus')
  scanned = tmp_path / 'scanned'
  runs.ok(runs.train(scanned, corpus, '--config.train.num_steps=8',
                     '--config.checkpoint.every_steps=4', '--config.model.dropout_rate=0'))
  moved = tmp_path / 'at4'
  shutil.copytree(scanned, moved)
  shutil.rmtree(moved / 'checkpoints' / '8')
  result = runs.ok(runs.command('research.convert', 'layout', '--workdir', str(moved), '--out',
                                str(tmp_path / 'per_layer')))
  assert '--config.model.scan_layers=False' in result.stdout
  runs.ok(runs.train(tmp_path / 'per_layer', corpus, '--config.train.num_steps=8',
                     '--config.checkpoint.every_steps=4', '--config.model.dropout_rate=0',
                     '--config.model.scan_layers=False'))
  read = lambda w: {r['step']: r['loss'] for r in map(json.loads, open(w / 'metrics.jsonl'))}
  want, got = read(scanned), read(tmp_path / 'per_layer')
  assert sorted(got) == [5, 6, 7, 8]
  for step in got:
    assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
  reference = layout.convert(workdir_lib.load_params(str(scanned))[1], 2, scan_layers=False)
  final = jax.device_get(workdir_lib.load_params(str(tmp_path / 'per_layer'))[1])
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final, reference)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  # A second conversion into a folder that is not empty is refused before anything is read.
  runs.assert_error(runs.command('research.convert', 'layout', '--workdir', str(moved), '--out',
                                 str(tmp_path / 'per_layer')), 'is not empty; pass a new or empty')
