"""Every command that writes into a folder refuses one it cannot make or write in before any
work, in one sentence: a file, a path under a file, a place where nothing can be made (/sys,
where os.access would say yes to root)."""

import json

import pytest

import runs

UNWRITABLE = '/sys/research-test-folder'


def _commands(tmp_path, bad):
  """(module, arguments) of each command, writing into the folder `bad`."""
  run = tmp_path / 'run'  # A run workdir, as much of one as the commands read before writing.
  run.mkdir(exist_ok=True)
  (run / 'metrics.jsonl').write_text(json.dumps(dict(step=1, eval_loss=2.0)) + '\n')
  sweep = tmp_path / 'sweep.py'
  sweep.write_text('from research.sweeps import seeds\n\ndef get_sweep():\n  return seeds(2)\n')
  return {
      'coherence': ('research.data.coherence', '--out', bad),
      'tokenizer': ('research.data.tokenizer', 'train', '--source', f'text:{tmp_path}',
                    '--vocab_size', '300', '--out', f'{bad}/spm'),
      'report': ('research.report', str(run), '--out', bad),
      'to_hf': ('research.convert', 'to_hf', '--workdir', str(run), '--out', bad),
      'layout': ('research.convert', 'layout', '--workdir', str(run), '--out', bad),
      'from_hf': ('research.convert', 'from_hf', '--model_dir', str(tmp_path), '--workdir', bad),
      'pretokenize': ('research.data.pretokenize', '--config', 'configs/decoder.py:tiny',
                      f'--config.data.data_dir={bad}'),
      'sweep': ('launch.sweep', '--sweep', str(sweep), '--config', 'configs/decoder.py:tiny',
                '--workdir', bad),
      'planted': ('research.data.planted', '--out', bad),
      'vocab': ('research.word_vectors', 'vocab', '--source', f'text:{tmp_path}', '--out', bad),
      'export': ('research.word_vectors', 'export', '--workdir', str(run), '--out',
                 f'{bad}/vectors.txt'),
  }


_FLAG = dict(coherence='--out', report='--out', to_hf='--out', layout='--out',
             from_hf='--workdir', sweep='--workdir', planted='--out', vocab='--out')
_FILE = dict(tokenizer='spm', export='vectors.txt')  # Commands that write a file in the folder.


@pytest.mark.parametrize('command', sorted(_FLAG) + sorted(_FILE) + ['pretokenize'])
@pytest.mark.parametrize('kind', ['unwritable', 'under_a_file'])
def test_a_folder_a_command_cannot_write_is_one_sentence(tmp_path, command, kind):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  bad = UNWRITABLE if kind == 'unwritable' else f'{a_file}/out'
  module, *arguments = _commands(tmp_path, bad)[command]
  # The sweep driver sets jax's platform as it starts: a process of its own.
  result = (runs.command if command == 'sweep' else runs.in_process)(module, *arguments)
  line = runs.error_line(result)
  if kind == 'unwritable':  # The reason is the system's (EPERM, or EROFS where /sys is read-only).
    assert ' cannot be written (' in line and line.endswith('); pass a folder you can write.'), line
  else:
    assert line.endswith(f'lies under the file {a_file}; pass a path in a folder.'), line
  if command == 'pretokenize':
    assert line.startswith(f"error: data.data_dir's shard folder {bad}/tokens/"), line
  elif command in _FILE:
    assert line.startswith(f'error: --out {bad}/{_FILE[command]}: its folder {bad} '), line
  else:
    assert line.startswith(f'error: {_FLAG[command]} {bad} '), line
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'run', 'sweep.py']


def test_a_file_output_that_is_a_folder_is_one_sentence(tmp_path):
  line = runs.error_line(runs.in_process('research.word_vectors', 'export', '--workdir',
                                         str(tmp_path), '--out', str(tmp_path)))
  assert line == f'error: --out {tmp_path} is a folder; pass the path of a file.'
