"""Index-addressable packed rows over a tokenized split.

Documents are cut into examples (the objective's `transform.span`: for causal language
modelling, at most seq_len + 1 tokens overlapping by one, so every token but a document's first
is a target exactly once). Each epoch visits the examples in an order drawn from (seed, epoch)
and packs them greedily, in that order, into rows of seq_len positions; the objective turns each
example's tokens into its fields (with randomness drawn from the example's index, and the epoch
where it wants it) and finishes each row. Row g of the endless sequence of epochs is therefore a
pure function of (data, seed, seq_len, objective, g): any host can compute any row, and the
batch at step N is rows [N * B, (N + 1) * B) whoever reads it.
"""

import numpy as np

from research.data import packing


class PackedRows:

  def __init__(self, tokens, doc_bounds, seq_len, seed, shuffle, transform):
    """tokens: all documents concatenated; doc_bounds: [num_docs + 1] offsets into tokens;
    transform: the objective's data side."""
    self.tokens = tokens
    self.seq_len = seq_len
    self.seed = seed
    self.shuffle = shuffle
    self.transform = transform
    self.packed_fields = transform.packed_fields(seq_len)
    size, stride = transform.span(seq_len)
    starts, lengths, docs = [], [], []
    for doc, (begin, end) in enumerate(zip(doc_bounds[:-1], doc_bounds[1:])):
      offsets = np.arange(begin, max(end - (size - stride), begin), stride)
      starts.append(offsets)
      lengths.append(np.minimum(offsets + size, end) - offsets)
      docs.append(np.full(len(offsets), doc))
    self.example_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.example_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self.example_docs = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    if len(self.example_starts) == 0:
      raise ValueError('The split holds no document long enough for one example.')
    self._epochs = {}  # epoch -> (order, row_starts); row r packs order[row_starts[r]:row_starts[r+1]].
    self._first_row = [0]  # Global index of each epoch's first row, filled in lazily.

  def _epoch(self, epoch):
    if epoch not in self._epochs:
      count = len(self.example_starts)
      order = (np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle
               else np.arange(count))
      positions = self.transform.positions(self.example_lengths[order])
      row_starts, used = [0], 0
      for i, size in enumerate(np.minimum(positions, self.seq_len).tolist()):
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

  def _examples(self, epoch, row):
    order, row_starts = self._epoch(epoch)
    for example in order[row_starts[row]:row_starts[row + 1]]:
      start, length = self.example_starts[example], self.example_lengths[example]
      yield self.transform.example(self.tokens[start:start + length], int(example), epoch, self)

  def example_tokens(self, example):
    """The document tokens of example `example` (for objectives that pair examples)."""
    start = self.example_starts[example]
    return self.tokens[start:start + self.example_lengths[example]]

  def rows(self, start, stop):
    """Rows [start, stop) as a dict of [stop - start, ...] arrays (the objective's fields)."""
    per_row = []
    for index in range(start, stop):
      epoch, row = self._locate(index)
      packed = packing.pack_examples(self._examples(epoch, row), 1, self.seq_len,
                                     self.packed_fields)[0]
      per_row.append(self.transform.finish_row(packed))
    return {name: np.concatenate([r[name] for r in per_row]) for name in per_row[0]}
