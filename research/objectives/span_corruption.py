"""Span corruption (T5): noise spans of the inputs become sentinels; the targets spell them out.

Of an example's n tokens, round(n * noise_density) (at least 1, at most n - 1) form
round(noise / mean_span_length) (at least 1) spans; both counts follow from n, only where the
spans lie is random (drawn from the seed, the example's place and the epoch). As T5 draws them,
the example starts with a kept span and alternates kept / noise spans, their lengths a random
composition of each count. Span i becomes sentinel i in the inputs, the highest id first
(<extra_id_0>), and the targets are sentinel i followed by span i, for each span:
  inputs   k1 <X0> k2 <X1> ... kS <X{S-1}> EOS        n - noise + S + 1 tokens
  targets  <X0> s1 <X1> s2 ... <X{S-1}> sS EOS        noise + S + 1 tokens
Windows hold the most tokens whose example fills train.seq_len and train.target_len (T5: 568
tokens for 512 / 114), so full windows fill both streams; pieces cut at document ends are packed.
"""

import numpy as np

from research.objectives import text_to_text

DATA = 'documents'
# The objective.* keys it reads, besides name.
SETTINGS = ('noise_density', 'mean_span_length') + text_to_text.LOSS_SETTINGS


def noise_counts(length, density, mean_span_length):
  """(noise tokens, noise spans) of an example of `length` tokens, as T5 counts them."""
  noise = min(max(int(np.round(length * density)), 1), length - 1)
  spans = max(int(np.round(noise / mean_span_length)), 1)
  return noise, spans


def corrupted_lengths(length, density, mean_span_length):
  """(inputs, targets) lengths with EOS; (0, 0) below 2 tokens (nothing to corrupt)."""
  if length < 2:
    return 0, 0
  noise, spans = noise_counts(length, density, mean_span_length)
  return length - noise + spans + 1, noise + spans + 1


def _random_composition(total, parts, rng):
  """`parts` positive integers summing to `total`, uniformly among such compositions."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def noise_mask(length, density, mean_span_length, rng):
  """Boolean [length]: True on noise tokens, in spans as described above."""
  noise, spans = noise_counts(length, density, mean_span_length)
  spans = min(spans, noise, length - noise)  # Every span and every gap at least one token.
  noise_lengths = _random_composition(noise, spans, rng)
  kept_lengths = _random_composition(length - noise, spans, rng)
  interleaved = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], spans), interleaved)


def corrupt(tokens, mask, sentinel_ids):
  """(inputs, targets) without EOS: each noise span of `tokens` replaced by the next sentinel in
  the inputs, each kept span by it in the targets."""
  tokens = np.asarray(tokens, np.int32)
  starts = mask & ~np.concatenate([[False], mask[:-1]])
  span_index = np.cumsum(starts) - 1
  if span_index[-1] >= len(sentinel_ids):
    raise ValueError(f'An example has {span_index[-1] + 1} noise spans but the tokenizer only '
                     f'{len(sentinel_ids)} sentinels; raise data.extra_ids.')
  sentinels = np.asarray(sentinel_ids, np.int32)
  inputs = np.where(starts, sentinels[np.maximum(span_index, 0)], tokens)[~mask | starts]
  targets = np.concatenate([[sentinels[i], *tokens[mask & (span_index == i)]]
                            for i in range(span_index[-1] + 1)]).astype(np.int32)
  return inputs, targets


def uncorrupt(inputs, targets, sentinel_ids):
  """The tokens `corrupt` made (inputs, targets) from: each sentinel of the inputs replaced by
  what follows the same sentinel in the targets."""
  sentinel_set = set(int(s) for s in sentinel_ids)
  spans, current = {}, None
  for token in np.asarray(targets).tolist():
    if token in sentinel_set:
      current = spans.setdefault(token, [])
    elif current is not None:
      current.append(token)
  out = []
  for token in np.asarray(inputs).tolist():
    out.extend(spans.get(token, []) if token in sentinel_set else [token])
  return np.asarray(out, np.int32)


def longest_window(lengths, capacity):
  """The most tokens n whose example's (inputs, targets) `lengths(n)` fit `capacity`; lengths
  grow with n, and inputs by at least one token per two more tokens."""
  n = 0
  while all(a <= b for a, b in zip(lengths(n + 1), capacity)):
    n += 1
  return n


def check_config(config, family):
  text_to_text.check_config(config, family, 'span_corruption')
  o, t = config.objective, config.train
  if not 0 < o.noise_density < 1:
    raise ValueError(f'objective.noise_density={o.noise_density} must lie in (0, 1) (T5: 0.15).')
  if o.mean_span_length < 1:
    raise ValueError(f'objective.mean_span_length={o.mean_span_length} must be at least 1 (T5: 3).')
  lengths = lambda n: corrupted_lengths(n, o.noise_density, o.mean_span_length)
  window = longest_window(lengths, (t.seq_len, t.target_len))
  if window < 2:
    raise ValueError(f'train.seq_len={t.seq_len} and train.target_len={t.target_len} leave no '
                     'room for a corrupted example; raise them.')
  if o.mean_span_length > window:  # T5's count would make the whole noise one span.
    raise ValueError(f'objective.mean_span_length={o.mean_span_length:g} is longer than an '
                     f'example (the {window} tokens that train.seq_len={t.seq_len} and '
                     f'train.target_len={t.target_len} hold); lower it (T5: 3), or raise '
                     'both lengths.')
  wanted = lengths(longest_window(lengths, (t.seq_len, 1 << 30)))[1]
  if wanted > t.target_len:
    raise ValueError(f'train.target_len={t.target_len} holds the targets of only {window} '
                     f'tokens; set it to {wanted} so that examples fill train.seq_len={t.seq_len} '
                     '(T5: 114 for 512).')


class Transform(text_to_text.Transform):
  SALT = 0x5350414E

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer, 'objective.name=span_corruption')
    o = config.objective
    self.density, self.mean_span = o.noise_density, o.mean_span_length
    self.sentinels = tokenizer.sentinel_ids
    window = self.span(config.train.seq_len)[0]
    most = noise_counts(max(window, 2), self.density, self.mean_span)[1]
    if most > len(self.sentinels):
      raise ValueError(f'Span corruption of rows of train.seq_len={config.train.seq_len} makes up '
                       f'to {most} noise spans, but the tokenizer {tokenizer.name} has '
                       f'{len(self.sentinels)} sentinels; set data.extra_ids to at least {most}.')

  def span(self, seq_len):
    size = longest_window(self.positions, self.capacity(seq_len))
    return size, size

  def positions(self, length):
    return corrupted_lengths(length, self.density, self.mean_span)

  def example(self, tokens, index, epoch, split):
    del split
    mask = noise_mask(len(tokens), self.density, self.mean_span, self.rng(index, epoch))
    inputs, targets = corrupt(tokens, mask, self.sentinels)
    return dict(inputs=self.with_eos(inputs), targets=self.with_eos(targets))


class Objective(text_to_text.Objective):

  def transform(self, tokenizer):
    return Transform(self.config, tokenizer)
