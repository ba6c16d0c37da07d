"""Recurrent language models (Elman RNN, LSTM, GRU) trained with the causal-LM objective.

Launch:
  python -m research.train --config configs/rnn.py:lstm_tiny --workdir /tmp/lstm
  python -m research.sample --workdir /tmp/lstm --prompt 'def '
  python -m research.train --config configs/rnn.py:lstm_medium --workdir DIR \
      --config.data.source=text --config.data.paths=CORPUS

The tiny variants train on the embedded standard-library corpus in bytes, as
configs/decoder.py:tiny does, with about as many parameters (0.5-0.7M). Each row of
train.seq_len tokens starts from a zero state: backpropagation through time is truncated there.

VARIANT is one of the names in VARIANTS below.
"""

import ml_collections

from configs import common

# Each variant overrides `_model_defaults`. Tied embeddings need emb_dim == hidden_dim.
VARIANTS = {
    'rnn_tiny': dict(cell='rnn', num_layers=2, emb_dim=320, hidden_dim=320),
    'lstm_tiny': dict(cell='lstm', num_layers=2, emb_dim=192, hidden_dim=192),
    'gru_tiny': dict(cell='gru', num_layers=2, emb_dim=224, hidden_dim=224),
    # Two 1024-wide LSTM layers with dropout after each, tied (the medium setting of Zaremba et
    # al. as Merity et al. train it, here over any tokenizer).
    'lstm_medium': dict(cell='lstm', num_layers=2, emb_dim=1024, hidden_dim=1024,
                        dropout_rate=0.3, vocab_size=32000, max_len=4096, dtype='bfloat16'),
}

_TINY = dict(batch_size=16, seq_len=128, num_steps=1200, warmup_steps=100, lr=3e-3)
TRAIN_SHAPES = {'rnn_tiny': _TINY, 'lstm_tiny': _TINY, 'gru_tiny': _TINY}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='rnn',
      cell='lstm',  # rnn (Elman, tanh) | lstm | gru.
      num_layers=2,
      emb_dim=256,
      hidden_dim=256,
      tie_embeddings=True,  # Needs emb_dim == hidden_dim.
      dropout_rate=0.0,  # After every layer: between layers and before the head.
      vocab_size=264,  # The bytes tokenizer.
      max_len=1024,  # Unused by the model: it bounds prompt plus generated tokens.
      dtype='float32',  # Compute dtype; the carry, softmax and loss stay float32.
      param_dtype='float32',
  ))


def get_config(variant: str = 'lstm_tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown rnn variant {variant!r}; choose one of {sorted(VARIANTS)}.')
  shape = TRAIN_SHAPES.get(variant, dict(batch_size=64, seq_len=256, num_steps=50_000,
                                         warmup_steps=1000, lr=1e-3))
  config = common.base_config(variant, shape)
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  config.objective = ml_collections.ConfigDict(dict(name='causal_lm',
                                                    **common.distill_defaults('causal_lm')))
  config.train.sample_tokens = min(120, config.model.max_len - 8)
  config.lock()
  return config
