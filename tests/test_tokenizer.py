"""Tokenizers: SentencePiece models trained here and T5's layout, Hugging Face tokenizer.json files
of GPT-2, Llama, BERT and RoBERTa, fingerprints, saving into a workdir, and the training command."""

import functools
import hashlib
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import runs
from research.data import tokenizer as tokenizer_lib

_cli = functools.partial(runs.in_process, 'research.data.tokenizer')

_WORDS = ('def class return self import numpy the of and print value for in range if else while '
          'naïve café straße').split()


def _documents(count=12, lines=40, seed=0):
  """A few KB of code-like text with indentation, digits and some non-ASCII words."""
  rng = random.Random(seed)
  return ['\n'.join('    ' * rng.randint(0, 2) + ' '.join(rng.choice(_WORDS) for _ in range(6))
                    + f' = {rng.randint(0, 999)}' for _ in range(lines)) for _ in range(count)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """{model_type: path} of SentencePiece models of 300 pieces trained by `train`."""
  root = tmp_path_factory.mktemp('spm')
  return {kind: tokenizer_lib.train(_documents(), 300, kind, str(root / kind))
          for kind in tokenizer_lib.MODEL_TYPES}


def _t5_like(path):
  """A SentencePiece model in T5's layout: pad=0, eos=1, unk=2, no bos, no [CLS]/[SEP]/[MASK]."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter('\n'.join(_documents(seed=1)).split('\n')), model_writer=model,
      vocab_size=80, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  path.write_bytes(model.getvalue())
  return str(path)


TEXTS = ['def f(self):\n\treturn 1  # ok\n', '  leading and trailing  ',
         'naïve 日本語 ✓ 🙂', 'a\r\nb', '']


@pytest.mark.parametrize('kind', tokenizer_lib.MODEL_TYPES)
def test_a_trained_model_round_trips_any_text_and_has_the_documented_ids(trained, kind):
  tokenizer = tokenizer_lib.get(f'spm:{trained[kind]}')
  assert tokenizer.name == f'spm:{trained[kind]}'
  assert tokenizer.vocab_size == 300 and tokenizer.sentinel_ids == ()
  ids = {name: getattr(tokenizer, name) for name in tokenizer_lib.SPECIAL_NAMES}
  assert ids == dict(pad_id=0, eos_id=1, unk_id=2, bos_id=3, cls_id=4, sep_id=5, mask_id=6)
  assert tokenizer.special_ids == (0, 1, 2, 3, 4, 5, 6)
  for text in TEXTS:  # Characters never seen in training come back through byte pieces.
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and tokenizer.decode(ids) == text
    np.testing.assert_array_equal(tokenizer.encode(text.encode('utf-8')), ids)
    assert not np.isin(ids, tokenizer.special_ids).any()
  # Control tokens and ids past the vocabulary (padded embedding rows) stand for no text.
  ids = tokenizer.encode('return self')
  assert tokenizer.decode([tokenizer.cls_id, *ids, tokenizer.sep_id, 300, 4000]) == 'return self'
  words = tokenizer.word_ids(ids)
  assert words[0] == 0 and words[-1] == 1 and np.all(np.diff(words) >= 0)


def test_a_continuation_keeps_the_space_sentencepiece_drops_at_the_start(trained):
  tokenizer = tokenizer_lib.get(f'spm:{trained["unigram"]}')
  ids = tokenizer.encode('return self').tolist()
  cut = max(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]) == 'return')
  assert tokenizer.decode(ids[cut:]) == 'self'  # A sequence's leading space is dropped...
  assert tokenizer_lib.continuation_text(tokenizer, ids[:cut], ids[cut:]) == ' self'  # ...kept.
  assert tokenizer_lib.continuation_text(tokenizer_lib.get('bytes'), [104 + 3], [105 + 3]) == 'i'


def test_sentinels_sit_above_the_vocabulary_with_extra_id_0_highest(trained):
  plain = tokenizer_lib.get(f'spm:{trained["unigram"]}')
  t5 = tokenizer_lib.get(f'spm:{trained["unigram"]}', extra_ids=5)
  assert t5.vocab_size == 305 and t5.sentinel_ids == (304, 303, 302, 301, 300)
  assert set(t5.sentinel_ids) <= set(t5.special_ids)
  ids = plain.encode('return 7')
  np.testing.assert_array_equal(t5.encode('return 7'), ids)  # Text never becomes a sentinel.
  text = t5.decode([304, *ids, 303, 300])
  assert text == '<extra_id_0>return 7<extra_id_1><extra_id_4>'
  assert len(t5.word_ids([304, *ids, 303])) == len(ids) + 2
  assert t5.fingerprint != plain.fingerprint
  assert t5.fingerprint != tokenizer_lib.get(f'spm:{trained["unigram"]}', extra_ids=4).fingerprint


def test_byte_sentinels_take_byt5s_ids_and_survive_saving(tmp_path):
  """ByT5's vocabulary of 384: 122 sentinels above our 262 ids, <extra_id_0> = 383."""
  tokenizer = tokenizer_lib.get('bytes', extra_ids=122)
  assert tokenizer.vocab_size == 384 and tokenizer.sentinel_ids[:2] == (383, 382)
  assert tokenizer.sentinel_ids[-1] == 262 and set(tokenizer.sentinel_ids) <= set(
      tokenizer.special_ids)
  assert tokenizer.encode('ab').tolist() == tokenizer_lib.ByteTokenizer().encode('ab').tolist()
  assert tokenizer.decode([100, 383, 101, 382]) == 'a<extra_id_0>b<extra_id_1>'
  assert tokenizer.fingerprint != tokenizer_lib.ByteTokenizer().fingerprint
  tokenizer_lib.save(tokenizer, str(tmp_path / 'saved'))
  loaded = tokenizer_lib.load_saved(str(tmp_path / 'saved'))
  assert (loaded.fingerprint, loaded.sentinel_ids) == (tokenizer.fingerprint,
                                                       tokenizer.sentinel_ids)


def test_t5s_layout_has_no_bos_and_no_encoder_tokens(tmp_path):
  path = _t5_like(tmp_path / 't5.model')
  tokenizer = tokenizer_lib.get(f'spm:{path}', extra_ids=3)
  ids = {name: getattr(tokenizer, name) for name in tokenizer_lib.SPECIAL_NAMES}
  assert ids == dict(pad_id=0, eos_id=1, unk_id=2, bos_id=None, cls_id=None, sep_id=None,
                     mask_id=None)
  assert tokenizer.special_ids == (0, 1, 2, 80, 81, 82)
  with pytest.raises(ValueError) as error:
    tokenizer_lib.require(tokenizer, ('cls_id', 'sep_id', 'mask_id'), 'objective.name=mlm')
  assert str(error.value) == (
      f'The tokenizer spm:{path} has no [CLS], [SEP] or [MASK] token, which objective.name=mlm '
      'needs; use a tokenizer trained with the special tokens (python -m research.data.tokenizer '
      'train ... adds padding, [CLS], [SEP] and [MASK]).')
  with pytest.raises(ValueError, match=r'has no beginning-of-sequence token, which x needs'):
    tokenizer_lib.require(tokenizer, ('bos_id',), 'x')
  assert tokenizer_lib.require(tokenizer, ('pad_id', 'eos_id'), 'x') is tokenizer


def _hf_json(directory, model, specials, pre_tokenizer, decoder, text_tokens=()):
  """Trains a small tokenizer.json; `specials` are added (marked special) first, in order, and
  `text_tokens` last as added tokens that are not special."""
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizer, decoder
  trainer = (trainers.WordPieceTrainer if isinstance(model, models.WordPiece)
             else trainers.BpeTrainer)(vocab_size=200, special_tokens=list(specials))
  tokenizer.train_from_iterator(_documents(), trainer)
  tokenizer.add_tokens(list(text_tokens))
  os.makedirs(directory, exist_ok=True)
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  return str(directory)


HF_STYLES = {
    # GPT-2: byte-level BPE, one <|endoftext|> for both ends, no padding.
    'gpt2': (lambda: models.BPE(), ['<|endoftext|>'], pre_tokenizers.ByteLevel, decoders.ByteLevel,
             dict(pad_id=None, bos_id=0, eos_id=0, unk_id=None, cls_id=None, sep_id=None,
                  mask_id=None)),
    # Llama: SentencePiece-style BPE with <unk> <s> </s>: a decoder's, so no [CLS]/[SEP].
    'llama': (lambda: models.BPE(unk_token='<unk>'), ['<unk>', '<s>', '</s>'],
              pre_tokenizers.Metaspace, decoders.Metaspace,
              dict(pad_id=None, bos_id=1, eos_id=2, unk_id=0, cls_id=None, sep_id=None,
                   mask_id=None)),
    'bert': (lambda: models.WordPiece(unk_token='[UNK]'),
             ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'], pre_tokenizers.Whitespace,
             decoders.WordPiece,
             dict(pad_id=0, bos_id=None, eos_id=None, unk_id=1, cls_id=2, sep_id=3, mask_id=4)),
    # RoBERTa frames its inputs with <s> and </s>, which are also its bos and eos.
    'roberta': (lambda: models.BPE(), ['<s>', '<pad>', '</s>', '<unk>', '<mask>'],
                pre_tokenizers.ByteLevel, decoders.ByteLevel,
                dict(pad_id=1, bos_id=0, eos_id=2, unk_id=3, cls_id=0, sep_id=2, mask_id=4)),
}


@pytest.mark.parametrize('style', sorted(HF_STYLES))
def test_hugging_face_tokenizers_give_their_own_special_ids(tmp_path, style):
  model, specials, pre_tokenizer, decoder, expected = HF_STYLES[style]
  # A vocabulary may hold '<s>' as text: only tokens marked special count.
  directory = _hf_json(tmp_path, model(), specials, pre_tokenizer(), decoder(),
                       text_tokens=['<s>', '</s>', '[MASK]'] if style == 'gpt2' else ())
  tokenizer = tokenizer_lib.get(f'hf:{directory}')
  assert {name: getattr(tokenizer, name) for name in tokenizer_lib.SPECIAL_NAMES} == expected
  assert tokenizer.special_ids == tuple(range(len(specials)))
  if style == 'gpt2':
    assert tokenizer.encode('<s>').tolist() == [tokenizer.vocab_size - 3]
  assert tokenizer.fingerprint == hashlib.sha256(
      (tmp_path / 'tokenizer.json').read_bytes()).hexdigest()
  # Positions without a token: padding, else (GPT-2, Llama) end-of-sequence.
  assert tokenizer_lib.filler_id(tokenizer) == (expected['pad_id'] if expected['pad_id'] is not None
                                                else expected['eos_id'])
  text = 'return self value'
  ids = tokenizer.encode(text)
  assert not np.isin(ids, tokenizer.special_ids).any()
  assert tokenizer.decode([*ids, *tokenizer.special_ids, tokenizer.vocab_size + 7]).strip() == text
  words = tokenizer.word_ids(ids)
  assert words[0] == 0 and words[-1] == 2 and np.all(np.diff(words) >= 0)
  if style in ('gpt2', 'llama'):
    with pytest.raises(ValueError, match=rf'tokenizer hf:{directory} has no \[MASK\] token'):
      tokenizer_lib.require(tokenizer, ('mask_id',), 'objective.name=mlm')


def test_padded_vocab_size():
  assert [tokenizer_lib.padded_vocab_size(n) for n in (1, 128, 129, 32000, 50257)] == [
      128, 128, 256, 32000, 50304]
  assert tokenizer_lib.padded_vocab_size(300, multiple=64) == 320
  with pytest.raises(ValueError, match='positive sizes'):
    tokenizer_lib.padded_vocab_size(0)


def test_resuming_with_other_sentinels_names_them_for_the_saved_copy_of_a_file(trained, tmp_path):
  # The run's saved copy has another name (spm:WORKDIR/tokenizer/...) than the configured file.
  import ml_collections
  from research import train
  from research.data import pipeline as pipeline_lib
  spm = f'spm:{trained["bpe"]}'
  tokenizer_lib.save(tokenizer_lib.get(spm, extra_ids=100),
                     str(tmp_path / 'run' / tokenizer_lib.SAVED_DIR))
  config = ml_collections.ConfigDict(dict(data=dict(source='text', tokenizer=spm, extra_ids=0)))
  with pytest.raises(pipeline_lib.DataError) as error:
    train._check_tokenizer(str(tmp_path / 'run'), config)
  assert str(error.value) == (f'{tmp_path / "run"} was trained with the tokenizer {spm} and 100 '
                              'sentinel ids, and this run would add 0; resume with '
                              '--config.data.extra_ids=100, or start a new --workdir.')
  config.data.extra_ids = 100
  train._check_tokenizer(str(tmp_path / 'run'), config)
  config.data.tokenizer = f'spm:{trained["unigram"]}'  # Another vocabulary altogether.
  with pytest.raises(pipeline_lib.DataError, match=r'and this run would use spm:.*unigram'):
    train._check_tokenizer(str(tmp_path / 'run'), config)


def test_saved_tokenizers_rebuild_with_the_same_fingerprint(trained, tmp_path):
  spm_path = trained['bpe']
  hf_dir = _hf_json(tmp_path / 'hf', models.BPE(), ['<|endoftext|>'], pre_tokenizers.ByteLevel(),
                    decoders.ByteLevel())
  originals = [tokenizer_lib.get('bytes'), tokenizer_lib.get(f'spm:{spm_path}', extra_ids=2),
               tokenizer_lib.get(f'hf:{hf_dir}')]
  fingerprints = {t.fingerprint for t in originals}
  assert len(fingerprints) == 3 and all(len(f) == 64 for f in fingerprints)
  # Without options a file's fingerprint is its sha256; another file has another one.
  with open(spm_path, 'rb') as f:
    assert tokenizer_lib.get(f'spm:{spm_path}').fingerprint == hashlib.sha256(f.read()).hexdigest()
  assert (tokenizer_lib.get(f'spm:{trained["unigram"]}').fingerprint
          != tokenizer_lib.get(f'spm:{spm_path}').fingerprint)
  for index, original in enumerate(originals):
    directory = tmp_path / f'run{index}' / tokenizer_lib.SAVED_DIR
    tokenizer_lib.save(original, str(directory))
    if original.name != 'bytes':  # Read from the saved copy, not the original file.
      shutil.move(spm_path if original.name.startswith('spm:') else hf_dir, tmp_path / 'moved')
    loaded = tokenizer_lib.load_saved(str(directory))
    if original.name != 'bytes':
      shutil.move(tmp_path / 'moved', spm_path if original.name.startswith('spm:') else hf_dir)
    assert type(loaded) is type(original) and loaded.fingerprint == original.fingerprint
    assert loaded.vocab_size == original.vocab_size
    assert loaded.sentinel_ids == original.sentinel_ids
    np.testing.assert_array_equal(loaded.encode('return café'), original.encode('return café'))
    assert tokenizer_lib.get(loaded.name, len(loaded.sentinel_ids)).fingerprint == (
        original.fingerprint)
  assert tokenizer_lib.load_saved(str(tmp_path / 'missing')) is None
  assert tokenizer_lib.load_saved(None) is None


def _replace(name, data):
  return lambda directory: (directory / name).write_bytes(data)


@pytest.mark.parametrize('damage, fragment', [
    (lambda d: (d / 'tokenizer_record.json').unlink(), 'tokenizer_record.json is missing'),
    (_replace('tokenizer_record.json', b'{"kind": "spm",'), 'tokenizer_record.json is missing or '
                                                            'unreadable: JSONDecodeError'),
    (_replace('tokenizer_record.json', b'{"kind": "wordpiece", "extra_ids": 0, "fingerprint": ""}'),
     "names kind 'wordpiece'"),
    (lambda d: (d / 'tokenizer.model').unlink(), 'its tokenizer.model is missing or unreadable'),
    (lambda d: (d / 'tokenizer.model').write_bytes((d / 'tokenizer.model').read_bytes()[:99]),
     'its tokenizer.model is missing or unreadable'),
    (lambda d: shutil.copy(d.parent / 'other.model', d / 'tokenizer.model'),
     'its tokenizer.model has fingerprint'),
])
def test_a_damaged_saved_tokenizer_stops_with_one_sentence(trained, tmp_path, damage, fragment):
  directory = tmp_path / 'tokenizer'
  tokenizer_lib.save(tokenizer_lib.get(f'spm:{trained["unigram"]}', extra_ids=1), str(directory))
  shutil.copy(trained['bpe'], tmp_path / 'other.model')
  damage(directory)
  with pytest.raises(ValueError) as error:
    tokenizer_lib.load_saved(str(directory))
  message = str(error.value)
  assert message.startswith(f'The saved tokenizer in {directory} is damaged (')
  assert fragment in message
  assert message.endswith('delete it to use data.tokenizer again.') and '\n' not in message


@pytest.mark.parametrize('name, extra_ids, fragment', [
    ('sentencepiece', 0, "data.tokenizer='sentencepiece' is not one of 'bytes', 'hf:DIR'"),
    ('spm:', 0, "data.tokenizer='spm:' is not one of"),
    ('spm:{tmp}/missing.model', 0, 'data.tokenizer=spm:{tmp}/missing.model names no SentencePiece '
                                   'model file ({tmp}/missing.model is not a file)'),
    ('spm:{tmp}/bad.model', 0, 'data.tokenizer=spm:{tmp}/bad.model: {tmp}/bad.model is not a '
                               'SentencePiece model'),
    ('hf:{tmp}', 0, 'data.tokenizer=hf:{tmp} names no folder with a tokenizer.json'),
    ('hf:{tmp}/bad', 0, '{tmp}/bad/tokenizer.json is not a readable tokenizer.json'),
    ('hf:{tmp}/bad', 3, 'data.tokenizer=hf:{tmp}/bad takes no extra_ids (asked for 3)'),
    ('spm:{tmp}/bad.model', -1, 'extra_ids=-1 must be a non-negative integer'),
])
def test_bad_tokenizer_settings_stop_with_one_sentence(tmp_path, name, extra_ids, fragment):
  (tmp_path / 'bad.model').write_bytes(b'not a model')
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'tokenizer.json').write_text('{"model": ')
  with pytest.raises(ValueError) as error:
    tokenizer_lib.get(name.format(tmp=tmp_path), extra_ids)
  message = str(error.value)
  assert fragment.format(tmp=tmp_path) in message and message.endswith('.'), message


def test_the_train_command_writes_a_model_that_data_tokenizer_reads(tmp_path):
  corpus = tmp_path / 'corpus'
  (corpus / 'src').mkdir(parents=True)
  for i, document in enumerate(_documents()[:8]):
    (corpus / 'src' / f'f{i}.py').write_text(document)
  (corpus / 'src' / 'latin1.txt').write_bytes(b'caf\xe9 au lait\n' * 20)  # Undecodable: replaced.
  records = [dict(text=d, id=i) for i, d in enumerate(_documents(seed=3)[:4])]
  (corpus / 'docs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  out = tmp_path / 'tok' / 'code'
  result = runs.ok(_cli('train', '--source', f'text:{corpus / "src"}', '--source',
                        f'jsonl:{corpus / "*.jsonl"}', '--vocab_size', '320', '--model_type',
                        'bpe', '--out', str(out), '--extra_ids', '4', '--validation_percent=1'))
  path = f'{out}.model'
  assert result.stdout.splitlines()[-1] == (f'--config.data.tokenizer=spm:{path} '
                                            '--config.data.extra_ids=4 '
                                            '--config.model.vocab_size=384')
  tokenizer = tokenizer_lib.get(f'spm:{path}', extra_ids=4)
  assert tokenizer.vocab_size == 324 and tokenizer.mask_id == 6
  for text in TEXTS + ['café au lait']:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # --max_bytes caps the text read: too little text for the asked vocabulary.
  runs.assert_error(_cli('train', '--source', f'text:{corpus / "src"}', '--vocab_size', '320',
                         '--out', str(out) + '_small', '--max_bytes', '500'),
                    'vocab_size=320 is more than this text yields (at most')


@pytest.mark.parametrize('args, fragment', [
    (['train', '--source', 'text:{tmp}/nothing*', '--vocab_size', '300', '--out', '{tmp}/m'],
     "Source '{tmp}/nothing*' matches no file; fix --source"),
    (['train', '--source', 'text:{tmp}/empty', '--vocab_size', '300', '--out', '{tmp}/m'],
     "Source '{tmp}/empty' matches no file; fix --source"),
    (['train', '--source', 'text:{tmp}/a.txt', '--vocab_size', '20', '--out', '{tmp}/m'],
     'vocab_size=20 is smaller than the'),
    (['train', '--source', 'text:{tmp}/a.txt', '--vocab_size', '300', '--out', '{tmp}/m',
      '--model_type', 'char'], "--model_type=char is not one of ['unigram', 'bpe']"),
    (['train', '--source', 'jsonl:{tmp}/a.jsonl', '--vocab_size', '300', '--out', '{tmp}/m',
      '--validation_percent', '1'], "of {tmp}/a.jsonl has no 'text' field; set data.text_field"),
    (['train', '--source', 'web:x', '--vocab_size', '300', '--out', '{tmp}/m'],
     "Data source 'web:x' is not one of"),
    (['train', '--source', 'text:{tmp}/blank.txt', '--vocab_size', '300', '--out', '{tmp}/m'],
     'The training input holds no text'),
    (['train', '--source', 'text:{tmp}/a.txt', '--vocab_size', '300', '--out', '{tmp}/m',
      '--max_bytes', '5'], 'The training input holds no text within its first --max_bytes=5 '
                           'bytes; pass files with some or raise --max_bytes.'),
    (['train', '--source', 'text:{tmp}/a.txt', '--vocab_size', '300', '--out', '{tmp}/m',
      '--validation_percent', '0'], '--validation_percent=0 must lie in [1, 50]'),
    (['train', '--source', 'text:{tmp}/a.txt', '--vocab_size', 'many', '--out', '{tmp}/m'],
     "Argument --vocab_size: invalid int value: 'many'"),
    (['train', '--vocab_size', '300', '--out', '{tmp}/m'],
     'The following arguments are required: --source'),
    (['fit'], "Argument command: invalid choice: 'fit'"),
    ([], 'Pass a command: train --source SOURCE'),
])
def test_the_train_command_stops_bad_input_with_one_sentence(tmp_path, args, fragment):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'a.txt').write_text('\n'.join(_documents(count=2)))
  (tmp_path / 'a.jsonl').write_text('{"text": "x"}\n{"body": "y"}\n')
  (tmp_path / 'blank.txt').write_text('')
  result = _cli(*[a.format(tmp=tmp_path) for a in args])
  runs.assert_error(result, fragment.format(tmp=tmp_path))
  assert not (tmp_path / 'm.model').exists()


def test_a_tokenizer_json_with_truncation_and_padding_encodes_documents_whole(tmp_path):
  model, specials, pre_tokenizer, decoder, _ = HF_STYLES['bert']
  directory = _hf_json(tmp_path, model(), specials, pre_tokenizer(), decoder())
  published = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
  published.enable_truncation(max_length=8)  # As many BERT exports ship (512).
  published.enable_padding(length=8, pad_id=0, pad_token='[PAD]')
  published.save(str(tmp_path / 'tokenizer.json'))
  text = ' '.join(['return self value'] * 20)
  assert len(published.encode(text, add_special_tokens=False).ids) == 8
  tokenizer = tokenizer_lib.get(f'hf:{directory}')
  ids = tokenizer.encode(text)
  assert len(ids) == 60 and tokenizer.decode(ids) == text


def test_the_train_command_reads_a_tfds_dataset_that_has_only_a_train_split(tmp_path):
  import tfds_fixtures
  tfds_fixtures.write_text_dataset(tmp_path / 'tfds', 'lm_text', 'en', '1.0.0',
                                   {'train': _documents(count=12)})
  out = tmp_path / 'tfds_model'
  result = runs.ok(_cli('train', '--source', 'tfds:lm_text/en', '--data_dir',
                        str(tmp_path / 'tfds'), '--vocab_size', '300', '--out', str(out)))
  assert result.stdout.splitlines()[-1].startswith(f'--config.data.tokenizer=spm:{out}.model ')
  runs.assert_error(_cli('train', '--source', 'tfds:lm_text/en', '--data_dir',
                         str(tmp_path / 'tfds'), '--vocab_size', '300', '--out', str(out)),
                    f'{out}.model exists; pass --overwrite to replace it, or another --out.')


ASCII_TEXTS = ['def f(self):\n\treturn 1  # ok\n', 'leading and trailing  ', 'a\r\nb']


def _spelt_bytes(tokenizer, text):
  return int(tokenizer.text_bytes()[tokenizer.encode(text)].sum())


def test_byte_ids_spell_one_byte_each_and_special_ids_none():
  tokenizer = tokenizer_lib.get('bytes', extra_ids=5)
  for text in TEXTS:
    assert _spelt_bytes(tokenizer, text) == len(text.encode('utf-8'))
  assert not tokenizer.text_bytes()[list(tokenizer.special_ids)].any()


@pytest.mark.parametrize('kind', tokenizer_lib.MODEL_TYPES)
def test_sentencepiece_pieces_spell_the_text_plus_its_dummy_prefix_space(trained, kind):
  tokenizer = tokenizer_lib.get(f'spm:{trained[kind]}', extra_ids=3)
  for text in TEXTS:  # Byte-fallback pieces (non-ASCII here) count one byte each.
    assert _spelt_bytes(tokenizer, text) == len(text.encode('utf-8')) + (text != '')
  assert not tokenizer.text_bytes()[list(tokenizer.special_ids)].any()


@pytest.mark.parametrize('style', sorted(HF_STYLES))
def test_hugging_face_pieces_spell_the_text_they_decode_to(tmp_path, style):
  model, specials, pre_tokenizer, decoder, _ = HF_STYLES[style]
  directory = _hf_json(tmp_path, model(), specials, pre_tokenizer(), decoder())
  tokenizer = tokenizer_lib.get(f'hf:{directory}')
  for text in ASCII_TEXTS:
    decoded = tokenizer.decode(tokenizer.encode(text))
    # (A byte the small vocabulary never saw is dropped by encoding, so compare with the decode.)
    expected = {'gpt2': len(decoded), 'roberta': len(decoded),
                'llama': len(decoded) + 1,  # Metaspace's prefix space, as SentencePiece.
                'bert': len(''.join(decoded.split()))}[style]  # WordPiece drops spaces.
    assert _spelt_bytes(tokenizer, text) == expected
  assert not tokenizer.text_bytes()[list(tokenizer.special_ids)].any()
