"""Interpolated modified Kneser-Ney n-gram language model (family `ngram`), fitted by counting.

A counted baseline for the neural families: research/counting.py counts the rows of the same
training batches a neural run reads (the causal-LM pipeline) and scores the validation rows with
the causal-LM objective's metrics, so its loss is in nats per token and bits per byte like theirs.
The smoothing is Chen & Goodman's (1998) interpolated modified Kneser-Ney, the form KenLM and
SRILM `-interpolate -kndiscount` use, with the lowest order interpolated with a uniform
distribution over the model.vocab_size ids (every id has non-zero probability).

Events. Each weighted target of a row is one event: the target and the tokens before it within
its segment (packed examples never see each other). A segment's first token follows a virtual
BOS id = vocab_size, the start of a sequence: the start of a document, or the first token of a
window cut mid-document (whose earlier tokens a neural model does not see either). So the
target at offset j of a segment (its (j+2)-th token) has at most j + 2 tokens of history (BOS
included) and takes n-grams up to order min(N, j + 3); nothing precedes BOS.

Formulas, for N = model.order, 1 <= k <= N, a k-gram hw (context h of k - 1 ids, last id w) and
h' = h without its first id:
  c(hw)          events whose last k ids are hw (raw count)
  a_k(hw)        adjusted count: c(hw) if k = N or hw starts with BOS, else the continuation
                 count N1+(. hw) = |{v : c(v hw) > 0}| (every other k-gram has a left neighbour)
  n_r            number of k-grams with a_k = r (r = 1..4), per order
  Y              n_1 / (n_1 + 2 n_2)
  D_k(1), D_k(2), D_k(3+) = 1 - 2 Y n_2 / n_1,  2 - 3 Y n_3 / n_2,  3 - 4 Y n_4 / n_3
                 (KenLM's --discount_fallback 0.5, 1, 1.5 when a count of counts is 0 or a
                 discount leaves (0, r]: tiny corpora)
  T_k(h)         sum_v a_k(hv);  N_r(h) = |{v : a_k(hv) = r}| for r = 1, 2 and N_3(h) for >= 3
  gamma_k(h)     (D_k(1) N_1(h) + D_k(2) N_2(h) + D_k(3+) N_3(h)) / T_k(h)
  p_0(w)         1 / vocab_size
  p_k(w | h)     (a_k(hw) - D_k(a_k(hw))) / T_k(h) + gamma_k(h) p_{k-1}(w | h')  if T_k(h) > 0
                 p_{k-1}(w | h')  otherwise (an unseen context passes all its mass down)
with D_k(0) = 0. An event with k_max ids of n-gram (history + target, see Events) is scored by
p_{k_max}. Each order sums to one: sum_w (a_k(hw) - D_k(a_k(hw))) = T_k(h) - gamma_k(h) T_k(h).

Keys. Every n-gram is one uint64 key, its ids folded left to right: exactly sum_i w_i B^(k-i)
with B = vocab_size + 1 when B^N <= 2^64 (bytes: B = 265 stays exact up to order 7; a 32k
vocabulary up to order 4), otherwise a 64-bit mixing hash of the same fold (a collision merges
two n-grams; among 10^8 n-grams the chance of any is about 3e-4). The context of an n-gram and
its suffix (its last k - 1 ids) are then keys of order k - 1: arithmetic (key // B, key % B^(k-1))
when exact, carried beside the key while counting when hashed. Counts are sorted key arrays:
each chunk of rows is reduced with np.unique and merged into runs of similar size (so merging
costs O(n log n) overall), and look-ups are np.searchsorted over whole batches.

Memory and time (measured on one core of a busy 2-core CPU). The fitted store keeps per order
the n-gram keys and adjusted counts (12 bytes each) and per context its key, T_k and gamma_k
(16 bytes each): 17.7-18.7 bytes per n-gram for order 5 on the standard-library corpus (613k
n-grams from 2.5M tokens), 19.8-22.3 on synthetic streams. Counting 8M tokens at order 5 takes
10 s with exact keys (25 s hashed) on a Markov stream (2.4M n-grams), and 55 s on uniform random
bytes, the worst case (22M n-grams, 2.8 per token): its numpy peak is 0.66 GB while adding rows
and 1.1 GB while fitting, about 50 bytes per n-gram. So 100M tokens cost 2-12 minutes of
counting (plus the pipeline's reading of the rows, about 3 s per million tokens) and, for text
at 0.25-0.5 n-grams per token, 25-50M n-grams: a store of 0.5-1 GB and 1.5-2.5 GB while fitting
(14 GB only for 100M random bytes).
"""

import dataclasses
import json
import os
import zipfile

import numpy as np

COUNTED = True  # Fitted by research/counting.py, not by gradient steps.
GENERATES_TEXT = False  # research/decode.py cannot sample from it.
MAX_ORDER = 5
NONE = -1  # A history slot before the sequence start (not even BOS).
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)

_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)


@dataclasses.dataclass(frozen=True)
class NgramSpec:
  """What counting and scoring need, translated once from `config.model`."""
  order: int
  vocab_size: int
  hashed: bool  # Keys are hashes: exact keys of (vocab_size + 1)^order values overflow 64 bits.

  @classmethod
  def from_config(cls, model):
    return cls(order=model.order, vocab_size=model.vocab_size,
               hashed=(model.vocab_size + 1) ** model.order > 2 ** 64)


def spec_from_config(model_config):
  return NgramSpec.from_config(model_config)


def check_config(model_config):
  """Raises ValueError, in one sentence, for settings this family cannot count."""
  order = model_config.order
  if not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
    raise ValueError(f'model.order={order!r} must be an integer from 1 to {MAX_ORDER}.')


def sharded_heads(model_config):
  del model_config  # Nothing is sharded: counts live on the host.
  return {}


# Keys.

def extend(keys, ids, spec):
  """Keys of the n-grams `keys` (uint64) followed by `ids` (broadcast against them)."""
  ids = np.asarray(ids).astype(np.uint64)
  if not spec.hashed:
    return keys * np.uint64(spec.vocab_size + 1) + ids
  h = (keys ^ (ids + np.uint64(1))) * _MIX
  h = (h ^ (h >> np.uint64(30))) * _MIX2
  return h ^ (h >> np.uint64(31))


def encode(columns, spec, size=None):
  """Keys of the n-grams whose ids are `columns` (a list of id arrays, first id first, BOS
  included); no columns give `size` empty keys 0."""
  keys = np.zeros(len(columns[0]) if columns else size, np.uint64)
  for ids in columns:
    keys = extend(keys, ids, spec)
  return keys


def _context_and_suffix(keys, order, spec):
  """(context, suffix) keys of exact order-`order` keys: their first and last order - 1 ids."""
  base = np.uint64(spec.vocab_size + 1)
  return keys // base, keys % (base ** np.uint64(order - 1))


# Events.

def histories(rows, order, vocab_size):
  """The events of a batch of rows (tokens, targets, weights, positions): (contexts [P, order-1]
  of the ids before each target, oldest first, BOS at a segment start and NONE before it;
  targets [P]; weights [P]) for the P positions of non-zero weight."""
  tokens, positions = np.asarray(rows['tokens']), np.asarray(rows['positions'])
  keep = np.asarray(rows['weights']) > 0
  columns = []
  for back in range(order - 2, -1, -1):  # Slot `back` holds tokens[i - back], oldest first.
    shifted = np.full_like(tokens, NONE)
    shifted[:, back:] = tokens[:, :tokens.shape[1] - back]
    shifted = np.where(back <= positions, shifted, NONE)
    columns.append(np.where(back == positions + 1, vocab_size, shifted)[keep])
  contexts = np.stack(columns, 1) if columns else np.zeros((keep.sum(), 0), np.int32)
  return (contexts.astype(np.int64), np.asarray(rows['targets'])[keep].astype(np.int64),
          np.asarray(rows['weights'])[keep].astype(np.float64))


def _keys(contexts, targets, k, spec):
  """Keys of the order-k n-grams of the events whose history is long enough (mask), and when
  hashed their [context, suffix] keys."""
  first = contexts.shape[1] - (k - 1)
  mask = np.ones(len(targets), bool) if k == 1 else contexts[:, first] != NONE
  columns = [contexts[:, c] for c in range(first, contexts.shape[1])] + [targets]
  keys = encode(columns, spec)[mask]
  if not spec.hashed:
    return keys, None
  links = np.stack([encode(columns[:-1], spec, len(targets)),
                    encode(columns[1:], spec, len(targets))], 1)
  return keys, links[mask]


# Counting.

@dataclasses.dataclass
class Run:
  """Distinct keys (sorted), their counts and, when hashed, their [context, suffix] keys."""
  keys: np.ndarray
  counts: np.ndarray
  links: np.ndarray = None

  @classmethod
  def of(cls, keys, links=None):
    if links is None:  # Sorting the keys alone is faster than argsort.
      keys, counts = np.unique(keys, return_counts=True)
      return cls(keys, counts.astype(np.uint32))
    keys, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return cls(keys, counts.astype(np.uint32), links[first])

  def nbytes(self):
    return self.keys.nbytes + self.counts.nbytes + (0 if self.links is None else self.links.nbytes)


def merge(a, b):
  """One run of the n-grams of runs `a` and `b`, counts added."""
  keys = np.concatenate([a.keys, b.keys])
  order = np.argsort(keys, kind='stable')  # Two sorted runs: a linear merge.
  keys = keys[order]
  starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
  counts = np.add.reduceat(np.concatenate([a.counts, b.counts])[order], starts)
  links = None if a.links is None else np.concatenate([a.links, b.links])[order][starts]
  return Run(keys[starts], counts.astype(np.uint32), links)


class Counter:
  """Raw counts of every order, chunk by chunk: add(rows) repeatedly, then fit()."""

  def __init__(self, spec):
    self.spec = spec
    self.runs = [[] for _ in range(spec.order)]  # Per order, runs of decreasing size.
    self.events = 0

  def add(self, rows):
    contexts, targets, _ = histories(rows, self.spec.order, self.spec.vocab_size)
    self.events += len(targets)
    for k in range(1, self.spec.order + 1):
      self._push(self.runs[k - 1], Run.of(*_keys(contexts, targets, k, self.spec)))

  @staticmethod
  def _push(runs, run):
    runs.append(run)
    while len(runs) > 1 and len(runs[-2].keys) <= 2 * len(runs[-1].keys):
      last = runs.pop()
      runs.append(merge(runs.pop(), last))

  def nbytes(self):
    return sum(run.nbytes() for runs in self.runs for run in runs)

  def raw(self, k):
    """The merged raw counts of order k."""
    runs = self.runs[k - 1]
    while len(runs) > 1:
      last = runs.pop()
      runs.append(merge(runs.pop(), last))
    return runs[0] if runs else Run(np.zeros(0, np.uint64), np.zeros(0, np.uint32))

  def fit(self):
    """The fitted model (the raw runs are consumed)."""
    spec = self.spec
    orders, above = [None] * spec.order, None
    for k in range(spec.order, 0, -1):
      run = self.raw(k)
      contexts, suffixes = (_context_and_suffix(run.keys, k, spec) if run.links is None
                            else (run.links[:, 0], run.links[:, 1]))
      adjusted = run.counts.copy()
      if above is not None:  # Continuation counts, where a left neighbour exists.
        keys, continuations = np.unique(above, return_counts=True)
        index, found = lookup(keys, run.keys)
        adjusted[found] = continuations[index[found]]
      orders[k - 1] = Order.of(run.keys, adjusted, contexts)
      above = suffixes
      self.runs[k - 1] = []
    return Model(spec, orders, self.events)


def discounts(adjusted):
  """(D(1), D(2), D(3+)) of one order's adjusted counts (see the module docstring)."""
  n = [int(np.count_nonzero(adjusted == r)) for r in (1, 2, 3, 4)]
  if min(n) == 0:
    return FALLBACK_DISCOUNTS
  y = n[0] / (n[0] + 2 * n[1])
  d = tuple(r - (r + 1) * y * n[r] / n[r - 1] for r in (1, 2, 3))
  return d if all(0 < value <= r for r, value in zip((1, 2, 3), d)) else FALLBACK_DISCOUNTS


def lookup(keys, queries):
  """(index, found) of `queries` in the sorted `keys`."""
  index = np.minimum(np.searchsorted(keys, queries), max(len(keys) - 1, 0))
  found = keys[index] == queries if len(keys) else np.zeros(np.shape(queries), bool)
  return index, found


@dataclasses.dataclass
class Order:
  """One order of the fitted model: n-gram keys with adjusted counts, and per context T and
  gamma."""
  keys: np.ndarray
  counts: np.ndarray
  context_keys: np.ndarray
  totals: np.ndarray
  gammas: np.ndarray
  discounts: tuple

  @classmethod
  def of(cls, keys, adjusted, contexts):
    d, grouped = discounts(adjusted), adjusted
    if np.any(contexts[1:] < contexts[:-1]):  # Hashed: a context's n-grams lie apart.
      order = np.argsort(contexts, kind='stable')
      contexts, grouped = contexts[order], adjusted[order]
    starts = np.flatnonzero(np.concatenate([[True], contexts[1:] != contexts[:-1]]))
    if not len(keys):  # No history was long enough for this order.
      starts = np.zeros(0, np.int64)
    per = lambda values: np.add.reduceat(values, starts) if len(starts) else values[:0]
    totals = per(grouped.astype(np.uint64))
    mass = per(np.asarray((0.0,) + d)[np.minimum(grouped, 3)])  # D(0) = 0.
    return cls(keys, adjusted.astype(np.uint32), contexts[starts], totals.astype(np.uint32),
               (mass / np.maximum(totals, 1)).astype(np.float32), d)

  def nbytes(self):
    return sum(a.nbytes for a in (self.keys, self.counts, self.context_keys, self.totals,
                                  self.gammas))


class Model:
  """The fitted n-gram model: probabilities of whole batches of events."""

  def __init__(self, spec, orders, events):
    self.spec, self.orders, self.events = spec, orders, events

  @property
  def num_ngrams(self):
    return sum(len(o.keys) for o in self.orders)

  def nbytes(self):
    return sum(o.nbytes() for o in self.orders)

  def probs(self, contexts, words):
    """p(words | contexts): contexts [P, order-1] as from `histories`, words [P, W] ids ->
    [P, W] float64 probabilities (p_{k_max} of the module docstring)."""
    spec = self.spec
    p = np.full(words.shape, 1.0 / spec.vocab_size)
    for k, o in enumerate(self.orders, 1):
      if not len(o.context_keys):  # Rows too short for this order: nothing was counted.
        continue
      first = contexts.shape[1] - (k - 1)
      valid = np.ones(len(contexts), bool) if k == 1 else contexts[:, first] != NONE
      context = encode([np.maximum(contexts[:, c], 0) for c in range(first, contexts.shape[1])],
                       spec, len(contexts))
      index, seen = lookup(o.context_keys, context)
      seen &= valid
      total = np.maximum(o.totals[index], 1).astype(np.float64)[:, None]
      gamma = o.gammas[index].astype(np.float64)[:, None]
      where, found = lookup(o.keys, extend(context[:, None], words, spec))
      counts = np.where(found, o.counts[where], 0)
      d = np.asarray((0.0,) + o.discounts)[np.minimum(counts, 3)]  # D(0) = 0.
      p = np.where(seen[:, None], (counts - d) / total + gamma * p, p)
    return p

  def sums(self, rows, block=1 << 20):
    """{'loss': sum of -weight ln p(target), 'correct': weight of targets that are the argmax
    of their distribution, 'count': sum of weights} over the weighted positions of `rows`. The
    argmax needs every id's probability: blocks of `block` (position, id) pairs at a time."""
    contexts, targets, weights = histories(rows, self.spec.order, self.spec.vocab_size)
    vocab = np.arange(self.spec.vocab_size)
    loss = correct = 0.0
    step = max(block // len(vocab), 1)
    for start in range(0, len(targets), step):
      t, w = targets[start:start + step], weights[start:start + step]
      p = self.probs(contexts[start:start + step], np.broadcast_to(vocab, (len(t), len(vocab))))
      loss -= float(np.sum(w * np.log(p[np.arange(len(t)), t])))
      correct += float(np.sum(w * (np.argmax(p, 1) == t)))
    return dict(loss=loss, correct=correct, count=float(weights.sum()))

  # The store: one npz, written under a temporary name and renamed (a crash leaves no half).

  def save(self, path, settings):
    arrays = dict(settings=np.array(json.dumps(settings, sort_keys=True)),
                  events=np.array(self.events),
                  discounts=np.array([o.discounts for o in self.orders]))
    for k, o in enumerate(self.orders, 1):
      arrays.update({f'{name}_{k}': getattr(o, name)
                     for name in ('keys', 'counts', 'context_keys', 'totals', 'gammas')})
    with open(path + '.tmp', 'wb') as f:
      np.savez(f, **arrays)
    os.replace(path + '.tmp', path)

  @classmethod
  def load(cls, path, spec):
    """The model saved at `path` (with settings that match `spec`'s, see `saved_settings`)."""
    with np.load(path) as data:
      orders = [Order(*(data[f'{name}_{k}'] for name in
                        ('keys', 'counts', 'context_keys', 'totals', 'gammas')),
                      tuple(float(d) for d in data['discounts'][k - 1]))
                for k in range(1, spec.order + 1)]
      return cls(spec, orders, int(data['events']))


def saved_settings(path):
  """The settings a store was counted under, or None when `path` holds no readable store."""
  try:
    with np.load(path) as data:
      return json.loads(str(data['settings']))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None


def build(model_config, sharding=None):
  """There is no network: commands that would apply one are refused in one sentence."""
  del model_config, sharding
  # Imported here: research.config imports the family registry.
  from research import config as config_lib
  raise config_lib.ConfigError('model.family=ngram is fitted by counting and has no network to '
                               'plan, benchmark, sample, convert or distil; only research.train '
                               'counts it (objective.name=causal_lm).')
