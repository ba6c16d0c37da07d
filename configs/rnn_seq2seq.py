"""Recurrent encoder-decoders with attention (research/models/rnn_seq2seq.py), trained on the same
rows as the T5 family: span corruption, prefix LM or UL2 from documents, or seq2seq pairs.

Launch:
  python -m research.train --config configs/rnn_seq2seq.py:gru_attention_tiny --workdir DIR
  python -m research.train --config configs/finetune.py:pairs,rnn_seq2seq.gru_attention_tiny \
      --workdir DIR --config.data.train_path=train.jsonl --config.data.validation_path=dev.jsonl
  python -m research.sample --workdir DIR --input "some input" --num_beams 3

VARIANT is one of VARIANTS below: a GRU with Bahdanau's additive score and an LSTM with Luong's
general score, both over bytes with ByT5's sentinels (vocabulary 384). train.seq_len is the
encoder's input length and train.target_len the decoder's.
"""

import ml_collections

from configs import common
from configs import encoder_decoder

VARIANTS = {
    # One bidirectional GRU layer and one decoder layer: trains in minutes on a CPU.
    'gru_attention_tiny': dict(cell='gru', attention_score='bahdanau', num_layers=1,
                               num_decoder_layers=1, emb_dim=64, hidden_dim=128,
                               attention_dim=128),
    'lstm_luong_small': dict(cell='lstm', attention_score='luong', num_layers=2,
                             num_decoder_layers=2, emb_dim=256, hidden_dim=512,
                             attention_dim=0),
}

TRAIN_SHAPES = {
    'gru_attention_tiny': dict(batch_size=32, seq_len=128, num_steps=600, warmup_steps=50,
                               lr=3e-3),
}
TARGET_LENGTHS = {'gru_attention_tiny': 32}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='rnn_seq2seq',
      cell='gru',  # gru | lstm (Flax's GRUCell, OptimizedLSTMCell).
      attention_score='bahdanau',  # bahdanau: v^T tanh(W q + U k) | luong: q^T W k.
      num_layers=1,  # Bidirectional encoder layers.
      num_decoder_layers=1,
      emb_dim=256,
      hidden_dim=512,  # Each encoder direction and every decoder layer.
      attention_dim=512,  # Bahdanau's score layer; unused by luong.
      vocab_size=384,
      max_len=2048,  # Longest input or target (a recurrence has no position table).
      dropout_rate=0.1,
      dtype='float32',  # Recurrences carry their state in float32 whatever this is.
      param_dtype='float32',
  ))


def get_config(variant: str = 'gru_attention_tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown rnn_seq2seq variant {variant!r}; choose one of '
                     f'{sorted(VARIANTS)}.')
  shape = TRAIN_SHAPES.get(variant, dict(batch_size=64, seq_len=256, num_steps=100_000,
                                         warmup_steps=1000, lr=1e-3))
  config = common.base_config(variant, shape)
  config.train.target_len = TARGET_LENGTHS.get(variant, 64)  # Decoder positions per row.
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  if variant == 'gru_attention_tiny':
    config.model.dropout_rate = 0.0
  config.objective = encoder_decoder.objective_defaults()
  config.data.extra_ids = encoder_decoder.BYTE_SENTINELS  # Bytes with ByT5's sentinels.
  config.train.sample_prompt = 'def main():'
  config.lock()
  return config
