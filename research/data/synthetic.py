"""In-memory synthetic token source: documents drawn from a sparse random Markov chain.

Each token has `branching` possible successors, so a model can reach a loss of about
log(branching) nats per token, far below the unigram entropy of the stream. Each packed
row is a pure function of (seed, split, row index).
"""

import hashlib
import itertools

import numpy as np

from research.data import packing

_SPLITS = {'train': 0, 'validation': 1}


class MarkovSource:

  def __init__(self, vocab_size, branching, seed, min_doc_len, transform):
    """transform: the objective's data side (see research/data/windows.py)."""
    self.transform = transform
    table_rng = np.random.default_rng([seed, 7919])
    self.vocab_size = vocab_size
    self.seed = seed
    self.min_doc_len = min_doc_len
    # Distinct successors per token so that the conditional entropy is exactly log(branching).
    self.successors = np.stack([table_rng.choice(vocab_size, branching, replace=False)
                                for _ in range(vocab_size)])

  def _document(self, rng, length):
    tokens = np.empty(length, np.int32)
    tokens[0] = rng.integers(self.vocab_size)
    choices = rng.integers(self.successors.shape[1], size=length)
    for i in range(1, length):
      tokens[i] = self.successors[tokens[i - 1], choices[i]]
    return tokens

  def _examples(self, rng, seq_len, key):
    for k in itertools.count():
      length = int(rng.integers(self.min_doc_len, 2 * seq_len)) + 1
      yield self.transform.example(self._document(rng, length), key + (k,), 0, None)

  def rows(self, start, stop, seq_len, split='train'):
    """Packed rows [start, stop) of the endless stream: dict of [stop - start, seq_len] arrays.

    Row g is packed from documents drawn with its own generator, seeded by (seed, split, g), so
    any range of rows can be produced by any host in any order.
    """
    fields = self.transform.packed_fields(seq_len)
    per_row = []
    for g in range(start, stop):
      key = (_SPLITS[split], g)
      examples = self._examples(np.random.default_rng((self.seed,) + key), seq_len, key)
      packed = packing.pack_examples(examples, 1, seq_len, fields)[0]
      per_row.append(self.transform.finish_row(packed))
    return {name: np.concatenate([r[name] for r in per_row]) for name in per_row[0]}

  def batch(self, step, batch_size, seq_len, split='train'):
    """The global batch for `step` when every step takes `batch_size` rows."""
    return self.rows(step * batch_size, (step + 1) * batch_size, seq_len, split)

  def fingerprint(self):
    """Names the stream: its transition table and document lengths."""
    digest = hashlib.sha256(self.successors.tobytes())
    digest.update(f'{self.vocab_size}-{self.min_doc_len}'.encode())
    return digest.hexdigest()

  def conditional_entropy(self):
    return float(np.log(self.successors.shape[1]))

  def unigram_entropy(self, num_batches=8, batch_size=64, seq_len=128):
    """Entropy (nats) of the empirical token distribution of the training stream."""
    counts = np.zeros(self.vocab_size)
    for step in range(num_batches):
      rows = self.batch(10_000 + step, batch_size, seq_len)
      counts += np.bincount(rows['tokens'][rows['segment_ids'] > 0], minlength=self.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
