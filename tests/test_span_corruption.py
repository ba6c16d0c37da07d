"""Encoder-decoder objectives on the data side: span corruption (statistics, exact
reconstruction, determinism, rows that fill), prefix LM and UL2, and their config errors."""

import os

import numpy as np
import pytest

from research import config as config_lib
from research import objectives
from research.data import tokenizer as tokenizer_lib
from research.objectives import prefix_lm
from research.objectives import span_corruption
from research.objectives import ul2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = tokenizer_lib.ByteTokenizer(extra_ids=122)


def _config(**objective):
  config = config_lib.load_config_file(os.path.join(REPO, 'configs',
                                                    'encoder_decoder.py:t5_tiny'))
  config.objective.update(objective)
  return config


def test_noise_density_and_mean_span_length_over_many_draws():
  rng = np.random.default_rng(0)
  noise, spans, lengths = 0, 0, []
  for _ in range(2000):
    length = int(rng.integers(50, 600))
    mask = span_corruption.noise_mask(length, 0.15, 3.0, rng)
    assert len(mask) == length and not mask[0]  # T5 starts with a kept span.
    starts = mask & ~np.r_[False, mask[:-1]]
    assert (mask.sum(), starts.sum()) == span_corruption.noise_counts(length, 0.15, 3.0)
    noise, spans, lengths = noise + mask.sum(), spans + starts.sum(), lengths + [length]
  assert abs(noise / sum(lengths) - 0.15) < 0.002
  assert abs(noise / spans - 3.0) < 0.05
  # Where the spans lie varies: every position but the first is noise in some draw.
  hits = np.zeros(100)
  for _ in range(500):
    hits += span_corruption.noise_mask(100, 0.15, 3.0, rng)
  assert hits[0] == 0 and (hits[1:] > 0).all()


def test_filling_the_sentinels_back_gives_the_original_text():
  rng = np.random.default_rng(1)
  text = 'def reverse(s):\n    return s[::-1]  # Ünïcödé too.\n' * 3
  tokens = TOKENIZER.encode(text)
  for _ in range(50):
    mask = span_corruption.noise_mask(len(tokens), 0.15, 3.0, rng)
    inputs, targets = span_corruption.corrupt(tokens, mask, TOKENIZER.sentinel_ids)
    assert inputs[np.isin(inputs, TOKENIZER.sentinel_ids)][0] == 383  # <extra_id_0> first.
    spans = (mask & ~np.r_[False, mask[:-1]]).sum()
    assert (len(inputs), len(targets)) == (len(tokens) - mask.sum() + spans, mask.sum() + spans)
    restored = span_corruption.uncorrupt(inputs, targets, TOKENIZER.sentinel_ids)
    assert TOKENIZER.decode(restored) == text
  shown = TOKENIZER.decode(inputs)
  assert '<extra_id_0>' in shown and '<extra_id_1>' in shown


def test_examples_are_a_function_of_the_seed_the_place_and_the_epoch():
  transform = span_corruption.Objective(_config()).transform(TOKENIZER)
  tokens = TOKENIZER.encode('x = [i * i for i in range(10)]\n' * 4)
  one = transform.example(tokens, (0, 0, 7, 1), 0, None)
  assert all((one[k] == transform.example(tokens, (0, 0, 7, 1), 0, None)[k]).all() for k in one)
  assert not np.array_equal(one['inputs'], transform.example(tokens, (0, 0, 8, 1), 0, None)[
      'inputs'])
  assert not np.array_equal(one['inputs'], transform.example(tokens, (0, 0, 7, 1), 1, None)[
      'inputs'])
  reseeded = _config()
  reseeded.seed += 1
  other = span_corruption.Objective(reseeded).transform(TOKENIZER)
  assert not np.array_equal(one['inputs'], other.example(tokens, (0, 0, 7, 1), 0, None)['inputs'])
  inputs, targets = one['inputs'], one['targets']
  assert inputs[-1] == targets[-1] == TOKENIZER.eos_id
  assert (len(inputs), len(targets)) == transform.positions(len(tokens))


def test_windows_fill_both_streams_as_t5_sizes_them():
  transform = span_corruption.Objective(_config()).transform(TOKENIZER)
  size = transform.span(128)[0]
  assert transform.positions(size)[0] == 128 and transform.positions(size + 1)[0] > 128
  # T5's own sizes: 568 tokens make 512 inputs and 114 targets.
  lengths = lambda n: span_corruption.corrupted_lengths(n, 0.15, 3.0)
  assert span_corruption.longest_window(lengths, (512, 114)) == 568
  assert lengths(568) == (512, 114)


def test_prefix_lm_splits_each_example_into_inputs_and_targets():
  config = _config(name='prefix_lm')
  config.train.target_len = 128
  transform = prefix_lm.Objective(config).transform(TOKENIZER)
  tokens = TOKENIZER.encode('the quick brown fox jumps over the lazy dog ' * 2)
  cuts = set()
  for window in range(40):
    example = transform.example(tokens, (0, 0, window, 0), 0, None)
    inputs, targets = example['inputs'], example['targets']
    assert np.array_equal(np.r_[inputs[:-1], targets[:-1]], tokens)
    bound = transform.positions(len(tokens))
    assert len(inputs) <= bound[0] and len(targets) <= bound[1]
    cuts.add(len(inputs))
  assert len(cuts) > 10  # The split point is drawn.
  # Any split of a window's pieces fits both streams: no token of a window is dropped.
  assert transform.span(128) == (127, 127)
  config.train.target_len = 32
  assert prefix_lm.Objective(config).transform(TOKENIZER).span(128) == (31, 31)
  config.objective.prefix = 'none'
  decoder_only = prefix_lm.Objective(config).transform(TOKENIZER)
  example = decoder_only.example(tokens, (0, 0, 0, 0), 0, None)
  assert example['inputs'].tolist() == [TOKENIZER.eos_id]
  assert np.array_equal(example['targets'][:-1], tokens)


def test_prefix_lm_notes_an_encoder_left_mostly_empty():
  config = _config(name='prefix_lm')  # t5_tiny: 128 encoder and 32 decoder positions.
  assert objectives.notes(config) == [
      'prefix_lm cuts windows of train.target_len - 1 = 31 tokens and splits each between the '
      'streams, so the encoder fills only about 12% of its train.seq_len=128 positions; '
      '--config.train.target_len=128 trains on longer windows in fuller rows.']
  config.train.target_len = 128
  assert objectives.notes(config) == []
  config.train.target_len, config.objective.prefix = 32, 'none'  # The encoder reads EOS alone.
  assert objectives.notes(config) == []
  assert objectives.notes(_config(name='span_corruption')) == []


def test_ul2_draws_every_denoiser_with_its_mode_token_and_its_own_spans():
  config = _config(name='ul2', denoisers='R:3:0.15=1;X:32:0.5=1;S=1')
  config.train.target_len = 128
  transform = ul2.Objective(config).transform(TOKENIZER)
  tokens = TOKENIZER.encode('abcdefghij' * 12)
  sentinels = set(TOKENIZER.sentinel_ids)
  # Each corrupting denoiser with its own mean span and density: (noise tokens, spans) by T5's
  # count for 120 tokens.
  counts = {'[NLU]': span_corruption.noise_counts(len(tokens), 0.15, 3),  # (18, 6)
            '[NLG]': span_corruption.noise_counts(len(tokens), 0.5, 32)}  # (60, 2)
  modes = {}
  for window in range(60):
    example = transform.example(tokens, (0, 0, window, 0), 0, None)
    inputs, targets = example['inputs'].tolist(), example['targets'].tolist()
    mode = TOKENIZER.decode(inputs[:5])
    modes[mode] = modes.get(mode, 0) + 1
    assert all(a <= b for a, b in zip((len(inputs), len(targets)),
                                      transform.positions(len(tokens))))
    if mode == '[S2S]':  # A prefix and its continuation, nothing corrupted.
      assert inputs[5:-1] + targets[:-1] == tokens.tolist()
      assert not sentinels & set(inputs + targets)
    else:
      noise, spans = counts[mode]
      assert sum(t in sentinels for t in inputs) == sum(t in sentinels for t in targets) == spans
      assert len(targets) == noise + spans + 1  # With EOS.
      assert len(inputs) == 5 + len(tokens) - noise + spans + 1
  assert set(modes) == {'[NLU]', '[NLG]', '[S2S]'} and min(modes.values()) > 10


@pytest.mark.parametrize('setting, fragment', [
    (dict(denoisers='R:3:0.15=1;Q=1'), "entry 'Q=1' is not R:MEAN_SPAN:DENSITY=WEIGHT"),
    (dict(denoisers='X:0.5:64=1'), "entry 'X:0.5:64=1' is not"),
    (dict(name='span_corruption', noise_density=1.5), 'objective.noise_density=1.5 must lie in'),
    (dict(name='span_corruption', label_smoothing=1.0), 'objective.label_smoothing=1.0 must lie'),
    (dict(name='prefix_lm', prefix='half'), "objective.prefix='half' is not one of"),
])
def test_bad_objective_settings_are_one_sentence(setting, fragment):
  config = _config(name='ul2')
  config.objective.update(setting)
  with pytest.raises(config_lib.ConfigError, match=fragment.replace('[', r'\[').replace(
      '(', r'\(')):
    config_lib.validate(config, 1)


def test_target_length_and_sentinels_are_checked_against_the_row():
  config = _config()
  config.train.target_len = 20
  with pytest.raises(config_lib.ConfigError, match=r'set it to 29 so that examples fill '
                                                   r'train.seq_len=128'):
    config_lib.validate(config, 1)
  with pytest.raises(ValueError, match=r'has 2 sentinels; set data.extra_ids to at least 7'):
    span_corruption.Objective(_config()).transform(tokenizer_lib.ByteTokenizer(extra_ids=2))
  config.train.target_len = 1
  with pytest.raises(config_lib.ConfigError, match=r'^train.target_len=1 leaves no decoder '
                     r'positions for a target and its EOS; set it to at least 2\.$'):
    config_lib.validate(config, 1)
  decoder = config_lib.load_config_file(os.path.join(REPO, 'configs', 'decoder.py:tiny'))
  decoder.objective.name = 'span_corruption'
  with pytest.raises(config_lib.ConfigError, match='model.family=.decoder. is not one'):
    config_lib.validate(decoder, 1)


def test_resuming_with_another_target_length_is_refused():
  from research.data import pipeline as pipeline_lib
  data = pipeline_lib.Pipeline(8, 128, None, None, TOKENIZER, dict(fingerprint='f'), 0,
                               target_len=32)
  position = data.position(10)
  data.check_position(position)
  data.target_len = 64
  with pytest.raises(pipeline_lib.DataError, match=r'rows of train.target_len=32 but this run has '
                                                   r'64; resume with --config.train.target_len=32'):
    data.check_position(position)


def test_a_mean_span_longer_than_an_example_is_refused():
  # T5's counts would make all the noise one span, of another length than the one asked for.
  config = _config(mean_span_length=500)
  with pytest.raises(config_lib.ConfigError, match=r'^objective.mean_span_length=500 is longer '
                     r'than an example \(the 148 tokens that train.seq_len=128 and '
                     r'train.target_len=32 hold\); lower it'):
    config_lib.validate(config, 1)
  config.objective.mean_span_length = 20
  config_lib.validate(config, 1)
  config = _config(name='ul2', denoisers='R:3:0.15=1;X:64:0.5=1;S=1')
  with pytest.raises(ValueError, match=r"^A UL2 denoiser's mean span of 64 tokens is longer than "
                     r'an example \(the 61 tokens that train.seq_len=128 and train.target_len=32 '
                     r'hold\); lower it in objective.denoisers or raise the lengths\.$'):
    ul2.Objective(config).transform(TOKENIZER)
  config.train.target_len = 128
  ul2.Objective(config).transform(TOKENIZER)
