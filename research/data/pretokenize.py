"""Tokenizes a config's data sources once into array_record shards (research/data/shards.py).

  python -m research.data.pretokenize --config configs/decoder.py:gpt2_small \
      --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.data_dir=DIR \
      [--writer 3 --writers 16]

Training does the same on its first start when the shards are missing (every process of a
multi-host job writing its share), so this command is for doing it ahead of time, or across
many machines: `--writers N` machines each run it with their own `--writer`, and each also takes
any shard that no one has started. The shards of a source go to
`<data.tokens_dir or data.data_dir/tokens>/<kind>-<source fingerprint>-<tokenizer fingerprint>`,
or to data.tokenized_dir when set (one source only).
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


def _local(path, setting):
  """Shards are written under local file locks: a URL is refused in one sentence."""
  if '://' in path:
    raise sources.DataError(f'{setting}={path} is not a local folder, where tokenized shards are '
                            'written and read; set data.tokens_dir (or data.tokenized_dir) to a '
                            'local or shared one.')
  return os.path.expanduser(path)


def directory(spec, source, data, tokenizer):
  """Where the shards of `spec` go: named by the source's and the tokenizer's fingerprints."""
  if data.tokenized_dir:
    return _local(data.tokenized_dir, 'data.tokenized_dir')
  kind = sources.parse_spec(spec)[0]
  name = f'{kind}-{source.fingerprint()[:12]}-{tokenizer.fingerprint[:12]}'
  if data.tokens_dir:
    return os.path.join(_local(data.tokens_dir, 'data.tokens_dir'), name)
  return os.path.join(_local(data.data_dir, 'data.data_dir'), 'tokens', name)


def ensure(spec, data, tokenizer, writer=0, writers=1):
  """(directory, manifest) of `spec`'s shards, written first if missing."""
  if data.tokenized_dir:  # Made elsewhere, perhaps from files this machine does not have.
    folder = _local(data.tokenized_dir, 'data.tokenized_dir')
    manifest = shards.read_manifest(folder)
    if manifest is not None:
      shards.check_manifest(manifest, folder, tokenizer, spec=spec,
                            settings=sources.reading_settings(spec, data))
      return folder, manifest
    shards.check_shard_folder(folder, 'data.tokenized_dir')
  source = sources.build(spec, data, 'data.mixture' if data.mixture else 'data.paths')
  folder = directory(spec, source, data, tokenizer)
  setting = next((key for key in ('tokenized_dir', 'tokens_dir') if data[key]), 'data_dir')
  manifest = shards.prepare(source, spec, tokenizer, folder, writer, writers, f'data.{setting}',
                            sources.reading_settings(spec, data))
  # The folder is named by fingerprints, so another spelling of the same source may have made it.
  shards.check_manifest(manifest, folder, tokenizer, source_fingerprint=source.fingerprint())
  return folder, manifest


def main(argv):
  try:
    # Its objective is not trained here (and importing one would import this module anew).
    config = config_lib.parse_flags(argv, __doc__, ('writer', 'writers'), trains=False)
    if _WRITERS.value < 1:
      raise config_lib.ConfigError(f'--writers={_WRITERS.value} must be at least 1.')
    if not 0 <= _WRITER.value < _WRITERS.value:
      raise config_lib.ConfigError(f'--writer={_WRITER.value} must lie in [0, --writers='
                                   f'{_WRITERS.value}).')
    data = config.data
    try:
      tokenizer = tokenizer_lib.get(data.tokenizer, extra_ids=data.extra_ids)
    except ValueError as error:  # A tokenizer file that is missing or unreadable.
      raise sources.DataError(str(error)) from None
    for spec, _ in sources.specs(data):
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
  except (config_lib.ConfigError, sources.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Raised between documents: the shard being written is removed.
    print('Interrupted; the shards already written are kept, and running the command again '
          'tokenizes the rest.', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
