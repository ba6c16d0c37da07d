"""Index-addressable packed rows over a tokenized split.

Documents (each followed by an end-of-sequence token) are cut into examples of at most
seq_len + 1 tokens that overlap by one token, so every token but a document's first is a target
exactly once. Each epoch visits the examples in an order drawn from (seed, epoch) and packs them
greedily, in that order, into rows of seq_len positions. Row g of the endless sequence of epochs
is therefore a pure function of (data, seed, seq_len, g): any host can compute any row, and the
batch at step N is rows [N * B, (N + 1) * B) whoever reads it.
"""

import numpy as np

from research.data import packing
from research.objectives import causal_lm


class PackedRows:

  def __init__(self, tokens, doc_bounds, seq_len, seed, shuffle, pad_id):
    """tokens: all documents concatenated; doc_bounds: [num_docs + 1] offsets into tokens."""
    self.tokens = tokens
    self.seq_len = seq_len
    self.seed = seed
    self.shuffle = shuffle
    self.pad_id = pad_id
    starts, lengths = [], []
    for begin, end in zip(doc_bounds[:-1], doc_bounds[1:]):
      offsets = np.arange(begin, end - 1, seq_len)
      starts.append(offsets)
      lengths.append(np.minimum(offsets + seq_len + 1, end) - offsets)
    self.example_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.example_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(self.example_starts) == 0:
      raise ValueError('The split holds no document with two or more tokens.')
    self._epochs = {}  # epoch -> (order, row_starts); row r packs order[row_starts[r]:row_starts[r+1]].
    self._first_row = [0]  # Global index of each epoch's first row, filled in lazily.

  def _epoch(self, epoch):
    if epoch not in self._epochs:
      count = len(self.example_starts)
      order = (np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle
               else np.arange(count))
      positions = self.example_lengths[order] - 1
      row_starts, used = [0], 0
      for i, size in enumerate(positions.tolist()):
        if used + size > self.seq_len:
          row_starts.append(i)
          used = 0
        used += size
      row_starts.append(count)
      if len(self._epochs) > 4:
        self._epochs.pop(min(self._epochs))
      self._epochs[epoch] = (order, np.asarray(row_starts))
    return self._epochs[epoch]

  def rows_per_epoch(self, epoch):
    return len(self._epoch(epoch)[1]) - 1

  def _locate(self, index):
    while self._first_row[-1] <= index:
      epoch = len(self._first_row) - 1
      self._first_row.append(self._first_row[-1] + self.rows_per_epoch(epoch))
    epoch = int(np.searchsorted(self._first_row, index, side='right')) - 1
    return epoch, index - self._first_row[epoch]

  def _examples(self, index):
    epoch, row = self._locate(index)
    order, row_starts = self._epoch(epoch)
    for example in order[row_starts[row]:row_starts[row + 1]]:
      start, length = self.example_starts[example], self.example_lengths[example]
      yield causal_lm.example_from_document(self.tokens[start:start + length])

  def rows(self, start, stop):
    """Rows [start, stop) as a dict of [stop - start, seq_len] arrays (see packing.FIELDS)."""
    per_row = [packing.pack_examples(self._examples(i), 1, self.seq_len, self.pad_id)[0]
               for i in range(start, stop)]
    return {name: np.concatenate([r[name] for r in per_row]) for name in packing.FIELDS}
