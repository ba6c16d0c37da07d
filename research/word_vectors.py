"""Word vectors: a word-level vocabulary to train them on, their evaluation, and their export.

  python -m research.word_vectors vocab --source text:GLOB --out DIR [--vocab_size N]
      [--min_count 5]
      trains a Hugging Face `tokenizers` WordLevel vocabulary (NFKC, lowercased, split at spaces
      and punctuation; [PAD] and [UNK] special) and writes DIR/tokenizer.json, for
      --config.data.tokenizer=hf:DIR;
  python -m research.word_vectors evaluate (--workdir DIR | --vectors FILE)
      [--analogies questions-words.txt] [--neighbours WORD,WORD]
      cosine nearest neighbours, and analogy accuracy a:b::c:? by 3CosAdd (the word nearest to
      b - a + c among all but a, b and c) on a file in the questions-words format (`: section`
      lines, then `a b c d`), skipping questions with out-of-vocabulary words;
  python -m research.word_vectors export --workdir DIR --out vectors.txt
      the vectors of the newest checkpoint in the word2vec text format (`N DIM`, then
      `word v1 v2 ...`): word2vec's input vectors, GloVe's input plus output vectors.
"""

import os
import sys

import numpy as np

from research import cli

SPECIAL_TOKENS = ('[PAD]', '[UNK]')


def train_vocabulary(texts, out, vocab_size=100_000, min_count=5):
  """Trains a WordLevel tokenizer on the documents `texts`; writes out/tokenizer.json and
  returns its folder."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.WordLevel(unk_token='[UNK]'))
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_count,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
    raise ValueError(f'No word occurs {min_count} times or more in the training text of '
                     '--source, so the vocabulary would hold the special tokens only; pass more '
                     'text or a lower --min_count.')
  os.makedirs(out, exist_ok=True)
  tokenizer.save(os.path.join(out, 'tokenizer.json'))
  return out


class Vectors:
  """Words and their vectors; lookups fall back to the lowercased word."""

  def __init__(self, words, matrix):
    self.words, self.matrix = list(words), np.asarray(matrix, np.float32)
    self.index = {word: i for i, word in enumerate(self.words)}
    norms = np.linalg.norm(self.matrix, axis=1, keepdims=True)
    self.unit = self.matrix / np.maximum(norms, 1e-12)

  def lookup(self, word):
    """The index of `word` (or of its lowercase form), else None."""
    return self.index.get(word, self.index.get(word.lower()))

  def neighbours(self, word, count=10):
    """[(word, cosine)] of the `count` words nearest to `word` (itself excluded)."""
    index = self.lookup(word)
    if index is None:
      raise ValueError(f'{word!r} is not in the vocabulary of {len(self.words)} words; pass '
                       'another --neighbours word.')
    scores = self.unit @ self.unit[index]
    scores[index] = -np.inf
    best = np.argsort(-scores)[:count]
    return [(self.words[i], float(scores[i])) for i in best]

  def answer(self, questions):
    """3CosAdd answers (indices) to questions [n, 3] of indices a, b, c: the word nearest to
    b - a + c, excluding a, b and c."""
    questions = np.asarray(questions, np.int64).reshape(-1, 3)
    answers = []
    for start in range(0, len(questions), 1024):  # Bounds the [questions, words] scores.
      q = questions[start:start + 1024]
      target = self.unit[q[:, 1]] - self.unit[q[:, 0]] + self.unit[q[:, 2]]
      scores = target @ self.unit.T
      np.put_along_axis(scores, q, -np.inf, axis=1)
      answers.append(np.argmax(scores, axis=1))
    return np.concatenate(answers) if answers else np.zeros(0, np.int64)

  def analogies(self, sections):
    """({section: (correct, asked)}, skipped) for {section: [(a, b, c, d)]}; a question with a
    word outside the vocabulary is skipped."""
    results, skipped = {}, 0
    for section, rows in sections.items():
      found = [[self.lookup(w) for w in row] for row in rows]
      known = np.asarray([row for row in found if None not in row], np.int64).reshape(-1, 4)
      skipped += len(found) - len(known)
      correct = int(np.sum(self.answer(known[:, :3]) == known[:, 3]))
      results[section] = (correct, len(known))
    return results, skipped


def read_questions(path):
  """{section: [(a, b, c, d)]} of a questions-words file (`: section` lines start sections)."""
  sections, section = {}, 'questions'
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if line.startswith(':'):
        section = line[1:].strip() or section
        sections.setdefault(section, [])
        continue
      words = line.split()
      if len(words) != 4:
        raise ValueError(f'{path} line {number} holds {len(words)} words where a question has '
                         'four (a b c d) or a section line starts with ":"; fix that line.')
      sections.setdefault(section, []).append(tuple(words))
  return sections


def vocabulary(tokenizer):
  """(ids, words): every id of `tokenizer` that spells a word (not a special token)."""
  special = set(tokenizer.special_ids)
  ids, words = [], []
  for index in range(tokenizer.vocab_size):
    word = tokenizer.decode([index]).strip()
    if index not in special and word and not any(c.isspace() for c in word):
      ids.append(index)
      words.append(word)
  return np.asarray(ids, np.int64), words


def from_workdir(workdir):
  """(Vectors, step) of the newest checkpoint of a word-vector run."""
  from research import models
  from research import workdir as workdir_lib
  if not os.path.isdir(workdir):
    raise ValueError(f'--workdir {workdir} is not a directory; pass the workdir of a training '
                     'run.')
  config = workdir_lib.load_config(workdir)
  family = workdir_lib.family(config)
  if not hasattr(family, 'vectors'):
    exporting = sorted(name for name in models.FAMILIES if hasattr(models.get(name), 'vectors'))
    raise ValueError(f'{workdir} holds a model.family={config.model.family!r} model, which has '
                     f'no word vectors; pass the workdir of a {" or ".join(exporting)} run.')
  tokenizer = workdir_lib.tokenizer(workdir, config)
  config, params, step = workdir_lib.load_params(workdir, config)
  matrix = np.asarray(family.vectors(params, config.objective.name), np.float32)
  ids, words = vocabulary(tokenizer)
  return Vectors(words, matrix[ids]), step


def write_text(path, vectors):
  """The word2vec text format: `N DIM`, then one `word v1 ... vDIM` line per word."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write(f'{len(vectors.words)} {vectors.matrix.shape[1]}\n')
    for word, row in zip(vectors.words, vectors.matrix):
      f.write(word + ' ' + ' '.join(f'{x:.9g}' for x in row) + '\n')


def read_text(path):
  """Vectors of a file in the word2vec text format."""
  if not os.path.isfile(path):
    raise ValueError(f'{path} is not a file; pass vectors in the word2vec text format (research.'
                     'word_vectors export writes them).')
  with open(path, encoding='utf-8') as f:
    header = f.readline().split()
    if len(header) != 2 or not all(h.isdigit() for h in header):
      raise ValueError(f'{path} does not start with "N DIM"; pass a file in the word2vec text '
                       'format.')
    count, dim = map(int, header)
    lines, rows = {}, []  # {word: its line number}, in file order.
    for number, line in enumerate(f, 2):
      parts = line.rstrip('\n').split(' ')
      if len(parts) != dim + 1:
        raise ValueError(f'{path} line {number} holds {len(parts) - 1} numbers where the header '
                         f'says {dim}; fix or regenerate the file.')
      if parts[0] in lines:
        raise ValueError(f'{path} line {number} repeats the word {parts[0]!r} of line '
                         f'{lines[parts[0]]}; keep one vector per word.')
      try:
        rows.append(np.asarray(parts[1:], np.float32))
      except ValueError:
        raise ValueError(f'{path} line {number} holds a value that is not a number; fix or '
                         'regenerate the file.') from None
      lines[parts[0]] = number
    words = list(lines)
  if len(words) != count:
    raise ValueError(f'{path} holds {len(words)} words where its header says {count}; fix or '
                     'regenerate the file.')
  return Vectors(words, np.stack(rows) if rows else np.zeros((0, dim), np.float32))


def report(vectors, analogies=None, neighbours=()):
  """The lines `evaluate` prints."""
  lines = [f'{len(vectors.words)} words, {vectors.matrix.shape[1]} dimensions']
  for word in neighbours:
    near = ', '.join(f'{w} {score:.3f}' for w, score in vectors.neighbours(word))
    lines.append(f'neighbours of {word}: {near}')
  if analogies:
    results, skipped = vectors.analogies(read_questions(analogies))
    if not any(asked for _, asked in results.values()):
      raise ValueError(f'{analogies} holds no question whose four words are all in the '
                       f'vocabulary ({skipped} skipped); pass questions about words of these '
                       'vectors.')
    for section, (correct, asked) in results.items():
      lines.append(f'{section}: {correct}/{asked} = {correct / max(asked, 1):.4f}')
    correct, asked = (sum(r[i] for r in results.values()) for i in (0, 1))
    chance = 1.0 / max(len(vectors.words) - 3, 1)
    lines.append(f'accuracy {correct / max(asked, 1):.4f} over {asked} questions ({skipped} '
                 f'skipped with out-of-vocabulary words; chance {chance:.4f})')
  return lines


def _check_overwrite(path, overwrite):
  """One sentence where the command would replace the existing file `path` unasked: a run's
  config.json or saved tokenizer.json is as easily named as a fresh output."""
  if os.path.exists(path) and not overwrite:
    raise ValueError(f'{path} exists; pass another --out, or --overwrite to replace it.')


def _parser():
  parser = cli.Parser(prog='python -m research.word_vectors')
  commands = parser.add_subparsers(dest='command', parser_class=cli.Parser)
  vocab = commands.add_parser('vocab', help='Train a word-level vocabulary.')
  vocab.add_argument('--source', action='append', required=True,
                     help='A data source as data.source or a data.mixture entry (repeatable).')
  vocab.add_argument('--out', required=True, help='Folder for tokenizer.json.')
  vocab.add_argument('--vocab_size', type=int, default=100_000)
  vocab.add_argument('--min_count', type=int, default=5, help='Rarer words become [UNK].')
  vocab.add_argument('--validation_percent', type=int, default=5,
                     help='Of local sources: the validation share, left out.')
  vocab.add_argument('--data_dir', default='~/.cache/research/tfds')
  vocab.add_argument('--text_field', default='text')
  evaluate = commands.add_parser('evaluate', help='Neighbours and analogy accuracy.')
  evaluate.add_argument('--workdir', help='A word_vectors training run.')
  evaluate.add_argument('--vectors', help='Or a file in the word2vec text format.')
  evaluate.add_argument('--analogies', help='Questions in the questions-words format.')
  evaluate.add_argument('--neighbours', default='', help='Comma-separated words.')
  export = commands.add_parser('export', help='Write the word2vec text format.')
  export.add_argument('--workdir', required=True)
  export.add_argument('--out', required=True)
  for command in (vocab, export):
    command.add_argument('--overwrite', action='store_true',
                         help='Replace the file that --out names or holds.')
  return parser


def main(argv):
  try:
    args = _parser().parse_args(argv[1:])
    if args.command is None:
      raise ValueError('Pass a command first: vocab, evaluate or export.')
    if args.command == 'vocab':
      from research.data import tokenizer as tokenizer_lib
      if args.vocab_size < len(SPECIAL_TOKENS) + 1 or args.min_count < 1:
        raise ValueError('--vocab_size must exceed the 2 special tokens and --min_count must be '
                         'positive.')
      if not 1 <= args.validation_percent <= 50:
        raise ValueError(f'--validation_percent {args.validation_percent} must lie in [1, 50].')
      cli.check_folder(args.out, '--out')
      _check_overwrite(os.path.join(args.out, 'tokenizer.json'), args.overwrite)
      texts = tokenizer_lib.source_texts(args.source, args.data_dir, args.text_field,
                                         args.validation_percent)
      out = train_vocabulary(texts, args.out, args.vocab_size, args.min_count)
      tokenizer = tokenizer_lib.get('hf:' + out)
      print(f'wrote {out}/tokenizer.json ({tokenizer.vocab_size} tokens)')
      print(f'--config.data.tokenizer={tokenizer.name} --config.model.vocab_size='
            f'{tokenizer.vocab_size}')
    elif args.command == 'evaluate':
      if bool(args.workdir) == bool(args.vectors):
        raise ValueError('Pass one of --workdir (a training run) or --vectors (a word2vec text '
                         'file).')
      if args.analogies and not os.path.isfile(args.analogies):
        raise ValueError(f'--analogies {args.analogies} is not a file; pass a questions-words '
                         'file.')
      if args.workdir:
        vectors, step = from_workdir(args.workdir)
        print(f'# {args.workdir}, step {step}', file=sys.stderr)
      else:
        vectors = read_text(args.vectors)
      neighbours = [w for w in args.neighbours.split(',') if w]
      print('\n'.join(report(vectors, args.analogies, neighbours)))
    else:
      cli.check_file(args.out, '--out')
      _check_overwrite(args.out, args.overwrite)
      vectors, step = from_workdir(args.workdir)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      write_text(args.out, vectors)
      print(f'wrote {args.out} ({len(vectors.words)} words of step {step})')
  except ValueError as error:  # Includes CheckpointError and DataError.
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
