"""research.sample through its command line (its main, in process): each bad input stops with one
sentence (exit 2)."""

import functools
import os
import shutil

import pytest

import runs
from research import config as config_lib
from research import hf

_sample = functools.partial(runs.in_process, 'research.sample')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A Llama-style run with max_len 16 and random weights, saved as a checkpoint."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py:tiny'))
  m = config.model
  m.num_layers, m.emb_dim, m.mlp_dim, m.max_len = 2, 32, 64, 16
  config.train.seq_len, config.train.sample_tokens = 16, 0
  return runs.random_run(tmp_path_factory.mktemp('sample') / 'run', config)


BASE = ['--prompt_ids', '1,2,3,4', '--max_new_tokens', '12']


@pytest.mark.parametrize('args, fragment', [
    (['--max_new_tokens=0'], 'max_new_tokens=0 must be a positive integer'),
    (['--temperature=-1'], 'temperature=-1.0 must be 0 (greedy) or'),
    (['--temperature=1', '--top_p=0'], 'top_p=0.0 must lie in (0, 1]'),
    (['--temperature=1', '--top_k=265'], 'top_k=265 must lie in [0, 264]'),
    (['--prompt_ids=7,264'], 'Prompt 1 holds token id 264, outside the vocabulary of 264 ids'),
    (['--prompt_ids=7,2.5'], "--prompt_ids '7,2.5' is not a comma-separated list of integer"),
    (['--max_new_tokens=13'], 'The longest prompt plus max_new_tokens=13 needs 17 positions but '
                              'the model has max_len=16'),
    (['--top_kk=3'], 'Unknown flag --top_kk; the closest is --top_k'),
    (['--seed=x'], '--seed=x is not a valid value (an integer is expected); correct that flag.'),
    (['--prompt=a'], 'Pass --workdir and one of --prompt'),  # Not both kinds of prompt.
    (['--num_beams=-1'], 'num_beams=-1 must be a non-negative integer (0: no beam search)'),
])
def test_bad_inputs_stop_with_one_sentence(workdir, args, fragment):
  runs.assert_error(_sample('--workdir', str(workdir), *BASE, *args), fragment)


def test_generation_may_fill_max_len(workdir):
  result = _sample('--workdir', str(workdir), *BASE)  # 4 + 12 == max_len.
  assert result.returncode == 0, result.stderr[-2000:]
  ids = [int(t) for t in result.stdout.strip().split(',')]
  assert len(ids) == 12 and all(0 <= t < 264 for t in ids)


def test_sampling_with_the_parameters_sharded_over_the_devices_gives_the_same_tokens(workdir):
  one = _sample('--workdir', str(workdir), *BASE)
  sharded = _sample('--workdir', str(workdir), *BASE, '--mesh=fsdp=-1,tensor=2')
  assert one.returncode == 0 and sharded.returncode == 0, sharded.stderr[-2000:]
  assert sharded.stdout == one.stdout
  runs.assert_error(_sample('--workdir', str(workdir), *BASE, '--mesh=fsdp=3'),
                    'The mesh {')  # 3 of 8 devices.


def test_workdirs_without_a_run_stop_with_one_sentence(workdir, tmp_path):
  runs.assert_error(_sample('--workdir', str(tmp_path / 'missing'), *BASE),
                      f'--workdir {tmp_path / "missing"} is not a directory')
  # The config of a run that has not saved a checkpoint yet.
  shutil.copy(workdir / 'config.json', tmp_path / 'config.json')
  runs.assert_error(_sample('--workdir', str(tmp_path), *BASE), str(tmp_path))
  # A model converted from Hugging Face has another tokenizer: text prompts are refused.
  hf.write_source(str(tmp_path), str(tmp_path), dict(model_type='llama'), None)
  runs.assert_error(_sample('--workdir', str(tmp_path), '--prompt', 'def '),
                      f'{tmp_path} was converted from Hugging Face, whose tokenizer is not ours')


@pytest.mark.parametrize('text, fragment', [
    ('{"model": {}} trailing', 'is not valid JSON (Extra data: line 1 column 15 (char 14)); '
                               'restore the file the run wrote there.'),
    ('[1, 2]', 'lacks model.family, objective.name, data, train, optim, checkpoint, mesh, which'),
    ('{"model": {}}', 'lacks model.family, objective.name, data, train'),
])
def test_a_damaged_config_json_is_named_in_one_sentence(tmp_path, text, fragment):
  """Every command that reads a workdir (sample, convert to_hf, word_vectors, a distillation's
  teacher) loads its config.json through one function."""
  (tmp_path / 'config.json').write_text(text)
  runs.assert_error(_sample('--workdir', str(tmp_path), *BASE),
                    f'{tmp_path}/config.json {fragment}')
