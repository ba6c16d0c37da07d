"""Prefix language modelling for encoder-decoders: the encoder reads a prefix, the decoder
predicts the rest.

objective.prefix='random': each example (a piece of a document, n tokens) is split at a point
drawn uniformly in [1, n - 1] (from the seed, the example's place and the epoch). Windows hold
min(seq_len, target_len) - 1 tokens, so that any split of a window's pieces fits both streams
and no token of a window is dropped. With target_len = seq_len a row holds one window and each
stream is about half full (the stdlib corpus at 128 / 128: 57% of the encoder's positions, 43%
of the decoder's); with target_len < seq_len the encoder's rows are mostly empty (12% at
128 / 32), which `notes` says as a run starts.
objective.prefix='none': the encoder reads EOS alone and the decoder models the whole example
(decoder-side causal LM; windows of target_len - 1 tokens).
"""

import numpy as np

from research.objectives import text_to_text

DATA = 'documents'
SETTINGS = ('prefix',) + text_to_text.LOSS_SETTINGS  # The objective.* keys it reads, besides name.
PREFIXES = ('random', 'none')


def check_config(config, family):
  text_to_text.check_config(config, family, 'prefix_lm')
  if config.objective.prefix not in PREFIXES:
    raise ValueError(f'objective.prefix={config.objective.prefix!r} is not one of '
                     f'{list(PREFIXES)}.')
  t = config.train
  if min(t.seq_len, t.target_len) < 3:
    raise ValueError(f'train.seq_len={t.seq_len} and train.target_len={t.target_len} leave no '
                     'room for a prefix and its continuation; use at least 3 each.')


def notes(config):
  t = config.train
  if config.objective.prefix == 'random' and t.target_len < t.seq_len:
    # The decoder's positions run out first: its rows take the rest of as many windows as the
    # encoder's take prefixes of.
    yield (f'prefix_lm cuts windows of train.target_len - 1 = {t.target_len - 1} tokens and '
           'splits each between the streams, so the encoder fills only about '
           f'{t.target_len / (2 * t.seq_len):.0%} of its train.seq_len={t.seq_len} positions; '
           f'--config.train.target_len={t.seq_len} trains on longer windows in fuller rows.')


def split_range(length, inputs_room, targets_room):
  """(lowest, highest) prefix length of a `length`-token example whose prefix + EOS and rest + EOS
  fit the rooms; the caller has cut the example so that the range is not empty."""
  return max(1, length - targets_room + 1), min(length - 1, inputs_room - 1)


class Transform(text_to_text.Transform):
  SALT = 0x50464C4D

  def __init__(self, config, tokenizer, prefix=None, mode=()):
    """mode: ids the inputs start with (UL2's [S2S])."""
    super().__init__(config, tokenizer, 'objective.name=prefix_lm')
    self.prefix = prefix or config.objective.prefix
    self.seq_len, self.mode = config.train.seq_len, np.asarray(mode, np.int32)

  def span(self, seq_len):
    if self.prefix == 'none':
      size = self.target_len - 1
    else:
      size = min(seq_len - len(self.mode), self.target_len) - 1
    return size, size

  def positions(self, length):
    """At most (inputs, targets) for an example of `length` tokens: whatever the split, the
    prefix and the rest each take at most `length` positions with their EOS."""
    if length < 2:
      return 0, 0
    if self.prefix == 'none':
      return 1 + len(self.mode), length + 1
    return min(length, self.seq_len - len(self.mode)) + len(self.mode), min(length,
                                                                           self.target_len)

  def example(self, tokens, index, epoch, split):
    del split
    tokens = np.asarray(tokens, np.int32)
    if self.prefix == 'none':
      cut = 0
    else:
      # A window sized for other denoisers (UL2) may hold more than one split can place.
      tokens = tokens[:self.seq_len - len(self.mode) + self.target_len - 2]
      lowest, highest = split_range(len(tokens), self.seq_len - len(self.mode), self.target_len)
      cut = int(self.rng(index, epoch).integers(lowest, highest + 1))
    return dict(inputs=self.with_eos(np.concatenate([self.mode, tokens[:cut]])),
                targets=self.with_eos(tokens[cut:]))


class Objective(text_to_text.Objective):

  def transform(self, tokenizer):
    return Transform(self.config, tokenizer)
