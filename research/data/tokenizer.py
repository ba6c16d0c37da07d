"""Tokenizers behind one interface, named by the setting data.tokenizer:

  'bytes'      our byte tokenizer (UTF-8 bytes, ByT5's ids, plus [CLS] [SEP] [MASK]);
  'hf:DIR'     the tokenizer.json of a Hugging Face model directory (GPT-2, Llama, BERT, RoBERTa);
  'spm:FILE'   a SentencePiece .model file (T5's, or one trained here: see `train` below).

Every tokenizer has encode/decode/word_ids, `vocab_size`, the special ids pad_id, bos_id, eos_id,
unk_id, cls_id, sep_id and mask_id (None where the tokenizer defines no such token; `require`
turns a missing one into an error for the feature that needs it), `sentinel_ids` (T5's
<extra_id_i>, spm and bytes), `special_ids` (every defined id that stands for no text), `name` (the
data.tokenizer it was built from) and `fingerprint` (a hex sha256 of exactly what it maps: for a
file, of its bytes, plus the extra_ids when there are any).

`save` writes a tokenizer into a folder (a run's <workdir>/tokenizer) so that `load_saved` rebuilds
it there with the same fingerprint, whatever happens to the original file.

Training a SentencePiece model on the training split of any data source:

  python -m research.data.tokenizer train --source 'text:corpus/**/*.py' --source jsonl:docs.jsonl \
      --vocab_size 32000 --out tokenizers/code [--model_type unigram|bpe] [--max_bytes N] \
      [--text_field text] [--extra_ids 0]

writes tokenizers/code.model and prints the --config settings that use it. model.vocab_size should
be `padded_vocab_size(tokenizer.vocab_size)`: the sharded embedding wants a multiple of 128.
"""

import hashlib
import io
import json
import os
import re
import sys
from typing import Protocol

import numpy as np

from research import cli

BYTES = 'bytes'
HF_PREFIX = 'hf:'  # data.tokenizer='hf:DIR': the tokenizer.json in DIR.
SPM_PREFIX = 'spm:'  # data.tokenizer='spm:FILE': a SentencePiece model.
SAVED_DIR = 'tokenizer'  # A run's own copy: <workdir>/tokenizer.
_RECORD = 'tokenizer_record.json'
SPECIAL_NAMES = ('pad_id', 'bos_id', 'eos_id', 'unk_id', 'cls_id', 'sep_id', 'mask_id')
_TOKEN_NAMES = dict(pad_id='padding', bos_id='beginning-of-sequence', eos_id='end-of-sequence',
                    unk_id='unknown', cls_id='[CLS]', sep_id='[SEP]', mask_id='[MASK]')


class Tokenizer(Protocol):
  name: str
  fingerprint: str
  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None
  unk_id: int | None
  # Encoder objectives: [CLS] and [SEP] frame sentence pairs, [MASK] hides a chosen token.
  cls_id: int | None
  sep_id: int | None
  mask_id: int | None
  sentinel_ids: tuple
  special_ids: tuple

  def encode(self, text: bytes | str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def word_ids(self, ids) -> np.ndarray: ...

  def text_bytes(self) -> np.ndarray: ...


def _sha256(data):
  return hashlib.sha256(data).hexdigest()


def _defined(tokenizer, more=()):
  """The sorted special ids a tokenizer defines, plus `more`."""
  ids = {getattr(tokenizer, n) for n in SPECIAL_NAMES} - {None}
  return tuple(sorted(ids | {int(i) for i in more}))


def _word_ids(continues, ids):
  """Word index of each token from a table of which pieces continue the word before them."""
  ids = np.asarray(ids)
  mark = continues[ids].copy()
  if len(mark):
    mark[0] = False
  return np.cumsum(~mark) - 1


class ByteTokenizer:
  """UTF-8 bytes shifted past three special tokens: pad=0, bos=1, eos=2 (ByT5 layout), then
  cls=259, sep=260, mask=261 after the bytes (so byte ids stay those of ByT5), then `extra_ids`
  T5 sentinels, <extra_id_0> the highest id (with 122, ByT5's vocabulary of 384 and its
  <extra_id_0> = 383)."""
  name, kind, file = BYTES, 'bytes', None
  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, None
  _OFFSET = 3
  cls_id, sep_id, mask_id = 256 + _OFFSET, 257 + _OFFSET, 258 + _OFFSET
  data = None
  _SPACES = tuple(b + 3 for b in b' \t\n\r\f\v')  # Byte + _OFFSET.

  def __init__(self, extra_ids=0):
    self.vocab_size = 259 + self._OFFSET + extra_ids
    self.sentinel_ids = tuple(self.vocab_size - 1 - i for i in range(extra_ids))
    # Ids that never stand for text (MLM never chooses them).
    self.special_ids = _defined(self, self.sentinel_ids)
    layout = b'bytes-v1 pad=0 bos=1 eos=2 byte=id-3 cls=259 sep=260 mask=261 size=262'
    self.fingerprint = _sha256(layout + (f' extra_ids={extra_ids}'.encode() if extra_ids else b''))

  def encode(self, text):
    data = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + self._OFFSET

  def word_ids(self, ids):
    """Which word each token belongs to (whole-word masking): a run of non-space bytes is one
    word, and each space byte a word of its own."""
    ids = np.asarray(ids)
    space = np.isin(ids, self._SPACES)
    starts = space | np.concatenate([[True], space[:-1]])
    return np.cumsum(starts) - 1

  def text_bytes(self):
    """UTF-8 bytes of text each id stands for: 1 for a byte, 0 for a special id."""
    lengths = np.zeros(self.vocab_size, np.int32)
    lengths[self._OFFSET:self._OFFSET + 256] = 1
    return lengths

  def decode(self, ids):
    """Text of the byte ids; sentinels read <extra_id_i>, other special ids stand for no text."""
    ids = np.asarray(ids).reshape(-1)
    parts, run = [], []
    for index in ids.tolist():
      if self._OFFSET <= index < self._OFFSET + 256:
        run.append(index - self._OFFSET)
      elif index >= self.vocab_size - len(self.sentinel_ids) and index < self.vocab_size:
        parts += [bytes(run).decode('utf-8', errors='replace'),
                  f'<extra_id_{self.vocab_size - 1 - index}>']
        run = []
    parts.append(bytes(run).decode('utf-8', errors='replace'))
    return ''.join(parts)


def _read(path, name, what):
  if not os.path.isfile(path):
    raise ValueError(f'data.tokenizer={name} names no {what} ({path} is not a file); point it at '
                     'an existing one.')
  with open(path, 'rb') as f:
    return f.read()


_BYTE_PIECE = re.compile('<0x[0-9A-Fa-f]{2}>')  # A byte-fallback piece (SentencePiece, Llama).


class HfTokenizer:
  """A Hugging Face `tokenizer.json` (WordPiece, BPE or Unigram) read with the `tokenizers`
  library: the tokenizer of a model imported with research.convert from_hf.

  Special tokens are found by the names GPT-2 (<|endoftext|>: bos and eos), Llama (<s> </s>
  <unk>, Llama 3's <|begin_of_text|> <|end_of_text|>), BERT and ALBERT ([CLS] [SEP] [MASK] [PAD]
  [UNK]) and RoBERTa (<s> </s> <mask> <pad> <unk>) use. A word starts at a piece without a
  continuation mark (WordPiece '##') or with a word-start mark (BPE 'Ġ', SentencePiece '▁').
  """
  kind, file = 'hf', 'tokenizer.json'
  _NAMES = dict(pad_id=('[PAD]', '<pad>', '<|pad|>'), unk_id=('[UNK]', '<unk>'),
                bos_id=('<s>', '<|begin_of_text|>', '<|endoftext|>'),
                eos_id=('</s>', '<|end_of_text|>', '<|endoftext|>'),
                cls_id=('[CLS]', '<cls>'), sep_id=('[SEP]', '<sep>'), mask_id=('[MASK]', '<mask>'))
  sentinel_ids = ()

  def __init__(self, directory, name=None):
    import tokenizers  # Imported on use: only models from Hugging Face need it.
    self.name = name or HF_PREFIX + directory
    path = os.path.join(directory, self.file)
    if not os.path.isfile(path):
      raise ValueError(f'data.tokenizer={self.name} names no folder with a tokenizer.json; point '
                       'it at the Hugging Face model directory.')
    self.data = _read(path, self.name, 'tokenizer.json')
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(self.data.decode('utf-8'))
    except Exception as error:  # The library raises a bare Exception for a bad file.
      raise ValueError(f'data.tokenizer={self.name}: {path} is not a readable tokenizer.json '
                       f'({error}); use the file the model was published with.') from None
    # A published tokenizer.json may carry the model's truncation (e.g. to 512) and padding:
    # documents are encoded whole, unpadded.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self.fingerprint = _sha256(self.data)
    vocab = self._tokenizer.get_vocab()
    self.vocab_size = max(self._tokenizer.get_vocab_size(), max(vocab.values(), default=-1) + 1)
    added = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items()
             if t.special}
    # Published tokenizers mark their special tokens, so a piece that merely reads '<s>' in
    # GPT-2's vocabulary is text; a hand-made one without marks is searched whole.
    known = added or vocab
    for attribute, names in self._NAMES.items():
      found = [known[n] for n in names if n in known]
      setattr(self, attribute, found[0] if found else None)
    if self.cls_id is None and self.mask_id is not None and '<s>' in known:
      # RoBERTa frames its inputs with <s> and </s>; a decoder's (Llama's) are only bos and eos.
      self.cls_id, self.sep_id = known['<s>'], known.get('</s>')
    self.special_ids = _defined(self, added.values())
    special = set(self.special_ids)
    pieces = [None] * self.vocab_size
    for piece, index in vocab.items():
      pieces[index] = piece
    marks_starts = any(p.startswith(('Ġ', '▁')) for p in vocab)

    def continues(index, piece):  # Whether a piece continues the word before it.
      if piece is None or index in special:
        return False
      return not piece.startswith(('Ġ', '▁')) if marks_starts else piece.startswith('##')

    self._continues = np.asarray([continues(i, p) for i, p in enumerate(pieces)])

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids):
    """Text of `ids` without special tokens; ids past the vocabulary (a model's padded
    embedding rows) stand for no text."""
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                  skip_special_tokens=True)

  def word_ids(self, ids):
    return _word_ids(self._continues, ids)

  def text_bytes(self):
    """UTF-8 bytes of text each id stands for (0 for special ids), read from the piece as the
    tokenizer's decoder spells it: byte-level BPE (GPT-2, RoBERTa, Llama 3) one byte per
    character, Metaspace ('▁' a space, '<0xNN>' one byte), WordPiece without its '##' (the spaces
    it drops count nothing); other decoders decode each piece alone."""
    decoder = type(self._tokenizer.decoder).__name__
    lengths = np.zeros(self.vocab_size, np.int32)
    special = set(self.special_ids)
    for piece, index in self._tokenizer.get_vocab(with_added_tokens=True).items():
      if index in special or index >= self.vocab_size:
        continue
      if decoder == 'ByteLevel':
        text = 'x' * len(piece)
      elif _BYTE_PIECE.fullmatch(piece):
        text = 'x'
      elif decoder == 'WordPiece':
        text = piece.removeprefix('##')
      elif '▁' in piece:
        text = piece.replace('▁', ' ')
      else:
        text = self._tokenizer.decode([index])
      lengths[index] = len(text.encode('utf-8'))
    return lengths


class SentencePieceTokenizer:
  """A SentencePiece model (T5's, or one trained by `train`) read with the `sentencepiece` library.

  pad/bos/eos/unk are the model's own (T5: pad=0, eos=1, unk=2, no bos); cls/sep/mask are the
  pieces [CLS] [SEP] [MASK] (or <cls> <sep> <mask>) when the model has them. `extra_ids` T5
  sentinels follow the model's pieces, <extra_id_0> the highest id (sentinel i is
  vocab_size - 1 - i); encode never produces them and decode renders them as <extra_id_i>.
  A word starts at a piece that begins with '▁'.
  """
  kind, file = 'spm', 'tokenizer.model'
  _NAMES = dict(cls_id=('[CLS]', '<cls>'), sep_id=('[SEP]', '<sep>'), mask_id=('[MASK]', '<mask>'))

  def __init__(self, path, extra_ids=0, name=None):
    import sentencepiece  # Imported on use: only SentencePiece models need it.
    self.name = name or SPM_PREFIX + path
    self.data = _read(path, self.name, 'SentencePiece model file')
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_proto=self.data)
    except RuntimeError:  # Its message is the parser's internals.
      raise ValueError(f'data.tokenizer={self.name}: {path} is not a SentencePiece model (it does '
                       'not parse); point it at a .model file.') from None
    sp, self._size = self._sp, self._sp.get_piece_size()
    option = f' extra_ids={extra_ids}'.encode() if extra_ids else b''
    self.fingerprint = _sha256(self.data + option)
    self.vocab_size = self._size + extra_ids
    self.sentinel_ids = tuple(self.vocab_size - 1 - i for i in range(extra_ids))
    self._sentinels = {s: i for i, s in enumerate(self.sentinel_ids)}
    for attribute in ('pad_id', 'bos_id', 'eos_id', 'unk_id'):
      index = getattr(sp, attribute)()
      setattr(self, attribute, index if index >= 0 else None)
    for attribute, names in self._NAMES.items():
      # piece_to_id answers unk for a piece it lacks: only an exact match counts.
      found = [i for i in map(sp.piece_to_id, names) if sp.id_to_piece(i) in names]
      setattr(self, attribute, found[0] if found else None)
    pieces = [sp.id_to_piece(i) for i in range(self._size)]
    control = [i for i in range(self._size) if sp.is_control(i) or sp.is_unknown(i)]
    self.special_ids = _defined(self, control + list(self.sentinel_ids))
    starts = np.asarray([p.startswith('▁') for p in pieces] + [True] * extra_ids)
    starts[control] = True
    self._continues = ~starts

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids):
    """Text of `ids`: control tokens stand for no text, sentinels read <extra_id_i>, and ids
    past the vocabulary (a model's padded embedding rows) stand for no text."""
    parts, run = [], []
    for index in (int(i) for i in np.asarray(ids).reshape(-1)):
      if index in self._sentinels:
        parts += [self._sp.decode(run), f'<extra_id_{self._sentinels[index]}>']
        run = []
      elif 0 <= index < self._size:
        run.append(index)
    return ''.join(parts + [self._sp.decode(run)])

  def word_ids(self, ids):
    return _word_ids(self._continues, ids)

  def text_bytes(self):
    """UTF-8 bytes of text each id stands for: a byte-fallback piece one, a word-start mark a
    space, control pieces and sentinels none."""
    lengths = np.zeros(self.vocab_size, np.int32)
    special = set(self.special_ids)
    for index in range(self._size):
      if index in special:
        continue
      piece = self._sp.id_to_piece(index)
      lengths[index] = 1 if self._sp.is_byte(index) else len(piece.replace('▁', ' ').encode())
    return lengths


_FORMS = ("'bytes', 'hf:DIR' (a Hugging Face model directory with a tokenizer.json) or "
          "'spm:FILE' (a SentencePiece .model file)")


def check_name(name):
  """Checks the form of a data.tokenizer setting (not whether its file exists)."""
  prefixed = isinstance(name, str) and name.startswith((HF_PREFIX, SPM_PREFIX))
  if name != BYTES and not (prefixed and name.split(':', 1)[1]):
    raise ValueError(f'data.tokenizer={name!r} is not one of {_FORMS}.')


def get(name, extra_ids=0):
  """The tokenizer data.tokenizer=`name` names, with `extra_ids` T5 sentinels (spm, bytes)."""
  check_name(name)
  if not isinstance(extra_ids, int) or isinstance(extra_ids, bool) or extra_ids < 0:
    raise ValueError(f'extra_ids={extra_ids!r} must be a non-negative integer.')
  if extra_ids and name.startswith(HF_PREFIX):
    raise ValueError(f'data.tokenizer={name} takes no extra_ids (asked for {extra_ids}); '
                     'T5 sentinels come with an spm: or the bytes tokenizer, so set extra_ids '
                     'to 0.')
  if name.startswith(HF_PREFIX):
    return HfTokenizer(name[len(HF_PREFIX):], name)
  if name.startswith(SPM_PREFIX):
    return SentencePieceTokenizer(name[len(SPM_PREFIX):], extra_ids, name)
  return ByteTokenizer(extra_ids)


def require(tokenizer, names, purpose):
  """Raises one sentence when `tokenizer` lacks a special id among `names` (e.g. 'mask_id') that
  `purpose` (e.g. 'objective.name=mlm') needs; returns the tokenizer."""
  missing = [_TOKEN_NAMES[n] for n in names if getattr(tokenizer, n) is None]
  if missing:
    listed = ', '.join(missing[:-1]) + (' or ' if len(missing) > 1 else '') + missing[-1]
    raise ValueError(f'The tokenizer {tokenizer.name} has no {listed} token, which {purpose} '
                     'needs; use a tokenizer trained with the special tokens (python -m '
                     'research.data.tokenizer train ... adds padding, [CLS], [SEP] and [MASK]).')
  return tokenizer


def filler_id(tokenizer):
  """An id for positions that hold no token (masked out, never predicted, cut from outputs):
  padding when the tokenizer has it (GPT-2 has none), else end-of-sequence, else 0."""
  for index in (tokenizer.pad_id, tokenizer.eos_id):
    if index is not None:
      return index
  return 0


def continuation_text(tokenizer, prompt_ids, ids):
  """The text `ids` add after `prompt_ids`. SentencePiece drops the leading space of a decoded
  sequence, so the continuation is decoded after its prompt and the prompt's text cut off."""
  prompt_ids = [int(i) for i in prompt_ids]
  head, whole = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + [int(i) for i in ids])
  if whole.startswith(head):
    return whole[len(head):]
  # The prompt ends inside a character that `ids` complete (bytes): its text cannot be cut off.
  return tokenizer.decode(ids)


def padded_vocab_size(n, multiple=128):
  """The smallest multiple of `multiple` >= n: set model.vocab_size to it (the sharded embedding
  and its output layer want a multiple of 128; ids past the tokenizer's are never seen)."""
  if n < 1 or multiple < 1:
    raise ValueError(f'padded_vocab_size needs positive sizes, got n={n} and multiple={multiple}.')
  return -(-n // multiple) * multiple


def _write(path, data):
  """Writes a file whole or not at all (a reader never sees half of it)."""
  with open(path + '.tmp', 'wb') as f:
    f.write(data)
  os.replace(path + '.tmp', path)


def save(tokenizer, directory):
  """Copies what rebuilds `tokenizer` into `directory`: its file (tokenizer.json or
  tokenizer.model) and a record of its kind, extra_ids, name and fingerprint, written last."""
  os.makedirs(directory, exist_ok=True)
  if tokenizer.file:
    _write(os.path.join(directory, tokenizer.file), tokenizer.data)
  record = dict(kind=tokenizer.kind, name=tokenizer.name, extra_ids=len(tokenizer.sentinel_ids),
                fingerprint=tokenizer.fingerprint, file=tokenizer.file)
  _write(os.path.join(directory, _RECORD), json.dumps(record, indent=2).encode())


_KINDS = {c.kind: c for c in (ByteTokenizer, HfTokenizer, SentencePieceTokenizer)}


def load_saved(directory):
  """The tokenizer `save` wrote into `directory` (same fingerprint), or None when there is no
  such directory. Its name is the spec that reads the saved copy (hf:DIR or spm:DIR/FILE)."""
  if directory is None or not os.path.isdir(directory):
    return None

  def damaged(why):
    return ValueError(f'The saved tokenizer in {directory} is damaged ({why}); restore the folder '
                      'from a copy, or delete it to use data.tokenizer again.')
  try:
    with open(os.path.join(directory, _RECORD)) as f:
      record = json.load(f)
    kind, extra_ids, fingerprint = record['kind'], record['extra_ids'], record['fingerprint']
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise damaged(f'{_RECORD} is missing or unreadable: {type(error).__name__}') from None
  if kind not in _KINDS:
    raise damaged(f'{_RECORD} names kind {kind!r}, not one of {sorted(_KINDS)}')
  directory = os.path.abspath(directory)
  try:
    if kind == 'bytes':
      tokenizer = ByteTokenizer(extra_ids)
    elif kind == 'hf':
      tokenizer = HfTokenizer(directory, HF_PREFIX + directory)
    else:
      path = os.path.join(directory, SentencePieceTokenizer.file)
      tokenizer = SentencePieceTokenizer(path, extra_ids, SPM_PREFIX + path)
  except (ValueError, TypeError):
    raise damaged(f'its {_KINDS[kind].file} is missing or unreadable') from None
  if tokenizer.fingerprint != fingerprint:
    raise damaged(f'its {tokenizer.file or "layout"} has fingerprint '
                  f'{tokenizer.fingerprint[:12]}..., not the recorded {str(fingerprint)[:12]}...')
  return tokenizer


# Training a SentencePiece model.

MODEL_TYPES = ('unigram', 'bpe')
_CONTROL = ['[CLS]', '[SEP]', '[MASK]']  # Never produced from text: MLM and pairs place them.
_MAX_LINE = 4096  # Characters per training sentence (SentencePiece skips longer ones).


def _sentences(texts, max_bytes, capped=None):
  """The non-empty lines of `texts` (without their newline, which is a piece of its own) in chunks
  of at most _MAX_LINE characters, until `max_bytes` of UTF-8 are read (then True is appended to
  the list `capped`)."""
  total = 0
  for text in texts:
    for line in filter(None, text.split('\n')):
      for start in range(0, len(line), _MAX_LINE):
        chunk = line[start:start + _MAX_LINE]
        total += len(chunk.encode('utf-8', errors='replace')) + 1
        if max_bytes is not None and total > max_bytes:
          if capped is not None:
            capped.append(True)
          return
        yield chunk


def train(texts, vocab_size, model_type, out_prefix, max_bytes=None, num_threads=None):
  """Trains a SentencePiece model on the iterable of documents `texts` and writes
  `out_prefix`.model; returns its path.

  Layout: pad=0, eos=1, unk=2, bos=3, then control pieces [CLS] [SEP] [MASK] (so MLM works) and
  the newline as a piece; byte fallback, so any UTF-8 text round-trips. Text is not normalised
  and whitespace is kept (code), digits are split.
  """
  import sentencepiece
  if model_type not in MODEL_TYPES:
    raise ValueError(f'model_type={model_type!r} is not one of {list(MODEL_TYPES)}.')
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f'vocab_size={vocab_size!r} must be a positive integer.')
  counted, capped = [0], []

  def sentences():
    for sentence in _sentences(texts, max_bytes, capped):
      counted[0] += 1
      yield sentence
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=3,
        control_symbols=_CONTROL, user_defined_symbols=['\n'], byte_fallback=True,
        character_coverage=0.9995, normalization_rule_name='identity',
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=4 * _MAX_LINE, input_sentence_size=10_000_000,
        shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count(), minloglevel=2)
  except RuntimeError as error:
    raise ValueError(_training_error(str(error), vocab_size, counted[0],
                                     max_bytes if capped else None)) from None
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  path = out_prefix + '.model'
  _write(path, model.getvalue())
  return path


def _training_error(message, vocab_size, sentences, max_bytes=None):
  """One sentence for SentencePiece's own error `message`."""
  if sentences == 0:
    within = f' within its first --max_bytes={max_bytes} bytes' if max_bytes else ''
    more = ' or raise --max_bytes' if max_bytes else ''
    return f'The training input holds no text{within}; pass files with some{more}.'
  high = re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', message)
  if high:
    return (f'vocab_size={vocab_size} is more than this text yields (at most {high.group(1)}); '
            'lower it or train on more text.')
  low = re.search(r'Vocabulary size is smaller than required_chars\. \d+ vs (\d+)', message)
  if low:
    return (f'vocab_size={vocab_size} is smaller than the {low.group(1)} pieces the characters, '
            'bytes and special tokens of this text need; raise it.')
  first = message.strip().splitlines()[0] if message.strip() else 'no reason given'
  return f'SentencePiece training failed ({first.rstrip(".")}).'


def source_texts(specs, data_dir, text_field, validation_percent, train_split='train'):
  """The training split's documents of data sources named like data.source / data.mixture
  entries (research/data/sources.py: text:GLOB, jsonl:FILE, parquet:FILE, tfds:NAME, stdlib),
  read part by part, so that a corpus need not fit in memory; undecodable bytes are replaced.

  Sources take turns document by document, and each visits its parts in a fixed shuffled
  order, so that a --max_bytes sample spans every source and the whole of each."""
  import itertools
  import ml_collections
  from research.data import sources  # Imported on use: only training reads sources here.
  settings = ml_collections.ConfigDict(dict(
      data_dir=data_dir, text_field=text_field, validation_percent=validation_percent,
      train_split=train_split, validation_split=train_split))  # Validation is not read here.

  def documents(source):
    parts = source.parts('train')
    for index in np.random.default_rng(0).permutation(len(parts)):
      for piece, _, _ in source.documents(parts[index]):
        yield piece.decode('utf-8', errors='replace') if isinstance(piece, bytes) else piece

  streams = [documents(sources.build(spec, settings, setting='--source')) for spec in specs]
  for turn in itertools.zip_longest(*streams):
    yield from (text for text in turn if text is not None)


def main(argv):
  parser = cli.Parser(prog='python -m research.data.tokenizer')
  commands = parser.add_subparsers(dest='command', parser_class=cli.Parser)
  command = commands.add_parser('train', help='Train a SentencePiece model on text.')
  command.add_argument('--source', action='append', required=True,
                       help='A data source, as data.source or a data.mixture entry: stdlib, '
                       'text:GLOBS, jsonl:FILES, parquet:FILES, tfds:NAME (repeatable).')
  command.add_argument('--data_dir', default='~/.cache/research/tfds',
                       help='tfds sources: where the dataset is prepared.')
  command.add_argument('--validation_percent', type=int, default=5,
                       help='Of local sources: the validation share, left out of training.')
  command.add_argument('--train_split', default='train',
                       help='tfds sources: the split read (TFDS slicing allowed).')
  command.add_argument('--overwrite', action='store_true', help='Replace an existing model.')
  command.add_argument('--vocab_size', type=int, required=True)
  command.add_argument('--model_type', default='unigram', help='unigram or bpe.')
  command.add_argument('--out', required=True, help='Output prefix: writes PREFIX.model.')
  command.add_argument('--max_bytes', type=int, default=10**9, help='Text read at most.')
  command.add_argument('--text_field', default='text',
                       help='jsonl, parquet, tfds sources: the field that holds the text.')
  command.add_argument('--extra_ids', type=int, default=0, help='T5 sentinels to use it with.')
  try:
    args = parser.parse_args(argv[1:])
    if args.command != 'train':
      raise ValueError('Pass a command: train --source SOURCE --vocab_size N --out PREFIX.')
    if args.model_type not in MODEL_TYPES:
      raise ValueError(f'--model_type={args.model_type} is not one of {list(MODEL_TYPES)}.')
    if args.max_bytes < 1 or args.extra_ids < 0:
      raise ValueError('--max_bytes must be positive and --extra_ids not negative.')
    if not 1 <= args.validation_percent <= 50:  # As data.validation_percent, which reads it.
      raise ValueError(f'--validation_percent={args.validation_percent} must lie in [1, 50], as '
                       'data.validation_percent of the runs that use the tokenizer.')
    cli.check_file(args.out, '--out')  # A prefix: PREFIX.model is written.
    if os.path.exists(args.out + '.model') and not args.overwrite:
      raise ValueError(f'{args.out}.model exists; pass --overwrite to replace it, or another '
                       '--out.')
    texts = source_texts(args.source, args.data_dir, args.text_field, args.validation_percent,
                         args.train_split)
    path = train(texts, args.vocab_size, args.model_type, args.out, args.max_bytes)
    tokenizer = get(SPM_PREFIX + path, args.extra_ids)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {path} ({tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint[:12]})')
  extra = f' --config.data.extra_ids={args.extra_ids}' if args.extra_ids else ''
  print(f'--config.data.tokenizer={tokenizer.name}{extra} '
        f'--config.model.vocab_size={padded_vocab_size(tokenizer.vocab_size)}')
  return 0


if __name__ == '__main__':
  cli.exit_on_interrupt('Interrupted; no tokenizer was written.')
  sys.exit(main(sys.argv))
