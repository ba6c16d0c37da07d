"""In-memory synthetic token source: documents drawn from a sparse random Markov chain.

Each token has `branching` possible successors, so a model can reach a loss of about
log(branching) nats per token, far below the unigram entropy of the stream. The global batch at a
step is a pure function of (seed, split, step).
"""

import numpy as np

from research.data import packing
from research.objectives import causal_lm

_SPLITS = {'train': 0, 'validation': 1}


class MarkovSource:

  def __init__(self, vocab_size, branching, seed, min_doc_len):
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

  def _examples(self, rng, seq_len):
    while True:
      length = int(rng.integers(self.min_doc_len, 2 * seq_len)) + 1
      yield causal_lm.example_from_document(self._document(rng, length))

  def batch(self, step, batch_size, seq_len, split='train'):
    """The packed global batch for `step`: dict of [batch_size, seq_len] numpy arrays."""
    rng = np.random.default_rng([self.seed, _SPLITS[split], step])
    rows, _ = packing.pack_examples(self._examples(rng, seq_len), batch_size, seq_len)
    return rows

  def conditional_entropy(self):
    return float(np.log(self.successors.shape[1]))

  def unigram_entropy(self, num_batches=8, batch_size=64, seq_len=128):
    """Entropy (nats) of the empirical token distribution of the training stream's targets."""
    counts = np.zeros(self.vocab_size)
    for step in range(num_batches):
      rows = self.batch(10_000 + step, batch_size, seq_len)
      counts += np.bincount(rows['targets'][rows['weights'] > 0], minlength=self.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
