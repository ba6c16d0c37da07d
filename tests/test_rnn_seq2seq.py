"""The recurrent encoder-decoder family: packed == separate examples, attention restricted to the
example's own inputs, cached decoding == the full forward pass, greedy == an argmax loop, beam
search, sharded == one device, parameter counts and FLOPs by hand, and (slow) reversing strings
through the fine-tuning command line."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import runs
from research import config as config_lib
from research import decode
from research import models
from research.data import packing
from research.models import rnn_seq2seq
from research.objectives import text_to_text

SEQ_LEN, TARGET_LEN = 24, 16
# Both cells and both scores; the LSTM stacks two layers on each side, the GRU one.
KINDS = [('gru', 'bahdanau'), ('lstm', 'luong')]


def _config(variant='gru_attention_tiny', **model):
  """A small model of two encoder and two decoder layers (unless `model` says otherwise)."""
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs',
                                                    f'rnn_seq2seq.py:{variant}'))
  config.train.batch_size, config.train.seq_len, config.train.target_len = 8, SEQ_LEN, TARGET_LEN
  config.optim.warmup_steps, config.optim.lr = 1, 1e-2
  config.model.update(dict(emb_dim=8, hidden_dim=16, attention_dim=12, num_layers=2,
                           num_decoder_layers=2))
  config.model.update(model)
  return config


@functools.lru_cache(maxsize=None)
def _model(cell, score):
  """The model and random weights (normal, std 0.5: every output depends on them); built once
  per kind, so that tests of one kind share their compiled functions."""
  layers = 2 if cell == 'lstm' else 1
  config = _config(cell=cell, attention_score=score, num_layers=layers, num_decoder_layers=layers)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype),
                        models.abstract_params(rnn_seq2seq, config.model))
  return rnn_seq2seq.build(config.model), params


def _examples(rng, count):
  """Random examples of varied lengths, each ending with EOS (2)."""
  return [dict(inputs=np.r_[rng.integers(3, 250, int(rng.integers(3, 8))), 2],
               targets=np.r_[rng.integers(3, 250, int(rng.integers(2, 5))), 2])
          for _ in range(count)]


def _packed_batch(rng, rows, per_row=2):
  fields = text_to_text.fields(SEQ_LEN, TARGET_LEN)
  packed = [packing.pack_pairs(_examples(rng, per_row), SEQ_LEN, TARGET_LEN, fields)
            for _ in range(rows)]
  return {name: np.concatenate([p[name] for p in packed]) for name in fields}


@functools.partial(jax.jit, static_argnums=2)
def _forward(params, batch, model):
  """(encoded states, logits, attention weights) of a batch."""
  def run(module):
    encoded = module.encode(batch['encoder_tokens'], batch['encoder_segment_ids'])
    hidden = module.decode_hidden(batch['decoder_tokens'], encoded, batch['decoder_segment_ids'],
                                  batch['encoder_segment_ids'])
    return encoded, module.logits(hidden)

  (encoded, logits), state = model.apply({'params': params}, method=run,
                                         mutable=['intermediates'])
  weights, = state['intermediates']['decoder']['attention_weights']
  return encoded, logits, weights


def _packed_row(seed):
  """Three examples packed into one row, and each of them alone in a row."""
  examples = _examples(np.random.default_rng(seed), 3)
  fields = text_to_text.fields(SEQ_LEN, TARGET_LEN)
  packed = packing.pack_pairs(examples, SEQ_LEN, TARGET_LEN, fields)
  assert packed['decoder_segment_ids'].max() == 3  # All three share the row.
  return packed, [packing.pack_pairs([e], SEQ_LEN, TARGET_LEN, fields) for e in examples]


@pytest.mark.parametrize('cell, score', KINDS)
def test_a_packed_row_computes_what_its_examples_compute_alone(cell, score):
  model, params = _model(cell, score)
  packed, alone = _packed_row(1)
  encoded, logits, _ = (np.asarray(x)[0] for x in _forward(params, packed, model))
  for segment, row in enumerate(alone, 1):
    want_encoded, want_logits, _ = (np.asarray(x)[0] for x in _forward(params, row, model))
    inputs = packed['encoder_segment_ids'][0] == segment
    targets = packed['decoder_segment_ids'][0] == segment
    np.testing.assert_allclose(encoded[inputs], want_encoded[:inputs.sum()], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[targets], want_logits[:targets.sum()], atol=1e-5, rtol=0)


@pytest.mark.parametrize('cell, score', KINDS)
def test_attention_weights_cover_only_the_examples_own_inputs(cell, score):
  model, params = _model(cell, score)
  packed, _ = _packed_row(2)
  weights = np.asarray(_forward(params, packed, model)[2])[0]  # [targets, inputs]
  inputs, targets = packed['encoder_segment_ids'][0], packed['decoder_segment_ids'][0]
  for t in np.flatnonzero(targets):
    own = inputs == targets[t]
    np.testing.assert_allclose(weights[t, own].sum(), 1.0, atol=1e-6)
    assert np.all(weights[t, own] > 0)
    assert np.all(weights[t, ~own] == 0)  # Other examples and padding: exactly none.


INPUTS = [[5, 6, 7, 8, 9, 10, 2], [11, 12, 2], [40, 41, 42, 43, 2]]  # Of different lengths.
NEW = 6


def _full_logits(model, params, inputs, decoder_tokens):
  """Teacher-forced logits [targets, vocab] of one input (right-padded to a common length, as
  decoding pads it, so that every call shares one compilation)."""
  tokens, segments, _ = decode.right_pad(INPUTS)
  row = INPUTS.index(inputs)
  return np.asarray(_teacher_forced(params, tokens[row:row + 1], segments[row:row + 1],
                                    jnp.asarray([decoder_tokens], jnp.int32), model))[0]


@functools.partial(jax.jit, static_argnums=4)
def _teacher_forced(params, tokens, segments, decoder_tokens, model):
  hidden = model.apply({'params': params}, tokens, decoder_tokens, segments)
  return model.apply({'params': params}, hidden, method='logits')


@pytest.mark.parametrize('cell, score', KINDS)
def test_cached_decoding_matches_the_full_forward_pass_and_an_argmax_loop(cell, score):
  model, params = _model(cell, score)
  generated, step_logits = decode.generate(model, params, INPUTS,
                                           decode.SamplingConfig(max_new_tokens=NEW),
                                           return_logits=True)
  for row, ids in enumerate(INPUTS):
    assert len(generated[row]) == NEW  # No stop token: every row runs to the end.
    # Teacher forcing with the generated tokens gives the logits each step chose from.
    full = _full_logits(model, params, ids, [0] + generated[row][:-1])
    np.testing.assert_allclose(step_logits[row], full, atol=1e-5, rtol=0)
    # Greedy decoding is the loop that feeds back each argmax of a full forward pass (the
    # decoder is causal: the zeros after position i leave position i as it is).
    loop = [0]
    for i in range(NEW):
      padded = loop + [0] * (NEW - len(loop))
      loop.append(int(np.argmax(_full_logits(model, params, ids, padded)[i])))
    assert generated[row] == loop[1:], (generated[row], loop)


def test_beam_search_scores_at_least_what_greedy_decoding_scores():
  model, params = _model('gru', 'bahdanau')
  greedy, step_logits = decode.generate(model, params, INPUTS,
                                        decode.SamplingConfig(max_new_tokens=NEW),
                                        return_logits=True)
  log_p = np.asarray(jax.nn.log_softmax(step_logits, axis=-1))
  greedy_scores = [sum(log_p[r, i, t] for i, t in enumerate(row)) / NEW
                   for r, row in enumerate(greedy)]
  beams, scores = decode.generate(model, params, INPUTS,
                                  decode.SamplingConfig(max_new_tokens=NEW, num_beams=3),
                                  return_logits=True)
  assert np.all(scores >= np.asarray(greedy_scores) - 1e-5), (scores, greedy_scores)
  assert beams != greedy  # Random weights: the search finds other, better sequences.
  for row, ids in enumerate(INPUTS):
    # Each score is log p / length of the returned sequence under the model.
    log_p = jax.nn.log_softmax(_full_logits(model, params, ids, [0] + beams[row][:-1]))
    want = np.sum(np.take_along_axis(np.asarray(log_p), np.asarray(beams[row])[:, None],
                                     axis=1)) / NEW
    np.testing.assert_allclose(scores[row], want, atol=1e-5)


@pytest.mark.slow
def test_sharded_training_matches_one_device():
  rng = np.random.default_rng(0)
  batches = [_packed_batch(rng, 8) for _ in range(3)]
  # The pairing of cell and score that the other tests leave out.
  config = functools.partial(_config, cell='lstm', attention_score='bahdanau', num_layers=1,
                             num_decoder_layers=1)
  want_losses, want_params = runs.train_steps(config(), dict(data=1), batches)
  losses, params = runs.train_steps(config(), dict(data=2, fsdp=2, tensor=2), batches)
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, want_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs


def test_parameter_count_flops_and_logical_axes_by_hand():
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs',
                                                    'rnn_seq2seq.py:gru_attention_tiny'))
  v, e, h, a = 384, 64, 128, 128
  gru = lambda width: 3 * (width * h + h * h) + 4 * h  # Biases: three input gates, one recurrent.
  want = (2 * v * e + 2 * gru(e) + gru(e + h) + (h * h + h) + 2 * h * a + h * a + a
          + 3 * h * h + h * v)
  assert models.count_params(rnn_seq2seq, config.model) == want == 485_120
  # One encoder layer of two directions, 10 inputs, 4 targets.
  spec = rnn_seq2seq.spec_from_config(config.model)
  macs = (2 * 10 * 3 * h * (e + h) + 10 * 2 * h * a + 4 * 3 * h * (e + 2 * h)
          + 4 * (h * h + 10 * h) + 4 * (h * a + 10 * a + 10 * 2 * h + 3 * h * h) + 4 * h * v)
  assert rnn_seq2seq.flops_per_row(spec, 10, 4) == 6 * macs
  boxed = jax.eval_shape(lambda: rnn_seq2seq.build(config.model).init(
      jax.random.key(0), **rnn_seq2seq.init_inputs(8), method='initialize'))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) == len(jax.tree.leaves(nn.meta.unbox(boxed)))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize('key, value, fragment', [
    ('cell', 'rnn', "config.model.cell='rnn' is not one of ['gru', 'lstm']."),
    ('attention_score', 'dot', "config.model.attention_score='dot' is not one of ['bahdanau', "
     "'luong']."),
    ('num_decoder_layers', 0, 'model.num_decoder_layers=0 must be at least 1.'),
    ('attention_dim', 0, "model.attention_dim=0 must be positive for "
     "model.attention_score='bahdanau'."),
])
def test_settings_it_cannot_build_are_one_sentence(key, value, fragment):
  config = config_lib.load_config_file(os.path.join(runs.REPO, 'configs',
                                                    'rnn_seq2seq.py:gru_attention_tiny'))
  config.model[key] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 1)
  assert str(error.value) == fragment
  assert config_lib.validate(config_lib.load_config_file(os.path.join(
      runs.REPO, 'configs', 'rnn_seq2seq.py:lstm_luong_small')), 1)


@pytest.mark.slow
def test_it_learns_to_reverse_strings_through_the_pairs_task_and_answers_with_beams(tmp_path):
  from test_seq2seq import _reversals, _write_jsonl
  train_path = _write_jsonl(tmp_path / 'train.jsonl', _reversals(4000, seed=0))
  dev = _write_jsonl(tmp_path / 'dev.jsonl', _reversals(200, seed=1))
  run = tmp_path / 'run'
  result = runs.ok(runs.command(
      'research.train', '--config', 'configs/finetune.py:pairs,rnn_seq2seq.gru_attention_tiny',
      '--workdir', str(run), f'--config.data.train_path={train_path}',
      f'--config.data.validation_path={dev}', '--config.train.seq_len=10',
      '--config.train.target_len=10', '--config.train.batch_size=64',
      '--config.train.num_steps=200', '--config.train.eval_every=200',
      '--config.optim.lr=5e-3', '--config.optim.warmup_steps=50',
      '--config.train.progress_bar=false', '--cpu_devices=1'))
  assert 'fresh initialisation' in result.stderr, result.stderr[-4000:]
  final = runs.metrics(run)[-1]
  assert final['eval_sequence_accuracy'] > 0.9, final
  sample = runs.ok(runs.command('research.sample', '--workdir', str(run), '--input', 'abcde',
                                '--num_beams', '3'))
  assert sample.stdout.split('\n')[0] == 'edcba', sample.stdout
