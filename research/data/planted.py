"""A corpus with a planted analogy structure, and its questions in the questions-words format.

  python -m research.data.planted --out DIR [--entities 12] [--sentences 3000] [--seed 0]

writes DIR/corpus/doc_NN.txt (one document per file, one sentence per line) and
DIR/analogies.txt. Word w(i, g) names entity i with the binary feature g; each sentence holds one
such word with two context words of its entity, two of its feature and two fillers, in random
order. A word's contexts are then the sum of an entity part and a feature part, so
  w(i, 0) : w(i, 1) :: w(j, 0) : w(j, 1)   (section `feature`) and
  w(i, 0) : w(j, 0) :: w(i, 1) : w(j, 1)   (section `entity`)
hold for every two entities i != j: vectors that capture the text answer them, where a guess
finds the answer once in |vocabulary| questions. Words are letters only, so any word-level
tokenizer keeps them whole.
"""

import itertools
import os
import sys

import numpy as np

from research import cli

_CONSONANTS, _VOWELS = 'bdfgklmnprstvz', 'aeiou'
_FEATURE_ENDINGS = ('ar', 'on')
CONTEXTS = 4  # Context words per entity and per feature value.
FILLERS = 10


def _words(count, rng):
  """`count` distinct pronounceable words of three syllables."""
  syllables = [c + v for c, v in itertools.product(_CONSONANTS, _VOWELS)]
  words = set()
  while len(words) < count:
    words.add(''.join(rng.choice(syllables, 3)))
  return sorted(words)


def vocabulary(entities, seed=0):
  """(targets [entity][feature], entity contexts [entity], feature contexts [feature], fillers)."""
  rng = np.random.default_rng(seed)
  pool = _words(entities * (1 + CONTEXTS) + 2 * CONTEXTS + FILLERS, rng)
  rng.shuffle(pool)
  names, rest = pool[:entities], pool[entities:]
  targets = [[name + ending for ending in _FEATURE_ENDINGS] for name in names]
  entity_contexts = [rest[i * CONTEXTS:(i + 1) * CONTEXTS] for i in range(entities)]
  rest = rest[entities * CONTEXTS:]
  feature_contexts = [rest[:CONTEXTS], rest[CONTEXTS:2 * CONTEXTS]]
  return targets, entity_contexts, feature_contexts, rest[2 * CONTEXTS:]


def sentences(count, entities, seed=0):
  """`count` sentences (lists of words) of the planted corpus."""
  targets, entity_contexts, feature_contexts, fillers = vocabulary(entities, seed)
  rng = np.random.default_rng((seed, 1))
  made = []
  for _ in range(count):
    i, g = int(rng.integers(entities)), int(rng.integers(2))
    words = ([targets[i][g]] + list(rng.choice(entity_contexts[i], 2, replace=False))
             + list(rng.choice(feature_contexts[g], 2, replace=False))
             + list(rng.choice(fillers, 2, replace=False)))
    made.append([str(w) for w in rng.permutation(words)])
  return made


def questions(entities, seed=0):
  """{section: [(a, b, c, d)]}: the analogies the corpus plants."""
  targets = vocabulary(entities, seed)[0]
  feature, entity = [], []
  for i, j in itertools.permutations(range(entities), 2):
    for g in (0, 1):
      feature.append((targets[i][g], targets[i][1 - g], targets[j][g], targets[j][1 - g]))
      entity.append((targets[i][g], targets[j][g], targets[i][1 - g], targets[j][1 - g]))
  return {'feature': feature, 'entity': entity}


def write_questions(path, sections):
  with open(path, 'w') as f:
    for section, rows in sections.items():
      f.write(f': {section}\n')
      f.writelines(' '.join(row) + '\n' for row in rows)


def generate(out, entities=12, count=3000, files=20, seed=0):
  """Writes out/corpus/doc_NN.txt and out/analogies.txt; returns (corpus folder, analogies)."""
  if entities < 2 or count < files or files < 2:
    raise ValueError(f'entities={entities}, sentences={count} and files={files}: the analogies '
                     'need at least 2 entities, and the corpus at least 2 files of a sentence.')
  corpus = os.path.join(out, 'corpus')
  os.makedirs(corpus, exist_ok=True)
  lines = [' '.join(words) for words in sentences(count, entities, seed)]
  for index, part in enumerate(np.array_split(np.arange(count), files)):
    with open(os.path.join(corpus, f'doc_{index:02d}.txt'), 'w') as f:
      f.writelines(lines[k] + '\n' for k in part)
  analogies = os.path.join(out, 'analogies.txt')
  write_questions(analogies, questions(entities, seed))
  return corpus, analogies


def main(argv):
  parser = cli.Parser(prog='python -m research.data.planted')
  parser.add_argument('--out', required=True, help='Folder to write corpus/ and analogies.txt.')
  parser.add_argument('--entities', type=int, default=12)
  parser.add_argument('--sentences', type=int, default=3000)
  parser.add_argument('--files', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  try:
    args = parser.parse_args(argv[1:])
    cli.check_folder(args.out, '--out')
    corpus, analogies = generate(args.out, args.entities, args.sentences, args.files, args.seed)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {corpus} and {analogies}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
