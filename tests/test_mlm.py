"""Masked language modelling: masking statistics, static vs dynamic masks, sentence pairs, and
the equivalences of training (sharded == one device, accumulated == one large batch)."""

import math
import os

import jax
import numpy as np
import pytest

from research import config as config_lib
from research import mesh as mesh_lib
from research import objectives
from research import train
from research.data import global_batch
from research.data import windows
from research.data import pipeline as pipeline_lib
from research.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizer_lib.ByteTokenizer()


def _config(pair='nsp', seq_len=32, **objective):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'encoder.py:bert_tiny'))
  m = config.model
  m.num_layers, m.num_heads, m.emb_dim, m.mlp_dim, m.pair_head = 2, 4, 64, 128, pair
  config.objective.pair = pair
  config.objective.max_predictions = 6
  config.objective.update(objective)
  t = config.train
  t.batch_size, t.seq_len, t.num_steps = 16, seq_len, 10
  config.optim.warmup_steps, config.optim.lr = 2, 1e-2
  return config


def _documents(count=40, seed=0, spaces=False):
  """Random text documents of varied lengths, each ended by EOS (as the pipeline does)."""
  rng = np.random.default_rng(seed)
  text = np.arange(3, 259)
  docs = []
  for _ in range(count):
    doc = rng.choice(text, int(rng.integers(5, 90)))
    if spaces:  # Words of a few letters between single spaces.
      doc[rng.random(len(doc)) < 0.2] = TOKENIZER.encode(' ')[0]
    docs.append(np.append(doc, TOKENIZER.eos_id))
  bounds = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  return np.concatenate(docs).astype(np.int32), bounds


def _rows(config, shuffle=True, **documents):
  tokens, bounds = _documents(**documents)
  transform = objectives.build(config).transform(TOKENIZER)
  return windows.Windows(_Store(tokens, bounds), config.train.seq_len, config.seed, shuffle,
                         transform), transform


class _Store:
  """An in-memory token stream with the TokenStore interface."""

  def __init__(self, tokens, bounds):
    self.tokens, self.split, self.num_tokens = tokens, 'train', len(tokens)
    self.docs = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))

  def read(self, start, length):
    return self.tokens[start:start + length], self.docs[start:start + length]


def _examples(transform, count, epoch=0, length=60, seed=1):
  rng = np.random.default_rng(seed)
  chunks = [np.append(rng.choice(np.arange(3, 259), length), TOKENIZER.eos_id)
            for _ in range(count)]
  return chunks, [transform.example(chunk, index, epoch, None) for index, chunk in
                  enumerate(chunks)]


def test_masking_statistics_over_many_examples():
  config = _config(pair='none', seq_len=64)
  config.objective.max_predictions = 64
  transform = objectives.build(config).transform(TOKENIZER)
  chunks, examples = _examples(transform, 3000)
  chosen = masked = replaced = kept = candidates = 0
  for chunk, example in zip(chunks, examples):
    ids = np.concatenate([[TOKENIZER.cls_id], chunk, [TOKENIZER.sep_id]])
    special = np.isin(ids, TOKENIZER.special_ids)
    weights = example['mlm_token_weights']
    assert not weights[special].any()  # [CLS], [SEP] and EOS are never chosen.
    np.testing.assert_array_equal(example['mlm_labels'][weights > 0], ids[weights > 0])
    np.testing.assert_array_equal(example['tokens'][weights == 0], ids[weights == 0])
    picked = weights > 0
    candidates += (~special).sum()
    chosen += picked.sum()
    masked += (example['tokens'][picked] == TOKENIZER.mask_id).sum()
    same = example['tokens'][picked] == ids[picked]
    kept += same.sum()
    replaced += (~same & (example['tokens'][picked] != TOKENIZER.mask_id)).sum()
    assert not np.isin(example['tokens'][picked], TOKENIZER.special_ids[:5]).any()
  assert abs(chosen / candidates - 0.15) < 0.005, chosen / candidates
  # A random replacement can draw the original token (1 in 256): "kept" grows by that much.
  assert abs(masked / chosen - 0.8) < 0.015, masked / chosen
  assert abs(replaced / chosen - 0.1) < 0.015, replaced / chosen
  assert abs(kept / chosen - 0.1) < 0.015, kept / chosen


def test_padding_is_never_chosen_and_rows_gather_their_predictions():
  config = _config(pair='none', max_predictions=3)  # Fewer than some rows choose.
  rows, _ = _rows(config)
  batch = rows.rows(0, 40)
  assert (batch['segment_ids'] == 0).any()  # Some rows end in padding...
  for r in range(40):
    slots = batch['mlm_weights'][r] > 0
    positions = batch['mlm_positions'][r][slots]
    assert np.all(batch['segment_ids'][r, positions] > 0)  # ...that is never predicted,
    assert len(np.unique(positions)) == len(positions)
    # and every masked input is among the predicted positions (overflow is shown unmasked).
    masked = np.flatnonzero(batch['tokens'][r] == TOKENIZER.mask_id)
    assert set(masked) <= set(positions.tolist())
  assert (batch['mlm_weights'].sum(axis=1) == config.objective.max_predictions).any()


def test_masks_follow_the_seed_repeat_every_epoch_if_static_and_change_reproducibly_if_dynamic():
  static = objectives.build(_config(pair='none', seq_len=64)).transform(TOKENIZER)
  dynamic_config = _config(pair='none', seq_len=64, dynamic_masking=True)
  dynamic = objectives.build(dynamic_config).transform(TOKENIZER)
  for transform, same_across_epochs in ((static, True), (dynamic, False)):
    first = _examples(transform, 50, epoch=0)[1]
    again = _examples(transform, 50, epoch=0)[1]
    later = _examples(transform, 50, epoch=3)[1]
    for a, b, c in zip(first, again, later):
      np.testing.assert_array_equal(a['tokens'], b['tokens'])  # Reproducible.
    differ = sum(not np.array_equal(a['tokens'], c['tokens']) for a, c in zip(first, later))
    assert differ == 0 if same_across_epochs else differ > 45, differ
  reseeded = _config(pair='none', seq_len=64)  # Another seed masks other tokens.
  reseeded.seed += 1
  other = _examples(objectives.build(reseeded).transform(TOKENIZER), 50)[1]
  first = _examples(static, 50)[1]
  assert sum(not np.array_equal(a['tokens'], b['tokens']) for a, b in zip(first, other)) > 45
  # Through the data: the rows of a resumed run equal those of an uninterrupted one.
  rows, _ = _rows(dynamic_config)
  count = len(rows) + 5
  whole = rows.rows(0, count)
  resumed = _rows(dynamic_config)[0].rows(count - 7, count)
  for name in whole:
    np.testing.assert_array_equal(whole[name][-7:], resumed[name])


def test_whole_word_masking_chooses_whole_words():
  config = _config(pair='none', seq_len=128, whole_word=True, max_predictions=128)
  transform = objectives.build(config).transform(TOKENIZER)
  tokens, bounds = _documents(count=200, spaces=True)
  partial, chosen, candidates = 0, 0, 0
  for index, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
    ids = np.concatenate([[TOKENIZER.cls_id], tokens[begin:end], [TOKENIZER.sep_id]])
    weights = transform.example(tokens[begin:end], index, 0, None)['mlm_token_weights']
    text = ~np.isin(ids, TOKENIZER.special_ids)
    words = TOKENIZER.word_ids(ids[text])
    for word in np.unique(words):
      picked = weights[text][words == word]
      partial += 0 < picked.sum() < len(picked)
    chosen, candidates = chosen + (weights[text] > 0).sum(), candidates + text.sum()
  assert partial == 0
  # As many tokens as without whole words: the rate is met in words, not by one word a row.
  assert abs(chosen / candidates - config.objective.mask_rate) < 0.02, chosen / candidates


@pytest.mark.parametrize('pair', ['nsp', 'sop'])
def test_sentence_pairs_are_half_negative_with_segment_types(pair):
  config = _config(pair=pair, seq_len=48)
  rows, transform = _rows(config, count=80)
  batch = rows.rows(0, 400)
  assert abs(batch['pair_label'].mean() - 0.5) < 0.08
  original = _rows(config, count=80)[0]
  for r in range(400):
    real = batch['segment_ids'][r] > 0
    assert batch['segment_ids'][r].max() == 1  # One pair per row.
    ids = batch['tokens'][r][real].copy()
    slots = batch['mlm_weights'][r] > 0
    ids[batch['mlm_positions'][r][slots]] = batch['mlm_targets'][r][slots]  # Unmask.
    seps = np.flatnonzero(ids == TOKENIZER.sep_id)
    assert ids[0] == TOKENIZER.cls_id and len(seps) == 2 and seps[1] == len(ids) - 1
    types = batch['token_types'][r][real]
    np.testing.assert_array_equal(types, np.arange(len(ids)) > seps[0])
    first, second = ids[1:seps[0]], ids[seps[0] + 1:-1]
    window, _ = original.window(r)
    chunk, doc = max(original.pieces(window), key=lambda piece: len(piece[0]))  # The longest.
    if batch['pair_label'][r] == 0:  # A positive is the chunk in order.
      np.testing.assert_array_equal(np.concatenate([first, second]), chunk)
    elif pair == 'sop':  # A negative of SOP swaps the halves.
      np.testing.assert_array_equal(np.concatenate([second, first]), chunk)
    else:  # A negative of NSP keeps A and takes B from another document.
      np.testing.assert_array_equal(first, chunk[:len(first)])
      assert not np.array_equal(second, chunk[len(first):])
      if len(second) >= 8:  # Long enough to be found where it came from.
        stream = original.store.tokens
        found = [p for p in np.flatnonzero(stream[:len(stream) - len(second) + 1] == second[0])
                 if np.array_equal(stream[p:p + len(second)], second)]
        assert found and any(original.store.docs[p] != doc for p in found)


class _Data:
  """What train.setup needs of a pipeline when batches come from PackedRows directly."""

  def __init__(self, config):
    self.rows = _rows(config)[0]
    self.batch_size = config.train.batch_size

  def train_batch(self, step):
    return self.rows.rows(step * self.batch_size, (step + 1) * self.batch_size)


def _train(config, mesh_shape, steps=3):
  devices = jax.devices()[:math.prod(mesh_shape.values())]
  for axis in mesh_lib.MESH_AXES:
    config.mesh[axis] = mesh_shape.get(axis, 1)
  config_lib.validate(config, len(devices))
  data = _Data(config)
  trainer = train.setup(config, mesh_lib.make_mesh(mesh_shape, devices), pipeline=data)
  state, records = trainer.state, []
  for step in range(steps):
    batch = global_batch.to_global(data.train_batch(step), trainer.batch_shardings)
    state, metrics = trainer.train_step(state, batch, trainer.dropout_rng)
    records.append(jax.device_get(metrics))
  return records, jax.device_get(state.params)


def _assert_same_training(records, params, reference_records, reference_params):
  for got, want in zip(records, reference_records):
    for term in want['totals']:
      for key in ('loss', 'count'):
        assert abs(got['totals'][term][key] - want['totals'][term][key]) <= 1e-4, (term, key)
    assert abs(got['loss'] - want['loss']) <= 1e-5, (got['loss'], want['loss'])
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs


@pytest.mark.slow
def test_sharded_encoder_training_matches_one_device():
  reference = _train(_config('nsp'), dict(data=1, fsdp=1, tensor=1))
  # The steps really update the parameters (losses of 3 different batches say little).
  assert all(r['grad_norm'] > 0.1 for r in reference[0]) and reference[0][-1]['learning_rate'] > 0
  assert set(reference[0][0]['totals']) == {'mlm', 'nsp'}
  _assert_same_training(*_train(_config('nsp'), dict(data=2, fsdp=2, tensor=2)), *reference)


@pytest.mark.parametrize('pair', ['nsp'])  # Both terms: MLM alone is the same code, once.
def test_accumulated_mlm_and_pair_losses_match_one_large_batch(pair):
  mesh_shape = dict(data=2, fsdp=1, tensor=1)
  batch = _Data(_config(pair)).train_batch(0)
  per_micro = [int(batch['mlm_weights'][i::4].sum()) for i in range(4)]
  assert len(set(per_micro)) > 1, per_micro  # Unequal predictions per micro-batch.
  reference = _train(_config(pair), mesh_shape)
  accumulated = _config(pair)
  accumulated.optim.grad_accum_steps = 4
  _assert_same_training(*_train(accumulated, mesh_shape), *reference)


def test_mlm_config_errors_are_one_sentence():
  cases = [
      (dict(objective=dict(pair='nsp'), model=dict(pair_head='sop')), 'objective.pair='),
      (dict(objective=dict(mask_rate=1.5)), 'objective.mask_rate=1.5 must lie in (0, 1)'),
      (dict(objective=dict(max_predictions=0)), 'objective.max_predictions=0 must lie in'),
      (dict(train=dict(seq_len=128)), 'objective.max_predictions=6 is fewer than the about 19'),
      # The model's limit first: a longer row's max_predictions would not be the only change.
      (dict(train=dict(seq_len=4096)), 'train.seq_len=4096 exceeds model.max_len='),
      (dict(objective=dict(pair='both')), "objective.pair='both' is not one of"),
      (dict(data=dict(source='markov')), 'needs documents of text with special tokens'),
      (dict(objective=dict(name='mlm'), model=dict(family='decoder')), None),
  ]
  for overrides, fragment in cases:
    config = _config('nsp')
    if fragment is None:  # The decoder's config with this objective: no masked-LM head.
      config = config_lib.load_config_file(os.path.join(REPO, 'configs', 'decoder.py:tiny'))
      with config.unlocked():
        config.objective = _config('nsp').objective
      fragment = 'needs a family with a masked-LM head'
    else:
      for section, values in overrides.items():
        config[section].update(values)
    with pytest.raises(config_lib.ConfigError) as error:
      config_lib.validate(config, 8)
    message = str(error.value)
    assert fragment in message and '\n' not in message and message.endswith('.'), message


def test_resuming_with_other_objective_settings_is_one_sentence(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text('some text to mask\n' * 50)
  (corpus / 'b.txt').write_text('more text\n' * 50)
  config = _config('none')
  config.data.source, config.data.paths = 'text', str(corpus)
  config.data.data_dir = str(tmp_path / 'tfds')
  position = pipeline_lib.build(config).position(3)
  config.objective.mask_rate = 0.2
  with pytest.raises(pipeline_lib.DataError) as error:
    pipeline_lib.build(config).check_position(position)
  message = str(error.value)
  assert 'objective.mask_rate: 0.15 there, 0.2 here' in message and '\n' not in message
