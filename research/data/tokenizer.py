"""Tokenizers behind one small interface; SentencePiece plugs in beside ByteTokenizer."""

from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: bytes | str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past three special tokens: pad=0, bos=1, eos=2 (ByT5 layout)."""
  pad_id, bos_id, eos_id = 0, 1, 2
  _OFFSET = 3
  vocab_size = 256 + _OFFSET

  def encode(self, text):
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + self._OFFSET

  def decode(self, ids):
    ids = np.asarray(ids)
    data = (ids[ids >= self._OFFSET] - self._OFFSET).astype(np.uint8).tobytes()
    return data.decode('utf-8', errors='replace')


TOKENIZERS = {'bytes': ByteTokenizer}


def get(name):
  if name not in TOKENIZERS:
    raise ValueError(f'data.tokenizer={name!r} is not one of {sorted(TOKENIZERS)}.')
  return TOKENIZERS[name]()
