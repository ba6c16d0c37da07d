"""Tokenizes a config's data sources once into array_record shards (research/data/shards.py).

  python -m research.data.pretokenize --config configs/decoder.py:gpt2_small \
      --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.data_dir=DIR \
      [--writer 3 --writers 16]

Training does the same on its first start when the shards are missing (every process of a
multi-host job writing its share), so this command is for doing it ahead of time, or across
many machines: `--writers N` machines each run it with their own `--writer`, and each also takes
any shard that no one has started. The shards of a source go to
`<data.tokens_dir or data.data_dir/tokens>/<kind>-<source fingerprint>-<tokenizer fingerprint>`,
or to
data.tokenized_dir when set (one source only).
"""

import os
import sys
import time

from absl import flags

from research import config as config_lib
from research.data import shards
from research.data import sources
from research.data import tokenizer as tokenizer_lib

_WRITER = flags.DEFINE_integer('writer', 0, 'Which of --writers this process is (from 0).')
_WRITERS = flags.DEFINE_integer('writers', 1, 'How many processes share the work.')


def directory(spec, source, data, tokenizer):
  if data.tokenized_dir:
    return os.path.expanduser(data.tokenized_dir)
  kind = sources.parse_spec(spec)[0]
  name = f'{kind}-{source.fingerprint()[:12]}-{tokenizer.fingerprint[:12]}'
  if data.tokens_dir:
    return os.path.join(os.path.expanduser(data.tokens_dir), name)
  if '://' in data.data_dir:  # Shards are written with local file locks.
    raise sources.DataError(f'data.data_dir={data.data_dir} is not a local folder, where tokenized '
                            'shards are written; set data.tokens_dir to a local or shared one.')
  return os.path.join(os.path.expanduser(data.data_dir), 'tokens', name)


def ensure(spec, data, tokenizer, writer=0, writers=1):
  """(directory, manifest) of `spec`'s shards, written first if missing."""
  if data.tokenized_dir:  # Made elsewhere, perhaps from files this machine does not have.
    folder = os.path.expanduser(data.tokenized_dir)
    manifest = shards.read_manifest(folder)
    if manifest is not None:
      shards.check_manifest(manifest, folder, spec, tokenizer)
      return folder, manifest
  source = sources.build(spec, data)
  folder = directory(spec, source, data, tokenizer)
  manifest = shards.prepare(source, spec, tokenizer, folder, writer, writers)
  shards.check_manifest(manifest, folder, spec, tokenizer)
  return folder, manifest


def main(argv):
  try:
    config = config_lib.parse_flags(argv)
    if not 0 <= _WRITER.value < _WRITERS.value:
      raise config_lib.ConfigError(f'--writer={_WRITER.value} must lie in [0, --writers='
                                   f'{_WRITERS.value}).')
    data = config.data
    tokenizer = tokenizer_lib.get(data.tokenizer, extra_ids=data.extra_ids)
    entries = sources.specs(data)
    if data.tokenized_dir and len(entries) > 1:
      raise sources.DataError('data.tokenized_dir names the shards of one source; leave it empty '
                              'for a mixture.')
    for spec, _ in entries:
      started = time.time()
      folder, manifest = ensure(spec, data, tokenizer, _WRITER.value, _WRITERS.value)
      seconds = time.time() - started
      if manifest.get('created', started) < started:
        print(f'{spec}: already tokenized in {folder}')
        continue
      for split, info in manifest['splits'].items():
        print(f"{spec} {split}: {info['documents']} documents, {info['tokens']} tokens in "
              f"{len(info['shards'])} shards ({info['empty_documents']} empty documents "
              'skipped)')
      megabytes = sum(info['bytes'] for info in manifest['splits'].values()) / 1e6
      print(f'{spec}: {folder} ({megabytes:.1f} MB of text, {seconds:.1f} s, '
            f'{megabytes / max(seconds, 1e-9):.1f} MB/s)')
  except (config_lib.ConfigError, ValueError) as error:
    print(f'Error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
