"""Tokenizers behind one small interface: our byte tokenizer and Hugging Face tokenizer.json files."""

import os
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


class HfTokenizer:
  """A Hugging Face `tokenizer.json` (WordPiece, BPE or Unigram) read with the `tokenizers`
  library: the tokenizer of a model imported with research.convert from_hf.

  Special ids are looked up by the names BERT ([CLS] [SEP] [MASK] [PAD]), RoBERTa and ALBERT
  (<s> </s> <mask> <pad>) use; a word starts at a piece without a continuation mark (WordPiece
  '##') or with a word-start mark (BPE 'Ġ', SentencePiece '▁').
  """
  _NAMES = dict(cls_id=('[CLS]', '<s>'), sep_id=('[SEP]', '</s>'), mask_id=('[MASK]', '<mask>'),
                pad_id=('[PAD]', '<pad>'), unk_id=('[UNK]', '<unk>'))

  def __init__(self, directory):
    import tokenizers  # Imported on use: only models from Hugging Face need it.
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise ValueError(f'data.tokenizer=hf:{directory} names no folder with a tokenizer.json; '
                       'point it at the Hugging Face model directory.')
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tokenizer.get_vocab_size()
    vocab = self._tokenizer.get_vocab()
    for attribute, names in self._NAMES.items():
      found = [vocab[n] for n in names if n in vocab]
      if not found:
        raise ValueError(f'The tokenizer in {directory} has none of the tokens {list(names)}; '
                         'use the tokenizer of a BERT, RoBERTa or ALBERT model.')
      setattr(self, attribute, found[0])
    # Decoders' ids have no use for encoder fine-tuning but keep the interface whole.
    self.bos_id, self.eos_id = self.cls_id, self.sep_id
    self.special_ids = tuple(sorted({self.cls_id, self.sep_id, self.mask_id, self.pad_id,
                                     self.unk_id}))
    pieces = [None] * self.vocab_size
    for piece, index in vocab.items():
      if index < self.vocab_size:
        pieces[index] = piece
    marks_starts = any(p.startswith(('Ġ', '▁')) for p in vocab)

    def continues(piece):  # Whether a piece continues the word before it.
      if piece is None:
        return False
      return not piece.startswith(('Ġ', '▁')) if marks_starts else piece.startswith('##')

    self._continues = np.asarray([continues(p) for p in pieces])

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids):
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def word_ids(self, ids):
    continues = self._continues[np.asarray(ids)]
    continues[0] = False
    return np.cumsum(~continues) - 1


TOKENIZERS = {'bytes': ByteTokenizer}


HF_PREFIX = 'hf:'  # data.tokenizer='hf:DIR': the tokenizer.json in DIR.


def check_name(name):
  if name not in TOKENIZERS and not name.startswith(HF_PREFIX):
    raise ValueError(f'data.tokenizer={name!r} is not one of {sorted(TOKENIZERS)} or '
                     f'{HF_PREFIX}DIR (a Hugging Face model directory with a tokenizer.json).')


def get(name):
  check_name(name)
  if name.startswith(HF_PREFIX):
    return HfTokenizer(name[len(HF_PREFIX):])
  return TOKENIZERS[name]()
