"""Interpolated modified Kneser-Ney n-gram models: the counted baseline (research/models/ngram.py).

Launch:
  python -m research.train --config configs/ngram.py:kn5 --workdir /tmp/kn5
  python -m research.train --config configs/ngram.py:kn3 --workdir /tmp/kn1 --config.model.order=1

The variants count the rows of configs/decoder.py:tiny's training batches (16 x 128 tokens x
1200 steps of the standard-library corpus, byte tokens), so their eval_loss and
eval_bits_per_byte compare with that model's at the same token budget. The optim section is
unused (nothing is trained by gradient).

VARIANT is one of the names in VARIANTS below.
"""

import ml_collections

from configs import common

VARIANTS = {
    'kn3': dict(order=3),
    'kn5': dict(order=5),
}

# configs/decoder.py:tiny's shape: the same rows, so the same token budget.
TRAIN_SHAPE = dict(batch_size=16, seq_len=128, num_steps=1200, warmup_steps=100, lr=3e-3)


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='ngram',
      order=3,  # 1..5: the longest n-gram (history of order - 1 tokens).
      vocab_size=264,  # The uniform floor spreads over these ids (the bytes tokenizer's, padded).
      max_len=256,  # Rows of any length are scored; the shared checks compare train.seq_len.
  ))


def get_config(variant: str = 'kn5') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown ngram variant {variant!r}; choose one of {sorted(VARIANTS)}.')
  config = common.base_config(variant, TRAIN_SHAPE)
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  config.objective = ml_collections.ConfigDict(dict(name='causal_lm'))
  config.lock()
  return config
