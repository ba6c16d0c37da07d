"""Word vectors: word2vec's pairs, negatives and loss, GloVe's counts and loss, sharded training,
evaluation and export, and a trained run on the planted corpus."""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import config as config_lib
from research import mesh as mesh_lib
from research import train
from research import word_vectors
from research.config import load_config_file
from research.data import global_batch
from research.data import planted
from research.data import sources
from research.models import word_vectors as family
from research.objectives import glove
from research.objectives import word2vec

import runs

CONFIG = os.path.join(runs.REPO, 'configs', 'word_vectors.py')


def _config(variant, **model):
  config = load_config_file(f'{CONFIG}:{variant}')
  config.model.update(model)
  return config


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# word2vec.

def test_pairs_are_the_kept_words_within_the_window_of_one_segment():
  rng = np.random.default_rng(0)
  segment_ids = np.sort(rng.integers(0, 4, (6, 24)), axis=1)[:, ::-1].copy()  # Padding last.
  keep = rng.random((6, 24)) < 0.7
  window = 2
  pairs = jax.jit(word2vec.pair_positions, static_argnums=2)
  order, context, valid = jax.device_get(pairs(segment_ids, keep, window))
  for b in range(6):
    got = {(order[b, p], order[b, context[b, p, c]])
           for p, c in zip(*np.nonzero(valid[b]))}
    want = set()
    for segment in set(segment_ids[b][segment_ids[b] > 0]):
      kept = [p for p in range(24) if keep[b, p] and segment_ids[b, p] == segment]
      want |= {(kept[i], kept[j]) for i, j in itertools.permutations(range(len(kept)), 2)
               if abs(i - j) <= window}
    assert got == want


def test_negatives_follow_the_unigram_distribution_to_the_power_three_quarters():
  frequencies = np.array([0.0, 0.5, 0.3, 0.0, 0.15, 0.05])
  cdf = word2vec.noise_cdf(frequencies)
  seeds = jnp.arange(2000, dtype=jnp.int32)
  draws = np.asarray(jax.jit(word2vec.draw_negatives, static_argnums=2)(cdf, seeds, (100,)))
  draws = draws.ravel()
  observed = np.bincount(draws, minlength=6)
  expected = frequencies ** 0.75 / np.sum(frequencies ** 0.75) * len(draws)
  assert observed[0] == observed[3] == 0  # Words never seen are never drawn.
  seen = expected > 0
  chi_square = np.sum((observed[seen] - expected[seen]) ** 2 / expected[seen])
  assert chi_square < 16.3  # The 0.999 quantile of chi-square with 3 degrees of freedom.
  # And not the unigram distribution itself.
  plain = frequencies[seen] / frequencies.sum() * len(draws)
  assert np.sum((observed[seen] - plain) ** 2 / plain) > 1000
  # A split of special tokens only (a vocabulary made from other text: every word [UNK]) is
  # the data's fault, which the trainer reports in one sentence.
  with pytest.raises(sources.DataError, match='holds no words to draw negatives from'):
    word2vec.noise_cdf(np.zeros(6))


def test_subsampling_keeps_words_with_word2vecs_probability():
  keep = word2vec.keep_probabilities([0.01, 1e-4, 0.0], 1e-3)
  np.testing.assert_allclose(keep, [(math.sqrt(10) + 1) * 0.1, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(word2vec.keep_probabilities([0.5, 0.1], 0.0), [1.0, 1.0])


def _hand_params():
  """Vocabulary of 6 words in 2 dimensions."""
  v = np.array([[0, 0], [0.3, -0.2], [0.5, 0.1], [-0.4, 0.2], [0.2, 0.6], [0, 0]], np.float32)
  u = np.array([[0, 0], [-0.1, 0.4], [0.2, 0.3], [0.6, -0.5], [0.1, -0.3], [0, 0]], np.float32)
  return v, u, {'input': {'embedding': jnp.asarray(v)}, 'output': {'embedding': jnp.asarray(u)}}


def _hand_batch():
  # One row: words 1 2 4 (segment 1), then 3 2 (segment 2), then padding.
  return dict(tokens=jnp.array([[1, 2, 4, 3, 2, 0]]), weights=jnp.array([[1, 1, 1, 1, 1, 0.0]]),
              noise=jnp.arange(6, dtype=jnp.int32)[None], positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
              segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]))


@pytest.mark.parametrize('name', ['skipgram', 'cbow'])
def test_word2vec_loss_of_a_hand_made_row_is_the_formula(name):
  config = _config(f'{name}_tiny', vocab_size=6, emb_dim=2)
  config.objective.window, config.objective.negatives = 1, 2
  # Every negative is word 4, the only word the noise distribution knows.
  objective = word2vec.Objective(config, frequencies=np.array([0, 0, 0, 0, 1.0, 0]))
  v, u, params = _hand_params()
  model = family.build(config.model)
  batch = _hand_batch()
  totals, counts = jax.jit(lambda p, b: (objective.sums(model, p, b, None),
                                         objective.counts(b)))(params, batch)
  totals, count = jax.device_get(totals['pairs']), float(counts['pairs'])

  def term(hidden, target):  # A negative equal to the target is left out.
    negatives = 0 if target == 4 else 2
    return -math.log(_sigmoid(u[target] @ hidden)) - negatives * math.log(_sigmoid(-u[4] @ hidden))
  if name == 'skipgram':
    pairs = [(1, 2), (2, 1), (2, 4), (4, 2), (3, 2), (2, 3)]
    want = sum(term(v[c], t) for c, t in pairs)
  else:  # Each centre against the mean of its contexts.
    contexts = [(1, [2]), (2, [1, 4]), (4, [2]), (3, [2]), (2, [3])]
    want = sum(term(np.mean([v[c] for c in ctx], 0), t) for t, ctx in contexts)
    pairs = contexts
  assert count == len(pairs)
  assert totals['loss'] == pytest.approx(want, rel=1e-5)


# GloVe.

class _Store:
  """A token stream with document ids, read as research/data/shards.TokenStore reads."""

  def __init__(self, tokens, docs):
    self.tokens, self.docs, self.num_tokens = np.asarray(tokens), np.asarray(docs), len(tokens)

  def read(self, start, length):
    return self.tokens[start:start + length], self.docs[start:start + length]


def test_cooccurrence_counts_weigh_each_pair_by_one_over_its_distance():
  # Document 0: 5 6 [UNK] 7 5; document 1: 6 7. Special ids (1) are dropped before pairing.
  store = _Store([5, 6, 1, 7, 5, 6, 7], [0, 0, 0, 0, 0, 1, 1])
  want = {}
  for i, j, value in [(5, 6, 1), (6, 7, 1), (7, 5, 1), (5, 7, 1 / 2), (6, 5, 1 / 2),
                      (6, 7, 1)]:  # Window 2 over 5 6 7 5, then 6 7.
    for key in ((i, j), (j, i)):
      want[key] = want.get(key, 0) + value
  for chunk in (2, 3, 100):  # Chunk boundaries change nothing.
    rows, cols, values = glove.cooccurrences(store, 2, 10, special_ids=[0, 1], chunk=chunk)
    assert {(int(i), int(j)): v for i, j, v in zip(rows, cols, values)} == pytest.approx(want)
    assert list(rows * 10 + cols) == sorted(rows * 10 + cols)


def test_glove_loss_is_the_weighted_least_squares_formula():
  config = _config('glove_tiny', vocab_size=6, emb_dim=2)
  objective = glove.Objective(config)
  v, u, params = _hand_params()
  b, c = np.array([0, 0.1, -0.2, 0.3, 0, 0]), np.array([0, -0.1, 0.2, 0.05, 0.4, 0])
  params.update(input_bias={'bias': jnp.asarray(b, jnp.float32)},
                output_bias={'bias': jnp.asarray(c, jnp.float32)})
  entries = [(1, 2, 3.0), (2, 4, 150.0), (3, 1, 0.5)]
  batch = dict(rows=jnp.array([[1, 2, 3, 0]]), cols=jnp.array([[2, 4, 1, 0]]),
               counts=jnp.array([[3.0, 150.0, 0.5, 1.0]]), weights=jnp.array([[1, 1, 1, 0.0]]))
  model = family.build(config.model)
  totals = jax.jit(lambda p, b: objective.sums(model, p, b, None))(params, batch)
  want = sum(min(1, (x / 100) ** 0.75) * (v[i] @ u[j] + b[i] + c[j] - math.log(x)) ** 2
             for i, j, x in entries)
  assert totals['entries']['loss'] == pytest.approx(want, rel=1e-5)
  assert float(objective.counts(batch)['entries']) == 3


def test_glove_rows_are_a_pure_function_of_the_seed_and_visit_each_entry_once_per_epoch():
  values = np.arange(1, 11, dtype=np.float64)
  make = lambda: glove.Entries(np.arange(10), np.arange(10) + 1, values, 4, seed=3, shuffle=True)
  rows = make().rows(0, 6)  # Two epochs of 3 rows (the last of each holds 2 entries).
  assert sorted(rows['counts'][:3][rows['weights'][:3] > 0]) == list(values)
  again = make()
  again.rows(4, 5)  # Reading another epoch first changes nothing.
  for name in rows:
    np.testing.assert_array_equal(again.rows(0, 6)[name], rows[name])


# Training: sharded equals one device, on a real (tiny) planted corpus.

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('planted')
  folder, analogies = planted.generate(str(root), entities=4, count=400, files=10)
  vocab = word_vectors.train_vocabulary(
      [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder))],
      str(root / 'vocab'), min_count=1)
  return root, folder, analogies, vocab


def _tiny(variant, corpus):
  root, folder, _, vocab = corpus
  config = _config(variant, vocab_size=64, emb_dim=16)
  config.data.paths, config.data.tokenizer = folder, f'hf:{vocab}'
  config.data.data_dir = str(root / 'tfds')
  config.train.batch_size, config.train.seq_len = 8, 32
  config.optim.warmup_steps = 0
  if variant != 'glove_tiny':
    config.objective.window, config.objective.negatives = 2, 3
    config.objective.subsample = 0.02  # Also exercised on the mesh.
  return config


def _train(config, mesh_shape, steps=3):
  """Losses of `steps` steps and the parameters after them, the trainer, and the loss of one
  more step on the first batch (to compare with the first: the steps really train)."""
  devices = jax.devices()[:math.prod(mesh_shape.values())]
  for axis, size in mesh_shape.items():
    config.mesh[axis] = size
  shape = config_lib.validate(config, len(devices))
  trainer = train.setup(config, mesh_lib.make_mesh(shape, devices))
  batches = [global_batch.to_global(trainer.pipeline.train_batch(step), trainer.batch_shardings)
             for step in range(steps)]
  state, losses = trainer.state, []
  for batch in batches + batches[:1]:
    params = jax.device_get(state.params)  # Before the state is donated to the step.
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
    losses.append(float(metrics['loss']))
  return losses[:-1], params, trainer, losses[-1]


@pytest.mark.parametrize('variant', ['skipgram_tiny', 'glove_tiny'])
def test_sharded_training_matches_one_device(corpus, variant):
  losses, params, _, again = _train(_tiny(variant, corpus), dict(data=1, fsdp=1, tensor=1))
  assert again < losses[0]  # The steps really train.
  sharded_losses, sharded_params, trainer, _ = _train(_tiny(variant, corpus),
                                                      dict(data=2, fsdp=2, tensor=2))
  table = trainer.state.params['input']['embedding']
  assert tuple(table.sharding.spec) == ('tensor', 'fsdp')  # (vocab, embed) by the rules.
  np.testing.assert_allclose(sharded_losses, losses, rtol=1e-5)
  # Adam's first steps magnify the float noise of another reduction order in small gradients.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-4), params, sharded_params)


def test_configs_that_cannot_train_are_one_sentence(corpus):
  config = _tiny('glove_tiny', corpus)
  config.model.biases = False
  with pytest.raises(config_lib.ConfigError, match='set model.biases=True.$'):
    config_lib.validate(config, 1)
  config = _tiny('skipgram_tiny', corpus)
  config.data.source = 'markov'
  with pytest.raises(config_lib.ConfigError, match='reads documents of words'):
    config_lib.validate(config, 1)
  config = _tiny('cbow_tiny', corpus)
  config.data.tokenizer = 'bytes'  # The configs' default, before a vocabulary of words is built.
  with pytest.raises(config_lib.ConfigError, match='learns a vector per word.*tokenizer=hf:DIR.$'):
    config_lib.validate(config, 1)


# Evaluation and export.

def _hand_vectors():
  words = ['king', 'queen', 'man', 'woman', 'apple', 'pear']
  matrix = [[1, 1, 0, 0], [1, -1, 0, 0], [0, 1, 0.2, 0], [0, -1, 0.1, 0], [0, 0, 1, 0.2],
            [0, 0, 1, 0.3]]
  return word_vectors.Vectors(words, np.asarray(matrix, np.float32))


def test_analogies_and_neighbours_of_hand_made_vectors(tmp_path):
  vectors = _hand_vectors()
  assert [w for w, _ in vectors.neighbours('apple', 2)] == ['pear', 'man']
  path = tmp_path / 'questions.txt'
  path.write_text(': gender\nman woman King queen\nwoman man queen king\nman woman dog cat\n'
                  '\n: fruit\nking queen apple pear\n')
  sections = word_vectors.read_questions(str(path))
  assert list(sections) == ['gender', 'fruit'] and len(sections['gender']) == 3
  results, skipped = vectors.analogies(sections)
  # King is found lowercased; dog and cat are not known; apple - king + queen is not pear.
  assert results == {'gender': (2, 2), 'fruit': (0, 1)} and skipped == 1
  lines = word_vectors.report(vectors, str(path), ['king'])
  assert lines[-1].startswith('accuracy 0.6667 over 3 questions (1 skipped')
  path.write_text('a b c\n')
  with pytest.raises(ValueError, match='line 1 holds 3 words'):
    word_vectors.read_questions(str(path))


def test_planted_analogies_are_not_answered_by_random_vectors(corpus):
  _, _, analogies, _ = corpus
  questions = word_vectors.read_questions(analogies)
  words = sorted({w for rows in questions.values() for row in rows for w in row})
  assert len(words) == 8 and sum(map(len, questions.values())) == 2 * 4 * 3 * 2
  rng = np.random.default_rng(0)
  many = words + [f'x{i}' for i in range(200)]
  results, _ = word_vectors.Vectors(many, rng.normal(size=(len(many), 16))).analogies(questions)
  assert sum(r[0] for r in results.values()) <= 4  # Chance is 1 in 205 per question.


def test_export_round_trips_in_the_word2vec_text_format(tmp_path):
  vectors = _hand_vectors()
  vectors.matrix[0, 0] = 1 / 3
  word_vectors.write_text(str(tmp_path / 'v.txt'), vectors)
  assert (tmp_path / 'v.txt').read_text().splitlines()[0] == '6 4'
  back = word_vectors.read_text(str(tmp_path / 'v.txt'))
  assert back.words == vectors.words
  np.testing.assert_array_equal(back.matrix, vectors.matrix)


def test_command_line_mistakes_are_one_sentence(tmp_path):
  evaluate = lambda *args: runs.in_process('research.word_vectors', 'evaluate', *args)
  runs.assert_error(evaluate(), 'Pass one of --workdir (a training run) or --vectors')
  runs.assert_error(evaluate('--vectors', str(tmp_path / 'none.txt')), 'none.txt is not a file')
  (tmp_path / 'bad.txt').write_text('2 3\nword 1 2\n')
  runs.assert_error(evaluate('--vectors', str(tmp_path / 'bad.txt')), 'line 2 holds 2 numbers')
  (tmp_path / 'bad.txt').write_text('2 2\nword 1 2\nother 1 x\n')
  runs.assert_error(evaluate('--vectors', str(tmp_path / 'bad.txt')),
                    'bad.txt line 3 holds a value that is not a number')
  (tmp_path / 'bad.txt').write_text('2 2\nword 1 2\nword 3 4\n')
  runs.assert_error(evaluate('--vectors', str(tmp_path / 'bad.txt')),
                    "bad.txt line 3 repeats the word 'word' of line 2; keep one vector per word.")
  (tmp_path / 'good.txt').write_text('2 2\nword 1 2\nother 3 4\n')
  (tmp_path / 'questions.txt').write_text(': capitals\nparis france rome italy\n')
  runs.assert_error(evaluate('--vectors', str(tmp_path / 'good.txt'), '--analogies',
                             str(tmp_path / 'questions.txt')),
                    'questions.txt holds no question whose four words are all in the vocabulary '
                    '(1 skipped)')
  runs.assert_error(evaluate('--workdir', str(tmp_path)), 'holds no config.json')
  decoder = load_config_file(os.path.join(runs.REPO, 'configs', 'decoder.py') + ':tiny')
  (tmp_path / 'config.json').write_text(decoder.to_json())
  runs.assert_error(evaluate('--workdir', str(tmp_path)),
                    "model.family='decoder' model, which has no word vectors; pass the workdir "
                    'of a word_vectors run.')
  runs.assert_error(runs.in_process('research.word_vectors', 'train'), 'invalid choice')
  vocab = lambda *args: runs.in_process('research.word_vectors', 'vocab', '--source',
                                       f'text:{tmp_path / "empty.txt"}', *args)
  (tmp_path / 'empty.txt').write_text('')
  runs.assert_error(vocab('--out', str(tmp_path / 'vocab')),
                    'No word occurs 5 times or more in the training text of --source')
  assert not (tmp_path / 'vocab').exists()
  runs.assert_error(vocab('--out', str(tmp_path / 'vocab'), '--validation_percent', '150'),
                    '--validation_percent 150 must lie in [1, 50].')
  (tmp_path / 'saved').mkdir()
  (tmp_path / 'saved' / 'tokenizer.json').write_text('{}')
  runs.assert_error(vocab('--out', str(tmp_path / 'saved')),
                    'saved/tokenizer.json exists; pass another --out, or --overwrite to replace '
                    'it.')
  assert (tmp_path / 'saved' / 'tokenizer.json').read_text() == '{}'


# The command lines, end to end.

@pytest.mark.slow
@pytest.mark.parametrize('variant', ['skipgram_tiny', 'glove_tiny'])
def test_trained_vectors_answer_the_planted_analogies(tmp_path, variant):
  runs.ok(runs.in_process('research.data.planted', '--out', str(tmp_path / 'planted')))
  corpus = tmp_path / 'planted' / 'corpus'
  runs.ok(runs.in_process('research.word_vectors', 'vocab', '--source', f'text:{corpus}',
                          '--out', str(tmp_path / 'vocab'), '--min_count', '1'))
  workdir = tmp_path / 'run'
  runs.ok(runs.command(
      'research.train', '--config', f'configs/word_vectors.py:{variant}', '--workdir',
      str(workdir), f'--config.data.paths={corpus}',
      f'--config.data.tokenizer=hf:{tmp_path / "vocab"}',
      f'--config.data.data_dir={tmp_path / "tfds"}', '--config.train.num_steps=100',
      '--config.train.progress_bar=False', '--config.train.tensorboard=False',
      '--cpu_devices=1'))
  result = runs.ok(runs.in_process('research.word_vectors', 'evaluate', '--workdir',
                                   str(workdir), '--analogies',
                                   str(tmp_path / 'planted' / 'analogies.txt')))
  last = result.stdout.strip().splitlines()[-1]
  accuracy, chance = float(last.split()[1]), float(last.rstrip(')').split()[-1])
  assert 'over 528 questions (0 skipped' in last
  assert accuracy > 0.5 and accuracy > 20 * chance, result.stdout
  runs.ok(runs.in_process('research.word_vectors', 'export', '--workdir', str(workdir), '--out',
                          str(tmp_path / 'vectors.txt')))
  export = lambda out, *args: runs.in_process('research.word_vectors', 'export', '--workdir',
                                              str(workdir), '--out', str(out), *args)
  config = (workdir / 'config.json').read_text()
  runs.assert_error(export(workdir / 'config.json'), 'config.json exists; pass another --out, '
                                                      'or --overwrite to replace it.')
  assert (workdir / 'config.json').read_text() == config
  runs.assert_error(export(tmp_path / 'vectors.txt'), 'vectors.txt exists')
  runs.ok(export(tmp_path / 'vectors.txt', '--overwrite'))
  exported = runs.ok(runs.in_process('research.word_vectors', 'evaluate', '--vectors',
                                     str(tmp_path / 'vectors.txt'), '--analogies',
                                     str(tmp_path / 'planted' / 'analogies.txt')))
  assert exported.stdout == result.stdout
