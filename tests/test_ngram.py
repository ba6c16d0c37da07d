"""The interpolated modified Kneser-Ney n-gram family: hand-computed probabilities, normalisation,
packed rows, the sorted/hashed count store, and the counted path of research.train."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import runs
from research.models import ngram
from research.objectives import causal_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A, B, C = 0, 1, 2  # The hand example's vocabulary: three ids, BOS = 3.
BOS = 3


def _rows(documents, seq_len):
  """Documents packed into rows as the causal-LM pipeline packs them (one example each)."""
  transform = causal_lm.Transform()
  examples = [transform.example(np.asarray(d), 0, 0, 'train') for d in documents]
  return transform.pack(examples, seq_len)


def _fit(spec, *batches):
  counter = ngram.Counter(spec)
  for rows in batches:
    counter.add(rows)
  return counter.fit()


def _random_documents(rng, vocab, count, low=2, high=40):
  # A skewed distribution: some n-grams recur, so every count of counts occurs.
  p = 1.0 / np.arange(1, vocab + 1)
  return [rng.choice(vocab, rng.integers(low, high), p=p / p.sum()) for _ in range(count)]


def _prob(model, context, word):
  return float(model.probs(np.array([context]), np.array([[word]]))[0, 0])


@pytest.mark.parametrize('hashed', [False, True])
def test_hand_computed_order_3_example(hashed):
  # Two documents, 'a b a b c' and 'a b c', packed in one row. Events (history -> target), a
  # segment starting after BOS: [BOS a] b, [BOS a b] a, [a b a] b, [b a b] c | [BOS a] b, [a b] c.
  rows = _rows([[A, B, A, B, C], [A, B, C]], 8)
  contexts, targets, _ = ngram.histories(rows, 3, 3)
  np.testing.assert_array_equal(contexts, [[BOS, A], [A, B], [B, A], [A, B], [BOS, A], [A, B]])
  np.testing.assert_array_equal(targets, [B, A, B, C, B, C])
  model = _fit(ngram.NgramSpec(3, 3, hashed), rows)
  unigrams, bigrams, trigrams = model.orders

  def count(order, *ids):
    index, found = ngram.lookup(order.keys, ngram.encode([np.array([i]) for i in ids],
                                                        model.spec))
    return int(order.counts[index[0]]) if found[0] else 0

  # Trigrams keep raw counts: BOS a b 2, a b a 1, b a b 1, a b c 2.
  assert [count(trigrams, *g) for g in ([BOS, A, B], [A, B, A], [B, A, B], [A, B, C])] == [2, 1,
                                                                                           1, 2]
  assert len(trigrams.keys) == 4
  # Bigrams take continuation counts: a b follows {BOS, b} -> 2 (raw 3); b a follows {a} -> 1;
  # b c follows {a} -> 1 (raw 2).
  assert [count(bigrams, *g) for g in ([A, B], [B, A], [B, C])] == [2, 1, 1]
  # Unigrams: b after {a}, a after {b}, c after {b}: 1 each (raw 3, 1, 2).
  assert [count(unigrams, g) for g in (A, B, C)] == [1, 1, 1]
  # No order has counts of counts n1..n4 all non-zero: KenLM's fallback discounts everywhere.
  assert [o.discounts for o in model.orders] == [ngram.FALLBACK_DISCOUNTS] * 3

  # Order 1: T = 3, gamma = 0.5 * 3 / 3 = 1/2, p1(w) = (1 - 0.5) / 3 + 1/2 * 1/3 = 1/3.
  # Order 2, context a: T = 2 (a b: 2), gamma = 1 * 1 / 2 = 1/2:
  #   p2(b|a) = (2 - 1) / 2 + 1/2 * 1/3 = 2/3, p2(a|a) = p2(c|a) = 1/6.
  # Order 2, context b: T = 2 (b a: 1, b c: 1), gamma = 0.5 * 2 / 2 = 1/2:
  #   p2(a|b) = p2(c|b) = 0.5 / 2 + 1/6 = 5/12, p2(b|b) = 1/6.
  # Order 3, context (BOS a): T = 2, gamma = 1 * 1 / 2 = 1/2:
  #   p3(b|BOS a) = (2 - 1) / 2 + 1/2 * 2/3 = 5/6, p3(a|BOS a) = 1/2 * 1/6 = 1/12.
  # Order 3, context (a b): T = 3 (a b a: 1, a b c: 2), gamma = (0.5 + 1) / 3 = 1/2:
  #   p3(a|a b) = 0.5 / 3 + 1/2 * 5/12 = 3/8, p3(c|a b) = 1 / 3 + 5/24 = 13/24,
  #   p3(b|a b) = 1/2 * 1/6 = 1/12.
  # Order 3, context (b a): T = 1, gamma = 1/2: p3(b|b a) = 0.5 + 1/2 * 2/3 = 5/6.
  # Unseen context (c a): p3 = p2(.|a); (c c): p2(.|c) is unseen too, so p1 = 1/3.
  expected = {((BOS, A), B): 5 / 6, ((BOS, A), A): 1 / 12, ((A, B), A): 3 / 8,
              ((A, B), C): 13 / 24, ((A, B), B): 1 / 12, ((B, A), B): 5 / 6,
              ((C, A), B): 2 / 3, ((C, A), C): 1 / 6, ((C, B), A): 5 / 12, ((C, C), A): 1 / 3}
  for (context, word), value in expected.items():
    assert _prob(model, context, word) == pytest.approx(value, rel=1e-6), (context, word)


def test_discounts_from_counts_of_counts_by_hand():
  # n1 = 10, n2 = 4, n3 = 2, n4 = 1 (and a count of 7, which only the totals see).
  adjusted = np.array([1] * 10 + [2] * 4 + [3] * 2 + [4, 7])
  # Y = 10 / (10 + 2 * 4) = 5/9; D1 = 1 - 2 * 5/9 * 4/10 = 5/9; D2 = 2 - 3 * 5/9 * 2/4 = 7/6;
  # D3+ = 3 - 4 * 5/9 * 1/2 = 17/9.
  np.testing.assert_allclose(ngram.discounts(adjusted), [5 / 9, 7 / 6, 17 / 9], rtol=1e-12)
  # No 4s: n4 = 0 leaves the formula without D3+'s estimate, so the fallback applies.
  assert ngram.discounts(adjusted[adjusted != 4]) == ngram.FALLBACK_DISCOUNTS
  # The same counts as one order of two contexts: context 0 is followed by words of counts 1, 2
  # and 4 (T = 7), context 1 by the rest (nine 1s, three 2s, 3, 3 and 7: T = 28).
  counts = np.array([1, 2, 4] + [1] * 9 + [2] * 3 + [3, 3, 7])
  order = ngram.Order.of(np.arange(18, dtype=np.uint64), counts,
                         np.array([0] * 3 + [1] * 15, np.uint64))
  assert order.totals.tolist() == [7, 28]
  # gamma = (D1 N1 + D2 N2 + D3+ N3+) / T: (5/9 + 7/6 + 17/9) / 7 = 65/126 and
  # (9 * 5/9 + 3 * 7/6 + 3 * 17/9) / 28 = 85/168.
  np.testing.assert_allclose(order.gammas, [65 / 126, 85 / 168], rtol=1e-6)


@pytest.mark.parametrize('order', [1, 2, 3, 4, 5])
def test_every_context_distribution_sums_to_one(order):
  rng = np.random.default_rng(order)
  vocab = 6
  model = _fit(ngram.NgramSpec(order, vocab, False),
               _rows(_random_documents(rng, vocab, 60), 512))
  if order >= 2:  # Enough data that discounts come from the formula, not only the fallback.
    assert any(o.discounts != ngram.FALLBACK_DISCOUNTS for o in model.orders)
  # Seen and unseen histories, of every length a segment allows (BOS and NONE included).
  contexts, _, _ = ngram.histories(_rows(_random_documents(rng, vocab, 20), 256), order, vocab)
  contexts = np.concatenate([contexts, rng.integers(0, vocab, contexts.shape)])
  p = model.probs(contexts, np.broadcast_to(np.arange(vocab), (len(contexts), vocab)))
  assert np.all(p > 0)
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_a_segment_boundary_resets_the_context():
  rng = np.random.default_rng(0)
  vocab = 5
  model = _fit(ngram.NgramSpec(4, vocab, False), _rows(_random_documents(rng, vocab, 80), 256))
  first, second = rng.integers(0, vocab, 9), rng.integers(0, vocab, 7)
  packed = _rows([first, second], 32)
  alone = [_rows([document], 32) for document in (first, second)]
  assert packed['segment_ids'].max() == 2

  def scores(rows):
    contexts, targets, _ = ngram.histories(rows, 4, vocab)
    return model.probs(contexts, targets[:, None])[:, 0]

  np.testing.assert_array_equal(scores(packed), np.concatenate([scores(rows) for rows in alone]))
  together, apart = model.sums(packed), [model.sums(rows) for rows in alone]
  for name in ('loss', 'correct', 'count'):
    assert together[name] == pytest.approx(sum(s[name] for s in apart), rel=1e-12)
  # Counting too: a packed row adds exactly the n-grams of its documents.
  a, b = _fit(model.spec, packed), _fit(model.spec, *alone)
  for x, y in zip(a.orders, b.orders):
    np.testing.assert_array_equal(x.keys, y.keys)
    np.testing.assert_array_equal(x.counts, y.counts)


def test_sums_score_the_weighted_targets_with_their_argmax():
  model = _fit(ngram.NgramSpec(3, 3, False), _rows([[A, B, A, B, C], [A, B, C]], 8))
  rows = _rows([[A, B, C], [A, B, A]], 8)
  rows['weights'][0, 1] = 0.0  # b -> c is not scored.
  # Scored: [BOS a] b (5/6, the argmax) and [BOS a] b again, then [a b] a (3/8, but c's 13/24
  # is the argmax).
  sums = model.sums(rows)
  assert sums['count'] == 3 and sums['correct'] == 2
  assert sums['loss'] == pytest.approx(-2 * np.log(5 / 6) - np.log(3 / 8), rel=1e-6)


@pytest.mark.parametrize('hashed', [False, True])
def test_counting_in_chunks_equals_counting_at_once(hashed):
  rng = np.random.default_rng(1)
  spec = ngram.NgramSpec(5, 7, hashed)
  batches = [_rows(_random_documents(rng, 7, 12), 64) for _ in range(9)]
  whole = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
  chunked, at_once = ngram.Counter(spec), ngram.Counter(spec)
  for rows in batches:
    chunked.add(rows)
  at_once.add(whole)
  assert max(len(runs) for runs in chunked.runs) > 1  # Several runs still wait to be merged.
  for k in range(1, 6):
    a, b = chunked.raw(k), at_once.raw(k)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.counts, b.counts)
    assert np.all(a.keys[1:] > a.keys[:-1])
    if hashed:
      np.testing.assert_array_equal(a.links, b.links)


def test_hashed_keys_give_the_probabilities_of_exact_keys(tmp_path):
  rng = np.random.default_rng(2)
  batches = [_rows(_random_documents(rng, 6, 30), 128) for _ in range(3)]
  exact = _fit(ngram.NgramSpec(4, 6, False), *batches)
  hashed = _fit(ngram.NgramSpec(4, 6, True), *batches)
  contexts, targets, _ = ngram.histories(_rows(_random_documents(rng, 6, 10), 128), 4, 6)
  words = np.broadcast_to(np.arange(6), (len(targets), 6))
  np.testing.assert_allclose(hashed.probs(contexts, words), exact.probs(contexts, words),
                             rtol=1e-12)
  assert [o.discounts for o in hashed.orders] == [o.discounts for o in exact.orders]
  assert ngram.NgramSpec.from_config(_model(order=5, vocab_size=7131)).hashed  # 7132^5 > 2^64.
  assert not ngram.NgramSpec.from_config(_model(order=5, vocab_size=7130)).hashed
  # The store round-trips through its npz.
  path = str(tmp_path / 'counts.npz')
  hashed.save(path, dict(order=4))
  assert os.listdir(tmp_path) == ['counts.npz'] and ngram.saved_settings(path) == dict(order=4)
  loaded = ngram.Model.load(path, hashed.spec)
  np.testing.assert_array_equal(loaded.probs(contexts, words), hashed.probs(contexts, words))


def _model(**values):
  return ml_collections.ConfigDict({**dict(family='ngram', order=3, vocab_size=264, max_len=256),
                                    **values})


def test_check_config_refuses_orders_outside_one_to_five():
  for order in (0, 6):
    with pytest.raises(ValueError, match=r'model.order=\d must be an integer from 1 to 5\.'):
      ngram.check_config(_model(order=order))
  ngram.check_config(_model(order=5))
  assert ngram.sharded_heads(_model()) == {}


def _train(workdir, data_dir, order, *overrides):
  return subprocess.run(
      [sys.executable, '-m', 'research.train', '--config', 'configs/ngram.py:kn3',
       '--workdir', str(workdir), f'--config.data.data_dir={data_dir}',
       f'--config.model.order={order}', '--config.train.num_steps=30', *overrides,
       '--config.train.progress_bar=False', '--config.train.tensorboard=False', '--cpu_devices=1'],
      cwd=REPO, capture_output=True, text=True, timeout=600)


def _final(workdir):
  lines = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return lines[-1], len(lines)


@pytest.mark.slow
def test_counted_runs_on_the_default_corpus(tmp_path):
  data_dir = tmp_path / 'tfds'
  trigram, unigram = tmp_path / 'kn3', tmp_path / 'kn1'
  first = _train(trigram, data_dir, 3)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'final eval_loss=' in first.stdout
  final, lines = _final(trigram)
  assert lines == 1 and final['step'] == 30
  assert set(final) == {'step', 'eval_loss', 'eval_accuracy', 'eval_perplexity',
                        'eval_bits_per_byte'}
  # Byte tokens: a little over one bit per byte per bit per token (eos spells no byte).
  assert final['eval_bits_per_byte'] >= final['eval_loss'] / np.log(2)
  assert json.load(open(trigram / 'config.json'))['model']['family'] == 'ngram'

  result = _train(unigram, data_dir, 1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert final['eval_loss'] < _final(unigram)[0]['eval_loss'] - 0.5

  store = trigram / 'ngram' / 'counts.npz'
  saved = os.stat(store).st_mtime_ns
  again = _train(trigram, data_dir, 3)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Reusing the counts' in again.stderr and 'Counted' not in again.stderr
  assert os.stat(store).st_mtime_ns == saved
  assert _final(trigram) == (final, 2)

  # One workdir, one model: other model settings are refused before anything is written.
  before = os.listdir(trigram)
  other = _train(trigram, data_dir, 2)
  assert other.returncode == 2, other.stderr[-3000:]
  assert other.stderr.strip().splitlines()[-1] == (
      f'error: The counts in {store} were made for a different model (model.order: 3 there, 2 '
      'here); rerun with the settings they were made with, or pass another --workdir.')
  assert os.stat(store).st_mtime_ns == saved and _final(trigram) == (final, 2)
  assert sorted(os.listdir(trigram)) == sorted(before)
  # Nor are counts over more rows replaced by counts over fewer, or over other rows.
  for overrides, sentence in (
      (['--config.train.num_steps=20'], f'error: The counts in {store} cover '
       'train.num_steps=30, more than the 20 asked for; rerun with --config.train.num_steps=30 '
       '(or more, to count further), or pass another --workdir.'),
      (['--config.train.batch_size=4', '--config.seed=1'], f'error: The counts in {store} were '
       'made under other settings (train.batch_size, seed differ); rerun with the settings they '
       'were made with, or pass another --workdir.')):
    refused = _train(trigram, data_dir, 3, *overrides)
    assert (refused.returncode, refused.stderr.strip().splitlines()[-1]) == (2, sentence)
    assert os.stat(store).st_mtime_ns == saved and sorted(os.listdir(trigram)) == sorted(before)
  more = _train(trigram, data_dir, 3, '--config.train.num_steps=40')
  assert more.returncode == 0, more.stderr[-3000:]
  assert (f'The counts in {store} cover train.num_steps=30; counting afresh over 40.'
          in more.stderr)
  assert _final(trigram)[0]['step'] == 40

  # A counted run has no network to write as a Hugging Face model.
  line = runs.error_line(runs.command('research.convert', 'to_hf', '--workdir', str(trigram),
                                      '--out', str(tmp_path / 'hf')))
  assert line.startswith('error: model.family=ngram is fitted by counting and has no network to '
                         'plan, benchmark, sample, convert or distil;'), line
  assert not os.path.exists(tmp_path / 'hf')
