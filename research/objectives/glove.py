"""GloVe (Pennington et al. 2014): weighted least squares on the log co-occurrence counts.

Counting: when the pipeline is built (research/data/pipeline.py hands the document pipeline to
`Objective.cooccurrence`), each split's word stream is read once from its tokenized shards, in
chunks. Special tokens (e.g. [UNK]) are dropped first, as GloVe drops words outside its
vocabulary; then every two words of one document at most objective.window words apart add
1 / distance to X_ij and to X_ji. A chunk's pairs are keyed i * vocab + j (uint64), summed with
np.unique, and merged with the entries so far: memory follows the distinct pairs, not the text.

Rows: the non-zero entries (i, j, X_ij), seq_len to a row. Epoch e of the training rows takes
the entries in an order drawn from (seed, e), so row g, a pure function of (seed, g), is the
same on any host and after any resume; validation rows take the validation split's entries in
order, once (the pipeline's eval_batches cover them).

Loss per entry: f(X_ij) (w_i.w~_j + b_i + b~_j - log X_ij)^2 with f(X) = min(1, (X / xmax) **
alpha), summed and divided by the entries of the whole global batch. The paper trains it with
AdaGrad; this trainer offers adamw. The vectors a run exports are w + w~, as in the paper.
"""

import jax.numpy as jnp
import numpy as np

from research import objectives
from research.data import sources

TERM = 'entries'
FIELDS = ('rows', 'cols', 'counts', 'weights')
DATA = 'cooccurrence'  # Documents, counted into co-occurrence entries when the pipeline is built.
SETTINGS = ('window', 'xmax', 'alpha')  # The objective.* keys it reads, besides name.
CHUNK = 1 << 20  # Words read and paired at a time.


def check_config(config, family):
  del family
  o = config.objective
  if config.model.family != 'word_vectors':
    raise ValueError('objective.name=glove trains word vectors, which model.family='
                     f'{config.model.family!r} does not; start from '
                     'configs/word_vectors.py:glove_tiny.')
  objectives.check_word_documents(config, reads='counts words in documents')
  if not config.model.biases:
    raise ValueError('objective.name=glove fits a bias per word and table; set '
                     'model.biases=True.')
  if o.window < 1 or o.xmax <= 0 or o.alpha <= 0:
    raise ValueError(f'objective.window={o.window}, objective.xmax={o.xmax} and objective.alpha='
                     f'{o.alpha} must all be positive.')


def _merge(keys, values, more_keys, more_values):
  keys, inverse = np.unique(np.concatenate([keys, more_keys]), return_inverse=True)
  return keys, np.bincount(inverse, np.concatenate([values, more_values]), len(keys))


def _push(runs, run):
  """Adds a counted chunk to `runs`, merging while the one before is at most twice its size:
  each count is merged O(log chunks) times, not once per later chunk."""
  runs.append(run)
  while len(runs) > 1 and len(runs[-2][0]) <= 2 * len(runs[-1][0]):
    last = runs.pop()
    runs.append(_merge(*runs.pop(), *last))


def cooccurrences(store, window, vocab_size, special_ids=(), chunk=CHUNK):
  """(rows, cols, values) of the symmetric co-occurrence matrix of `store`'s words (anything
  with num_tokens and read(start, length) -> (tokens, document ids)), sorted by (row, col)."""
  special = np.asarray(sorted(special_ids), np.int64)
  runs = [(np.zeros(0, np.uint64), np.zeros(0))]
  tail_tokens, tail_docs = np.zeros(0, np.int64), np.zeros(0, np.int64)
  for start in range(0, store.num_tokens, chunk):
    tokens, docs = store.read(start, min(chunk, store.num_tokens - start))
    tokens, docs = tokens.astype(np.int64), docs.astype(np.int64)
    words = ~np.isin(tokens, special)
    # The last `window` words of the chunk before pair with this chunk's first ones.
    tokens = np.concatenate([tail_tokens, tokens[words]])
    docs = np.concatenate([tail_docs, docs[words]])
    first = len(tail_tokens)  # Pairs end at or after here: each is counted in one chunk.
    pair_keys, pair_values = [], []
    for distance in range(1, window + 1):
      ends = np.arange(max(first, distance), len(tokens))
      ends = ends[docs[ends] == docs[ends - distance]]
      left, right = tokens[ends - distance], tokens[ends]
      pair_keys += [left * vocab_size + right, right * vocab_size + left]
      pair_values += [np.full(2 * len(ends), 1.0 / distance)]
    chunk_keys, inverse = np.unique(np.concatenate(pair_keys).astype(np.uint64),
                                    return_inverse=True)
    chunk_values = np.bincount(inverse, np.concatenate(pair_values), len(chunk_keys))
    _push(runs, (chunk_keys, chunk_values))
    tail_tokens, tail_docs = tokens[-window:], docs[-window:]
  while len(runs) > 1:
    last = runs.pop()
    runs.append(_merge(*runs.pop(), *last))
  keys, values = runs[0]
  return ((keys // vocab_size).astype(np.int32), (keys % vocab_size).astype(np.int32), values)


class Entries:
  """Rows of co-occurrence entries, a pure function of (seed, row index)."""

  def __init__(self, left, right, values, seq_len, seed, shuffle):
    self.left, self.right, self.values = left, right, values.astype(np.float32)
    self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
    self.count = -(-len(values) // seq_len)  # Rows per epoch.
    self._order = (None, None)  # (epoch, permutation) of the epoch last read.

  def __len__(self):
    return self.count

  def order(self, epoch):
    if not self.shuffle:
      return np.arange(len(self.values))
    if self._order[0] != epoch:
      self._order = epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.values))
    return self._order[1]

  def row(self, index):
    epoch, position = divmod(int(index), self.count)
    row = dict(rows=np.zeros(self.seq_len, np.int32), cols=np.zeros(self.seq_len, np.int32),
               counts=np.ones(self.seq_len, np.float32),
               weights=np.zeros(self.seq_len, np.float32))
    if epoch and not self.shuffle:  # Validation is read once: past its end, padding.
      return row
    take = self.order(epoch)[position * self.seq_len:(position + 1) * self.seq_len]
    row['rows'][:len(take)], row['cols'][:len(take)] = self.left[take], self.right[take]
    row['counts'][:len(take)], row['weights'][:len(take)] = self.values[take], 1.0
    return row

  def rows(self, start, stop):
    """Rows [start, stop) as a dict of [stop - start, seq_len] arrays."""
    rows = [self.row(g) for g in range(start, stop)]
    return {name: np.stack([r[name] for r in rows]) for name in FIELDS}


class Transform:
  """Windows of single words: the pipeline reads the shards through them, then `cooccurrence`
  replaces its rows by entries."""

  def span(self, seq_len):
    del seq_len
    return 1, 1

  def capacity(self, seq_len):
    return seq_len


class Objective:

  def __init__(self, config):
    self.config = config
    o = config.objective
    self.window, self.xmax, self.alpha = o.window, o.xmax, o.alpha

  def fields(self, seq_len):
    return {'rows': objectives.Field((seq_len,), np.int32, ('length',)),
            'cols': objectives.Field((seq_len,), np.int32, ('length',)),
            'counts': objectives.Field((seq_len,), np.float32, ('length',), 1),
            'weights': objectives.Field((seq_len,), np.float32, ('length',))}

  def transform(self, tokenizer):
    del tokenizer
    return Transform()

  def cooccurrence(self, pipeline):
    """`pipeline` (of documents) with its rows replaced by co-occurrence entries."""
    special = getattr(pipeline.tokenizer, 'special_ids', ())
    vocab = self.config.model.vocab_size
    made = {}
    for split, shuffle in (('train', True), ('validation', False)):
      store = getattr(pipeline, split).store
      entries = Entries(*cooccurrences(store, self.window, vocab, special), pipeline.seq_len,
                        pipeline.seed, shuffle)
      if not len(entries):
        raise sources.DataError(f'The {split} split holds no two words within objective.window='
                                f'{self.window} of each other; add data or widen the window.')
      made[split] = entries
      pipeline.record[f'{split}_entries'] = len(entries.values)
    pipeline.train, pipeline.validation = made['train'], made['validation']
    pipeline.eval_batches = -(-len(made['validation']) // pipeline.batch_size)
    return pipeline

  def counts(self, batch):
    return {TERM: jnp.sum(batch['weights'].astype(jnp.float32))}

  def tokens(self, batch):
    """Entries, on host (numpy) and device arrays alike."""
    return batch['weights'].astype(np.float32).sum()

  def sums(self, model, params, batch, rng):
    del rng

    def predict(module):
      rows, cols = batch['rows'], batch['cols']
      dots = jnp.einsum('bld,bld->bl', module(rows), module.context(cols))
      return dots + module.bias(rows) + module.context_bias(cols)
    prediction = objectives.apply(model, params, None, method=predict).astype(jnp.float32)
    return {TERM: dict(loss=jnp.sum(entry_losses(prediction, batch['counts'], self.xmax,
                                                 self.alpha) * batch['weights']),
                       correct=jnp.zeros((), jnp.float32))}

  def metric_names(self):
    return ('loss',)

  def metrics(self, totals):
    return dict(loss=objectives.ratio(totals[TERM]['loss'], totals[TERM]['count']))

  def flops_per_token(self, family, spec):
    """Per entry: one score."""
    return family.dot_flops(spec)

  def synthetic_batch(self, rng):
    c = self.config
    b, t, v = c.train.batch_size, c.train.seq_len, c.model.vocab_size
    return dict(rows=rng.integers(0, v, (b, t), dtype=np.int32),
                cols=rng.integers(0, v, (b, t), dtype=np.int32),
                counts=rng.uniform(1.0, 10.0, (b, t)).astype(np.float32),
                weights=np.ones((b, t), np.float32))


def entry_losses(prediction, counts, xmax, alpha):
  """f(X) (prediction - log X)^2 with f(X) = min(1, (X / xmax) ** alpha)."""
  weight = jnp.minimum(1.0, (counts / xmax) ** alpha)
  return weight * jnp.square(prediction - jnp.log(counts))
