"""UL2's mixture of denoisers (Tay et al., 2022) for encoder-decoders.

objective.denoisers lists DENOISER=WEIGHT;... where DENOISER is
  R:MEAN_SPAN:DENSITY   regular span corruption (e.g. R:3:0.15), inputs begin with [NLU]
  X:MEAN_SPAN:DENSITY   extreme: long spans or a high density (e.g. X:64:0.5), with [NLG]
  S                     sequential: prefix LM with a random split, with [S2S]
Each example draws its denoiser by weight (from the seed, its place and the epoch), and its
inputs begin with the text of the denoiser's mode token, tokenized as UL2 tokenizes it.
A window holds the most tokens whose example fits the row under EVERY denoiser, so extreme
denoisers want a train.target_len near train.seq_len (UL2 trains with equal lengths); regular
ones then leave decoder positions empty.
"""

import numpy as np

from research.objectives import prefix_lm
from research.objectives import span_corruption
from research.objectives import text_to_text

DATA = 'documents'
# The objective.* keys it reads, besides name.
SETTINGS = ('denoisers',) + text_to_text.LOSS_SETTINGS
MODES = {'R': '[NLU]', 'X': '[NLG]', 'S': '[S2S]'}


def parse(denoisers):
  """[(kind, mean span, density, weight)] of an objective.denoisers setting; one sentence for a
  malformed one."""
  parsed = []
  for entry in str(denoisers).split(';'):
    name, _, weight = entry.strip().partition('=')
    parts = name.split(':')
    try:
      weight = float(weight)
      if parts[0] == 'S' and len(parts) == 1:
        mean, density = 0.0, 0.0
      elif parts[0] in ('R', 'X') and len(parts) == 3:
        mean, density = float(parts[1]), float(parts[2])
        if mean < 1 or not 0 < density < 1:
          raise ValueError
      else:
        raise ValueError
      if not weight > 0 or weight == float('inf'):
        raise ValueError
    except ValueError:
      raise ValueError(f'objective.denoisers entry {entry.strip()!r} is not R:MEAN_SPAN:DENSITY='
                       'WEIGHT, X:MEAN_SPAN:DENSITY=WEIGHT or S=WEIGHT (mean span >= 1, density '
                       'in (0, 1), weight > 0), e.g. R:3:0.15=1;X:64:0.5=1;S=1.') from None
    parsed.append((parts[0], mean, density, weight))
  return parsed


def check_config(config, family):
  text_to_text.check_config(config, family, 'ul2')
  parse(config.objective.denoisers)


class _Denoiser:
  """One span-corruption denoiser with its mode token."""

  def __init__(self, mode, mean, density, sentinels):
    self.mode, self.mean, self.density, self.sentinels = mode, mean, density, sentinels

  def positions(self, length):
    inputs, targets = span_corruption.corrupted_lengths(length, self.density, self.mean)
    return (inputs + len(self.mode), targets) if inputs else (0, 0)

  def example(self, tokens, rng, with_eos):
    mask = span_corruption.noise_mask(len(tokens), self.density, self.mean, rng)
    inputs, targets = span_corruption.corrupt(tokens, mask, self.sentinels)
    return dict(inputs=with_eos(np.concatenate([self.mode, inputs])), targets=with_eos(targets))


class Transform(text_to_text.Transform):
  SALT = 0x554C32

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer, 'objective.name=ul2')
    parsed = parse(config.objective.denoisers)
    self.weights = np.asarray([w for *_, w in parsed]) / sum(w for *_, w in parsed)
    self.denoisers = []
    for kind, mean, density, _ in parsed:
      mode = tokenizer.encode(MODES[kind]).astype(np.int32)
      if kind == 'S':
        self.denoisers.append(prefix_lm.Transform(config, tokenizer, 'random', mode))
      else:
        self.denoisers.append(_Denoiser(mode, mean, density, tokenizer.sentinel_ids))
    size = self.span(config.train.seq_len)[0]
    if size < 2:
      raise ValueError(f'Rows of train.seq_len={config.train.seq_len} and train.target_len='
                       f'{self.target_len} hold no example of every UL2 denoiser; raise '
                       'train.target_len (UL2 trains with target_len = seq_len).')
    for denoiser in self.denoisers:
      if isinstance(denoiser, _Denoiser) and denoiser.mean > size:
        raise ValueError(f'A UL2 denoiser\'s mean span of {denoiser.mean:g} tokens is longer than '
                         f'an example (the {size} tokens that train.seq_len='
                         f'{config.train.seq_len} and train.target_len={self.target_len} hold); '
                         'lower it in objective.denoisers or raise the lengths.')
      if isinstance(denoiser, _Denoiser):
        spans = span_corruption.noise_counts(max(size, 2), denoiser.density, denoiser.mean)[1]
        if spans > len(tokenizer.sentinel_ids):
          raise ValueError(f'A UL2 denoiser makes up to {spans} noise spans, but the tokenizer '
                           f'{tokenizer.name} has {len(tokenizer.sentinel_ids)} sentinels; set '
                           f'data.extra_ids to at least {spans}.')

  def span(self, seq_len):
    size = span_corruption.longest_window(self.positions, self.capacity(seq_len))
    return size, size

  def positions(self, length):
    """The most positions any denoiser's example of `length` tokens takes, per stream."""
    return tuple(np.max([d.positions(length) for d in self.denoisers], axis=0).tolist())

  def example(self, tokens, index, epoch, split):
    rng = self.rng(index, epoch)
    denoiser = self.denoisers[int(rng.choice(len(self.denoisers), p=self.weights))]
    if isinstance(denoiser, prefix_lm.Transform):
      return denoiser.example(tokens, index, epoch, split)
    return denoiser.example(np.asarray(tokens, np.int32), rng, self.with_eos)


class Objective(text_to_text.Objective):

  def transform(self, tokenizer):
    return Transform(self.config, tokenizer)
