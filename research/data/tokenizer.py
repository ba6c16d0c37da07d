"""Tokenizers behind one small interface; SentencePiece plugs in beside ByteTokenizer."""

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  # Encoder objectives: [CLS] and [SEP] frame sentence pairs, [MASK] hides a chosen token.
  cls_id: int
  sep_id: int
  mask_id: int
  special_ids: tuple

  def encode(self, text: bytes | str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def word_ids(self, ids) -> np.ndarray: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past three special tokens: pad=0, bos=1, eos=2 (ByT5 layout), then
  cls=259, sep=260, mask=261 after the bytes (so byte ids stay those of ByT5)."""
  pad_id, bos_id, eos_id = 0, 1, 2
  _OFFSET = 3
  cls_id, sep_id, mask_id = 256 + _OFFSET, 257 + _OFFSET, 258 + _OFFSET
  vocab_size = 259 + _OFFSET
  # Ids that never stand for text (MLM never chooses them).
  special_ids = (pad_id, bos_id, eos_id, cls_id, sep_id, mask_id)

  def encode(self, text):
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + self._OFFSET

  _SPACES = tuple(b + 3 for b in b' \t\n\r\f\v')  # Byte + _OFFSET.

  def word_ids(self, ids):
    """Which word each token belongs to (whole-word masking): a run of non-space bytes is one
    word, and each space byte a word of its own."""
    ids = np.asarray(ids)
    space = np.isin(ids, self._SPACES)
    starts = space | np.concatenate([[True], space[:-1]])
    return np.cumsum(starts) - 1

  def decode(self, ids):
    ids = np.asarray(ids)
    text = (ids >= self._OFFSET) & (ids < self._OFFSET + 256)
    data = (ids[text] - self._OFFSET).astype(np.uint8).tobytes()
    return data.decode('utf-8', errors='replace')


TOKENIZERS = {'bytes': ByteTokenizer}


def get(name):
  if name not in TOKENIZERS:
    raise ValueError(f'data.tokenizer={name!r} is not one of {sorted(TOKENIZERS)}.')
  return TOKENIZERS[name]()
