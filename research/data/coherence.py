"""A held-out probe task for comparing pretraining objectives: is a snippet intact or spliced?

  python -m research.data.coherence --out DIR [--examples 2000] [--length 96] [--seed 0]

Snippets of `length` characters come from the embedded corpus's VALIDATION files (the same
split pretraining holds out), so no pretrained model has seen them. Half are left intact; in the
other half the middle third is replaced by a span of the same length from another file. Telling
them apart needs what a language model learns (what continues what), and every family can be
fine-tuned on it: DIR/{train,dev}.jsonl hold {"text", "label"} rows (1 = intact) for
classification, DIR/{train,dev}.pairs.jsonl {"input", "target"} rows (target "intact" or
"spliced") for sequence to sequence. Probe-train and probe-dev snippets come from disjoint files.
"""

import json
import os
import sys

import numpy as np

from research import cli
from research.data import sources

LABELS = {1: 'intact', 0: 'spliced'}


def validation_texts(validation_percent):
  """The texts of the embedded corpus's validation files under the pretraining runs'
  data.validation_percent (the pipeline's split)."""
  _, validation = sources.split_files(sources.stdlib_files(), validation_percent)
  texts = []
  for _, path in validation:
    with open(path, encoding='utf-8', errors='replace') as f:
      texts.append(f.read())
  return texts


def examples(texts, count, length, rng):
  """`count` (snippet, label) pairs, labels alternating, from `texts` (at least two, each longer
  than `length`)."""
  third = length // 3
  rows = []
  for index in range(count):
    text = texts[rng.integers(len(texts))]
    start = rng.integers(len(text) - length)
    snippet = text[start:start + length]
    label = index % 2
    if label == 0:
      other = texts[rng.integers(len(texts))]
      while other is text:
        other = texts[rng.integers(len(texts))]
      at = rng.integers(len(other) - third)
      snippet = snippet[:third] + other[at:at + third] + snippet[2 * third:]
    rows.append((snippet, label))
  return rows


def write(out, count, length, seed, validation_percent=5):
  """Writes the four files; returns {file: rows}."""
  rng = np.random.default_rng(seed)
  texts = [text for text in validation_texts(validation_percent) if len(text) > 2 * length]
  order = rng.permutation(len(texts))
  halves = {'train': [texts[i] for i in order[::2]], 'dev': [texts[i] for i in order[1::2]]}
  os.makedirs(out, exist_ok=True)
  written = {}
  for split, part in halves.items():
    if len(part) < 2:
      raise ValueError(f'The corpus has too few validation files for --length {length}; '
                       'choose a shorter length.')
    rows = examples(part, count if split == 'train' else count // 2, length, rng)
    for name, row in ((f'{split}.jsonl', lambda s, y: dict(text=s, label=y)),
                      (f'{split}.pairs.jsonl', lambda s, y: dict(input=s, target=LABELS[y]))):
      with open(os.path.join(out, name), 'w') as f:
        for snippet, label in rows:
          f.write(json.dumps(row(snippet, label)) + '\n')
      written[name] = len(rows)
  return written


def main(argv):
  parser = cli.Parser(prog='python -m research.data.coherence', description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--examples', type=int, default=2000, help='Training rows (dev: half).')
  parser.add_argument('--length', type=int, default=96, help='Characters per snippet.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--validation_percent', type=int, default=5,
                      help="The pretraining runs' data.validation_percent (their default, 5).")
  try:
    options = parser.parse_args(argv[1:])
    if options.examples < 2 or options.length < 3:
      raise ValueError('--examples needs at least 2 and --length at least 3.')
    cli.check_folder(options.out, '--out')
    written = write(options.out, options.examples, options.length, options.seed,
                    options.validation_percent)
  except ValueError as error:  # DataError included.
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(', '.join(f'{name}: {rows} rows' for name, rows in written.items()))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
