"""Sequence-to-sequence fine-tuning of an encoder-decoder on (input text, target text) pairs.

Rows hold one example each (research/data/labeled.py reads the pairs; configs/finetune.py:pairs):
the encoder reads the input cut to train.seq_len - 1 tokens and EOS, the decoder predicts the
target cut to train.target_len - 1 tokens and EOS, fed the target shifted right from the padding
id (packed by research/data/packing.py `pack_pairs`, as the pretraining objectives' rows are).
EOS ends both, as in pretraining, so that decoding (research/sample.py --input) stops there.
Loss and metrics are those of every encoder-decoder objective (text_to_text.py); sequence_accuracy
is the exact match of the whole target, EOS included.
"""

import numpy as np

from research.data import labeled
from research.data import packing
from research.data import tokenizer as tokenizer_lib
from research.objectives import text_to_text

DATA = 'labeled'  # Reads labelled examples (research/data/labeled.py)...
SETTINGS = text_to_text.LOSS_SETTINGS  # The objective.* keys it reads, besides name.
TARGETS = 'text'  # ...whose labels are target texts (data.target_field), not class ids.
_DATA_SETTINGS = ('train_path', 'validation_path', 'tfds_name', 'validation_split', 'text_field',
                  'target_field')


def check_config(config, family):
  text_to_text.check_config(config, family, 'seq2seq', reads=labeled.SOURCES)
  missing = [k for k in _DATA_SETTINGS if k not in config.data]
  if missing:
    raise ValueError(f'objective.name=seq2seq needs the data settings of configs/finetune.py '
                     f'(data.{missing[0]} is missing); start from --config '
                     'configs/finetune.py:pairs.')
  if config.train.seq_len < 2:
    raise ValueError(f'train.seq_len={config.train.seq_len} leaves no room for an input token '
                     'and EOS; use at least 2.')


class Transform:
  """(input ids, None, target ids) -> one row; None -> a padding row of weight 0."""

  def __init__(self, tokenizer, seq_len, target_len):
    tokenizer_lib.require(tokenizer, ('eos_id',), 'objective.name=seq2seq')
    self.eos = np.asarray([tokenizer.eos_id], np.int32)
    self.pad_id = tokenizer_lib.filler_id(tokenizer)
    self.seq_len, self.target_len = seq_len, target_len
    self.fields = text_to_text.fields(seq_len, target_len, self.pad_id)

  def row(self, example):
    if example is None:
      return packing.empty_rows(self.fields, 1)
    text, _, target = example  # labeled.read gives text targets without pairs.
    example = dict(inputs=self._with_eos(text, self.seq_len),
                   targets=self._with_eos(target, self.target_len))
    return packing.pack_pairs([example], self.seq_len, self.target_len, self.fields,
                              start_id=self.pad_id)

  def _with_eos(self, ids, length):
    return np.concatenate([np.asarray(ids, np.int32)[:length - 1], self.eos])


class Objective(text_to_text.Objective):

  def transform(self, tokenizer):
    return Transform(tokenizer, self.config.train.seq_len, self.target_len)
