"""checkpoint.init_from into another head: the shared subtree is loaded, the rest starts fresh,
and a shared name of another shape is one sentence."""

import os

import jax
import numpy as np
import pytest

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import mesh as mesh_lib
from research import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(pair, emb_dim=64, seed=0):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'encoder.py:bert_tiny'))
  m = config.model
  m.num_layers, m.num_heads, m.emb_dim, m.mlp_dim = 2, 4, emb_dim, 128
  m.pair_head, m.pooler, config.objective.pair = pair, pair != 'none', pair
  config.train.batch_size, config.train.seq_len, config.seed = 8, 32, seed
  return config


def _trainer(config):
  mesh = mesh_lib.make_mesh(config_lib.validate(config, jax.device_count()))
  return train.setup(config, mesh, pipeline=object())


def _save(trainer, config, workdir):
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1)
  checkpointer.save(7, trainer.state, checkpoint_lib.make_record(
      7, trainer.dropout_rng, dict(next_step=7, rows_consumed=0), config))
  checkpointer.wait()
  checkpointer.close()


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_warm_start_loads_the_body_and_initialises_a_new_head(tmp_path):
  source_config = _config('none', seed=1)  # Masked LM only: no pooler, no pair head.
  source = _trainer(source_config)
  _save(source, source_config, str(tmp_path / 'source'))
  target = _trainer(_config('nsp', seed=2))
  state, step, description = checkpoint_lib.restore_params(
      str(tmp_path / 'source'), target.state, target.state_shardings,
      checkpoint_lib.settings(_config('nsp')))
  assert step == 7
  assert 'initialised 4 afresh (pair_head, pooler)' in description, description
  loaded, fresh, before = _flat(state.params), _flat(source.state.params), _flat(
      target.state.params)
  assert set(fresh) < set(loaded)
  for name, value in loaded.items():
    want = fresh[name] if name in fresh else before[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
  assert not np.array_equal(before["['token_embed']['embedding']"],
                            fresh["['token_embed']['embedding']"])


def test_warm_start_from_another_width_is_one_sentence(tmp_path):
  source_config = _config('none', emb_dim=32)
  _save(_trainer(source_config), source_config, str(tmp_path / 'source'))
  target = _trainer(_config('nsp'))
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    checkpoint_lib.restore_params(str(tmp_path / 'source'), target.state, target.state_shardings,
                                  checkpoint_lib.settings(_config('nsp')))
  message = str(error.value)
  assert message.startswith('Parameter [') and 'has shape [' in message and '\n' not in message


def test_warm_start_from_a_file_or_a_missing_folder_is_one_sentence(tmp_path):
  target = _trainer(_config('nsp'))
  (tmp_path / 'train.csv').write_text('text,label\n')
  for source, message in [
      (tmp_path / 'train.csv', f'{tmp_path / "train.csv"} is a file, not a run\'s workdir; point '
                               'at the workdir of a finished run.'),
      (tmp_path / 'nowhere', f'{tmp_path / "nowhere" / "checkpoints"} does not exist; point at '
                             'the workdir of a finished run.')]:
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
      checkpoint_lib.restore_params(str(source), target.state, target.state_shardings,
                                    checkpoint_lib.settings(_config('nsp')))
    assert str(error.value) == message


def test_warm_start_from_another_family_or_layer_layout_is_one_sentence(tmp_path):
  source_config = _config('none')
  _save(_trainer(source_config), source_config, str(tmp_path / 'source'))
  for key, value in (('family', 'decoder'), ('scan_layers', not source_config.model.scan_layers)):
    settings = checkpoint_lib.settings(_config('nsp'))
    settings[f'model.{key}'] = value
    target = _trainer(_config('nsp'))
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
      checkpoint_lib.restore_params(str(tmp_path / 'source'), target.state,
                                    target.state_shardings, settings)
    assert f'was trained with model.{key}=' in str(error.value)


def test_a_warm_started_run_frees_the_fresh_parameters_it_replaced(tmp_path):
  source_config = _config('none', seed=1)
  source = _trainer(source_config)
  _save(source, source_config, str(tmp_path / 'source'))
  config = _config('nsp', seed=2)
  config.checkpoint.init_from = str(tmp_path / 'source')
  target = _trainer(config)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / 'run' / 'checkpoints'), keep=1)
  state, _, description = train._start_up(config, target, checkpointer)
  checkpointer.close()
  assert description.startswith('warm start from the parameters of step 7'), description
  # The trainer keeps its fresh state for the whole run: the loaded names' fresh arrays are freed
  # there, and the fresh head and optimizer state, which the run goes on with, are not.
  loaded = set(_flat(source.state.params))
  for path, fresh in jax.tree_util.tree_leaves_with_path(target.state.params):
    assert fresh.is_deleted() == (jax.tree_util.keystr(path) in loaded), path
  assert not any(x.is_deleted() for x in jax.tree.leaves(target.state.opt_state))
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))
