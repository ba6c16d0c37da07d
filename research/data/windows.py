"""Rows of a tokenized split, each a pure function of (data, seed, seq_len, objective, index).

The split's token stream (documents, each ended by EOS, concatenated) is cut into windows of the
objective's `transform.span(seq_len)`: `size` tokens every `stride` (for causal language
modelling seq_len + 1 tokens overlapping by one, so every token but a document's first is a
target exactly once per epoch). A window is split where its documents change; each piece
becomes an example of the objective (randomness drawn from the source, the split, the window,
the piece and, where the objective wants it, the epoch), and the objective packs the examples
into one row with segment ids, so that no token attends across documents. A piece that does not
fit the room left in the row (in every stream: an encoder-decoder row has inputs and targets) is
cut to the longest part that does. An objective that wants one example per row (sentence
pairs) takes the window's longest piece.

Epoch e visits the windows in an order drawn from (seed, salt, e) by grain's index_shuffle, a
bijection computed per index: row g needs neither the rows before it nor a permutation array,
so a start or a resume at any step costs the same and memory does not grow with the corpus.

What a window does not use is not seen in that epoch, nor in any other (windows are fixed):
for causal LM only the stream's tail after the last whole window; for MLM the tokens that the
[CLS]/[SEP] of each further document in a window push out (two per document boundary); for
sentence pairs every piece but the longest, so pairs suit corpora of documents longer than a row.
"""

import grain
import numpy as np
from grain.experimental import index_shuffle

from research.data.sources import DataError


def _epoch_seed(seed, salt, epoch):
  return int(np.random.SeedSequence([seed, salt, epoch]).generate_state(1)[0])


class Windows(grain.MapDataset):
  """One split's rows as a grain MapDataset: len() is an epoch, any index >= 0 is valid."""

  def __init__(self, store, seq_len, seed, shuffle, transform, salt=0, name='data'):
    """salt: which source of a mixture (their orders and examples' randomness differ)."""
    super().__init__([])
    self.store, self.seq_len, self.seed, self.shuffle = store, seq_len, seed, shuffle
    self.transform, self.salt = transform, salt
    # An example's randomness is drawn from this key and its place: sources and splits differ.
    self.key = (salt, 0 if store.split == 'train' else 1)
    self.size, self.stride = transform.span(seq_len)
    self.count = (store.num_tokens - (self.size - self.stride)) // self.stride
    if self.count < 1:
      raise DataError(f'The {store.split} split of {name} has {store.num_tokens} tokens, fewer '
                      f'than one row of train.seq_len={seq_len} needs; add data, shorten '
                      'train.seq_len or change data.validation_percent.')
    self.capacity = np.atleast_1d(transform.capacity(seq_len))
    self.one_per_row = getattr(transform, 'one_per_row', False)

  def __len__(self):
    return self.count

  def __str__(self):
    return f'Windows({self.store.split}, {self.count} per epoch)'

  def window(self, index):
    """(window, epoch) of row `index`."""
    epoch, position = divmod(int(index), self.count)
    if not self.shuffle or self.count == 1:
      return position, epoch
    return index_shuffle(position, max_index=self.count - 1,
                         seed=_epoch_seed(self.seed, self.salt, epoch), rounds=4), epoch

  def pieces(self, window):
    """The window's tokens cut where the document changes: [(tokens, document id)]."""
    tokens, docs = self.store.read(window * self.stride, self.size)
    cuts = np.flatnonzero(np.diff(docs)) + 1
    return list(zip(np.split(tokens.astype(np.int32), cuts), docs[np.r_[0, cuts]].tolist()))

  def __getitem__(self, index):
    window, epoch = self.window(index)
    numbered = list(enumerate(self.pieces(window)))
    if self.one_per_row:
      numbered = [max(numbered, key=lambda item: len(item[1][0]))]
    examples, used = [], np.zeros_like(self.capacity)
    for number, (tokens, _) in numbered:
      need, room = self._need(len(tokens)), self.capacity - used
      if (need > room).any() and not self.one_per_row:  # Cut to the room left.
        keep = self._longest_fitting(len(tokens), room)
        if keep < 1:
          break
        tokens, need = tokens[:keep], self._need(keep)
      if not need.any():  # Too short to make an example of (a lone token: nothing to predict).
        continue
      examples.append(self.transform.example(tokens, self.key + (window, number), epoch, self))
      used += need
    return self.transform.finish_row(self.transform.pack(examples, self.seq_len))

  def _need(self, length):
    """Row positions an example cut from `length` document tokens takes, per stream (an
    encoder-decoder row has two: inputs and targets), at most."""
    return np.atleast_1d(self.transform.positions(length))

  def _longest_fitting(self, length, room):
    """The most tokens of a piece of `length` whose example fits `room` (0 when none does):
    positions grow with the length, so a bisection finds it."""
    low, high = 0, length  # fits(low) holds (nothing fits in any room), fits(high) does not.
    while high - low > 1:
      middle = (low + high) // 2
      low, high = (middle, high) if (self._need(middle) <= room).all() else (low, middle)
    return low

  def other_document_text(self, index, length, rng):
    """Up to `length` tokens of another document than example `index`'s (BERT's random next
    sentence): the longest piece of a random window; ten draws of the same document in a row
    are accepted as they come."""
    window, number = index[-2:]
    own = self.pieces(window)[number][1]
    for _ in range(10):
      tokens, doc = max(self.pieces(int(rng.integers(self.count))), key=lambda p: len(p[0]))
      if doc != own:
        break
    return tokens[:length]

  def rows(self, start, stop):
    """Rows [start, stop) as a dict of [stop - start, ...] arrays (the objective's fields)."""
    return concatenate([self[g] for g in range(start, stop)])


def concatenate(rows):
  return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


class Mixture:
  """Rows drawn from several splits by weight, a pure function of the row index.

  The weights, as integer shares of about RESOLUTION rows, fix a cycle of rows in which split i
  takes its share, spread evenly (each row goes to the split furthest behind its share). Row g
  is row g % period of cycle g // period, so its split and its index in that split (and so the
  split's epoch) follow from g alone: no state to resume, and no end.
  """
  RESOLUTION = 1000

  def __init__(self, splits, weights):
    total = sum(weights)
    self.shares = [max(1, round(self.RESOLUTION * w / total)) for w in weights]
    self.period = sum(self.shares)
    owner, taken = [], [0] * len(splits)
    for row in range(self.period):
      behind = [(row + 1) * share / self.period - taken[i] for i, share in enumerate(self.shares)]
      i = max(range(len(splits)), key=behind.__getitem__)
      owner.append((i, taken[i]))  # The split of this row of a cycle, and its index there.
      taken[i] += 1
    self.splits, self._owner = splits, owner

  def __getitem__(self, index):
    cycle, row = divmod(int(index), self.period)
    split, within = self._owner[row]
    return self.splits[split][cycle * self.shares[split] + within]

  def rows(self, start, stop):
    return concatenate([self[g] for g in range(start, stop)])
