"""Batched autoregressive generation with a key/value cache, for families that generate text
(their module has `decode` and `deterministic` fields and `logits` applies the output head):
decoders continue prompts; encoder-decoders (a module with `encode` and `decode_hidden`) encode
their inputs once and decode from the padding id, with the cross-attention keys and values
projected once and cached.

The cache is allocated once (prompt length + new tokens), updated in place inside one jitted
`lax.while_loop`, so the prefill and the per-token step each compile once. Prompts of different
lengths share a batch by left padding: padding carries segment id 0, so no real token attends to
it, and positions count from each prompt's first real token. Sampling: greedy (temperature 0),
temperature, top-k and top-p; generation stops per row at a stop token. Beam search
(num_beams >= 1, with a length penalty) follows transformers' algorithm exactly, batched and
jitted once, each beam's cache reordered as beams are kept.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0: greedy.
  top_k: int = 0  # 0: no top-k filter.
  top_p: float = 1.0  # 1: no nucleus filter.
  stop_tokens: Sequence[int] = ()
  pad_id: int = 0  # Fills after a stop token; an encoder-decoder's decoder starts from it.
  # >= 1: beam search with this many beams (deterministic: temperature, top-k and top-p
  # unused; one beam is greedy decoding); 0: greedy or sampled decoding.
  num_beams: int = 0
  length_penalty: float = 1.0  # Beam search: a finished beam scores log p / length ** this.


def left_pad(prompts, pad_id=0):
  """Ragged prompts -> tokens, segment_ids (1 real, 0 padding), positions; all [batch, length]."""
  length = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f'Prompt {row} is empty; every prompt needs at least one token.')
    tokens[row, length - len(prompt):] = prompt
    segments[row, length - len(prompt):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return tokens, segments, positions


def check_inputs(spec, prompts, sampling, encoder_decoder=False):
  """Raises ValueError, in one sentence saying what to change, for what `spec` cannot decode
  (`prompts`: an encoder-decoder's inputs when `encoder_decoder`).

  Called before any compute: an id outside the vocabulary would read past the embedding table
  (NaN logits), and positions beyond max_len lie past GPT-2's learned positions or beyond the
  context a RoPE model was trained for.
  """
  s, is_int = sampling, lambda x: isinstance(x, (int, np.integer))
  if not (is_int(s.max_new_tokens) and s.max_new_tokens >= 1):
    raise ValueError(f'max_new_tokens={s.max_new_tokens} must be a positive integer.')
  # The smallest normal float32: a subnormal one flushes to 0 and the scaled logits become NaN.
  tiny = float(np.finfo(np.float32).tiny)
  if not (s.temperature == 0 or tiny <= s.temperature < np.inf):
    raise ValueError(f'temperature={s.temperature} must be 0 (greedy) or a finite positive '
                     f'number of at least {tiny:.3g}.')
  if not (is_int(s.top_k) and 0 <= s.top_k <= spec.vocab_size):
    raise ValueError(f'top_k={s.top_k} must lie in [0, {spec.vocab_size}] (the vocabulary size; '
                     '0 keeps every token).')
  if not 0 < s.top_p <= 1:
    raise ValueError(f'top_p={s.top_p} must lie in (0, 1] (1 keeps every token).')
  if not (is_int(s.num_beams) and s.num_beams >= 0):
    raise ValueError(f'num_beams={s.num_beams} must be a non-negative integer (0: no beam '
                     'search).')
  if not np.isfinite(s.length_penalty):
    raise ValueError(f'length_penalty={s.length_penalty} must be a finite number.')
  if s.num_beams and (s.temperature != 0 or s.top_k or s.top_p < 1):
    raise ValueError(f'Beam search is deterministic: temperature={s.temperature}, top_k={s.top_k} '
                     f'and top_p={s.top_p} have no use with num_beams={s.num_beams}; leave them '
                     'at 0, 0 and 1, or set num_beams to 0.')
  if not s.num_beams and s.length_penalty != 1:
    raise ValueError(f'length_penalty={s.length_penalty} scores beams and has no use without '
                     'num_beams; set num_beams (e.g. 4), or leave length_penalty at 1.')
  if s.temperature == 0 and not s.num_beams and (s.top_k or s.top_p < 1):
    raise ValueError(f'Greedy decoding (temperature=0) takes the most likely token: top_k='
                     f'{s.top_k} and top_p={s.top_p} have no use with it; set a temperature '
                     '(e.g. 0.8) to sample, or leave them at 0 and 1.')
  if not prompts:
    raise ValueError('No prompt given; pass at least one prompt.')
  for row, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f'Prompt {row} is empty; every prompt needs at least one token.')
    bad = next((t for t in prompt if not (is_int(t) and 0 <= t < spec.vocab_size)), None)
    if bad is not None:
      raise ValueError(f'Prompt {row} holds token id {bad!r}, outside the vocabulary of '
                       f'{spec.vocab_size} ids; pass integer ids in [0, {spec.vocab_size - 1}].')
  if encoder_decoder:
    longest = max(len(p) for p in prompts)
    if max(longest, s.max_new_tokens) > spec.max_len:
      raise ValueError(f'An input of {longest} tokens or max_new_tokens={s.max_new_tokens} '
                       f'exceeds model.max_len={spec.max_len}; shorten the input or generate '
                       'fewer tokens.')
    return
  longest = max(len(p) for p in prompts) + s.max_new_tokens
  if longest > spec.max_len:
    raise ValueError(f'The longest prompt plus max_new_tokens={s.max_new_tokens} needs {longest} '
                     f'positions but the model has max_len={spec.max_len}; shorten the prompt or '
                     'generate fewer tokens.')


def filter_logits(logits, temperature, top_k, top_p):
  """Temperature scaling, then top-k and top-p (nucleus) filtering to -inf.

  Always keeps the most likely token (and its ties).
  """
  logits = logits.astype(jnp.float32)
  # Shifted so that the largest is 0: dividing by a small temperature then cannot overflow to
  # inf, whose softmax is NaN.
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # The most likely token has no mass before it (exactly 0), so any top_p > 0 keeps it.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _choose(logits, key, sampling):
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def _batch_axes(cache_shapes):
  """Each cache leaf's batch axis (None for the write index): the axis that differs between the
  caches of two batch sizes (layers stacked by nn.scan come first)."""
  small, large = cache_shapes(1), cache_shapes(2)
  return jax.tree.map(lambda a, b: next((i for i, (x, y) in enumerate(zip(a.shape, b.shape))
                                         if x != y), None), small, large)


def _decoder_only(model, params, tokens, segments, positions, new):
  """(cache, logits after the prompts, step, batch axes) of a decoder: the prompt is
  prefilled, then step(cache, token, i) feeds generated token i."""
  model = model.clone(decode=True)
  length = tokens.shape[1] + new

  def cache_shapes(rows):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((rows, length),
                                                                         jnp.int32),
                                             method='language_model')['cache'])

  def forward(cache, tokens, positions, segments):
    # Only the last position's hidden state goes through the output head.
    hidden, variables = model.apply({'params': params, 'cache': cache}, tokens, positions,
                                    segments, mutable=['cache'])
    return model.apply({'params': params}, hidden[:, -1], method='logits'), variables['cache']

  batch = tokens.shape[0]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(batch))
  logits, cache = forward(cache, tokens, positions, segments)
  start = positions[:, -1] + 1

  def step(cache, token, i):
    return forward(cache, token[:, None], (start + i)[:, None], jnp.ones((batch, 1), jnp.int32))

  return cache, logits, step, _batch_axes(cache_shapes)


def _encoder_decoder(model, params, tokens, segments, new, start_id):
  """The same for an encoder-decoder: the inputs are encoded once, the decoder starts from
  `start_id` and its cross-attention keys and values are cached by the first step."""
  batch = tokens.shape[0]
  # Slots for the start token and every generated one (the last is fed but never read).
  model = model.clone(decode=True, decode_length=new + 1)

  def cache_shapes(rows):
    return jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((rows, tokens.shape[1]), jnp.int32),
        jnp.zeros((rows, new + 1), jnp.int32))['cache'])

  def forward(cache, token, i, encoded=None):
    hidden, variables = model.apply(
        {'params': params, 'cache': cache}, token[:, None], encoded,
        jnp.ones((batch, 1), jnp.int32), segments, jnp.full((batch, 1), i, jnp.int32),
        method='decode_hidden', mutable=['cache'])
    return model.apply({'params': params}, hidden[:, -1], method='logits'), variables['cache']

  encoded = model.apply({'params': params}, tokens, segments, method='encode')
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes(batch))
  logits, cache = forward(cache, jnp.full((batch,), start_id, jnp.int32), 0, encoded)

  def step(cache, token, i):
    return forward(cache, token, i + 1)

  return cache, logits, step, _batch_axes(cache_shapes)


def _sample_loop(cache, logits, step, sampling, rng, new):
  """Greedy or sampled tokens [batch, new] (pad after a stop token), the logits each was chosen
  from, and the number of steps taken."""
  batch = logits.shape[0]
  stops = jnp.asarray(list(sampling.stop_tokens) or [-1], jnp.int32)
  state = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
               done=jnp.zeros((batch,), bool), rng=rng,
               out=jnp.full((batch, new), sampling.pad_id, jnp.int32),
               step_logits=jnp.zeros((batch, new, logits.shape[-1]), jnp.float32))

  def body(s):
    rng, key = jax.random.split(s['rng'])
    token = jnp.where(s['done'], sampling.pad_id, _choose(s['logits'], key, sampling))
    out = s['out'].at[:, s['i']].set(token)
    step_logits = s['step_logits'].at[:, s['i']].set(s['logits'])
    done = s['done'] | jnp.isin(token, stops)
    logits, cache = step(s['cache'], token, s['i'])
    return dict(i=s['i'] + 1, cache=cache, logits=logits, done=done, rng=rng, out=out,
                step_logits=step_logits)

  state = jax.lax.while_loop(lambda s: (s['i'] < new) & ~jnp.all(s['done']), body, state)
  return state['out'], state['step_logits'], state['i']


def _reorder(cache, axes, rows):
  """Cache rows taken from `rows` (beam search keeps the continued beams' caches)."""
  return jax.tree.map(lambda x, axis: x if axis is None else jnp.take(x, rows, axis=axis),
                      cache, axes)


_NEGATIVE = -1.0e9  # A score that removes a candidate (what transformers adds, in float32).


def _beam_loop(cache, logits, step, axes, sampling, new):
  """Beam search over `num_beams` rows per input (rows b * k .. b * k + k - 1, identical at the
  start). It follows transformers' beam search step for step, so that both return the same
  sequences: the 2k best continuations of all beams, the best k that do not end continue, the
  ending ones among the first k enter the finished set with their score divided by
  length ** length_penalty, and an input stops when no running beam can still beat its worst
  finished one (transformers' heuristic with early_stopping=False). Returns the best finished
  tokens [batch, new] (pad after a stop token), their scores and the steps taken."""
  k = sampling.num_beams
  vocab = logits.shape[-1]
  batch = logits.shape[0] // k
  stops = jnp.asarray(list(sampling.stop_tokens) or [-1], jnp.int32)
  keep = max(2, 1 + len(sampling.stop_tokens)) * k
  first_k = jnp.arange(keep) < k
  scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEGATIVE)  # Only the first beam starts.
  state = dict(
      t=jnp.zeros((), jnp.int32), cache=cache, logits=logits, open=jnp.ones((batch, 1), bool),
      hits=jnp.zeros((batch, keep), bool),
      running=jnp.full((batch, k, new), sampling.pad_id, jnp.int32),
      running_scores=jnp.broadcast_to(scores, (batch, k)).astype(jnp.float32),
      finished=jnp.full((batch, k, new), sampling.pad_id, jnp.int32),
      finished_scores=jnp.full((batch, k), _NEGATIVE, jnp.float32),
      is_finished=jnp.zeros((batch, k), bool))

  def gather(x, index):
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  def body(s):
    t = s['t']
    log_probs = jax.nn.log_softmax(s['logits'].astype(jnp.float32), axis=-1)
    log_probs = log_probs.reshape(batch, k, vocab) + s['running_scores'][:, :, None]
    top_scores, top_index = jax.lax.top_k(log_probs.reshape(batch, k * vocab), keep)
    origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    candidates = gather(s['running'], origin).at[:, :, t].set(token)
    hits = jnp.isin(token, stops) | (t + 1 >= new)
    # The best k continuations that go on.
    going = top_scores + hits.astype(jnp.float32) * _NEGATIVE
    chosen = jax.lax.top_k(going, k)[1]
    running, running_scores = gather(candidates, chosen), gather(going, chosen)
    parents = gather(origin, chosen)
    # Endings among the first k enter the finished set, scored per length.
    ended = hits & first_k[None, :]
    ending = top_scores / ((t + 1).astype(jnp.float32) ** sampling.length_penalty)
    ending = ending + (~s['open']).astype(jnp.float32) * _NEGATIVE
    ending = ending + (~ended).astype(jnp.float32) * _NEGATIVE
    merged = jnp.concatenate([s['finished_scores'], ending], axis=1)
    best = jax.lax.top_k(merged, k)[1]
    finished = gather(jnp.concatenate([s['finished'], candidates], axis=1), best)
    is_finished = gather(jnp.concatenate([s['is_finished'], ended], axis=1), best)
    finished_scores = gather(merged, best)
    rows = (parents + jnp.arange(batch)[:, None] * k).reshape(-1)
    cache = _reorder(s['cache'], axes, rows)
    logits, cache = step(cache, running[:, :, t].reshape(-1), t)
    # Could a running beam still beat the worst finished one (at its present length)?
    best_running = running_scores[:, :1] / ((t + 1).astype(jnp.float32)
                                            ** sampling.length_penalty)
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEGATIVE)
    still_open = s['open'] & jnp.any(best_running > worst, axis=-1, keepdims=True)
    return dict(t=t + 1, cache=cache, logits=logits, open=still_open, hits=hits, running=running,
                running_scores=running_scores, finished=finished, finished_scores=finished_scores,
                is_finished=is_finished)

  def going_on(s):
    return (s['t'] < new) & jnp.any(s['open']) & ~(jnp.all(s['hits']) & (s['t'] > 0))

  state = jax.lax.while_loop(going_on, body, state)
  out = state['finished'][:, 0]
  ended = jnp.cumsum(jnp.isin(out, stops), axis=1) > jnp.isin(out, stops)  # After the stop.
  return jnp.where(ended, sampling.pad_id, out), state['finished_scores'][:, 0], state['t']


@functools.partial(jax.jit, static_argnums=(0, 5, 7))
def _generate(model, params, tokens, segments, positions, sampling, rng, mesh):
  """Generated tokens, the logits they were chosen from (sampling) or their scores (beam
  search), and the steps taken. An encoder-decoder (a model with `encode`) reads `tokens` as
  its inputs (right-padded); a decoder continues them (left-padded)."""
  new, k = sampling.max_new_tokens, sampling.num_beams
  if k > 1:  # Every input k times: beams are rows of one batch.
    tokens, segments, positions = (jnp.repeat(x, k, axis=0) for x in (tokens, segments, positions))
  if hasattr(model, 'encode'):
    cache, logits, step, axes = _encoder_decoder(model, params, tokens, segments, new,
                                                 sampling.pad_id)
  else:
    cache, logits, step, axes = _decoder_only(model, params, tokens, segments, positions, new)
  if k:
    outputs = _beam_loop(cache, logits, step, axes, sampling, new)
  else:
    outputs = _sample_loop(cache, logits, step, sampling, rng, new)
  if mesh is not None:  # Replicated, so that every process can read them.
    outputs = jax.lax.with_sharding_constraint(outputs, NamedSharding(mesh, PartitionSpec()))
  return outputs


def _replicated(x, mesh):
  """A host array as one global array replicated over `mesh` (on every process)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()),
                                      lambda index: x[index])


def right_pad(inputs, pad_id=0):
  """Ragged encoder inputs -> tokens, segment_ids (1 real, 0 padding), positions."""
  length = max(len(x) for x in inputs)
  tokens = np.full((len(inputs), length), pad_id, np.int32)
  segments = np.zeros((len(inputs), length), np.int32)
  for row, ids in enumerate(inputs):
    tokens[row, :len(ids)] = ids
    segments[row, :len(ids)] = 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
  return tokens, segments, positions


def generate(model, params, prompts, sampling=SamplingConfig(), rng=None, return_logits=False,
             mesh=None):
  """Continues each prompt (a list of token ids) of a decoder, or answers each input of an
  encoder-decoder (a model with `encode`); returns a list of generated id lists.

  A row ends at its first stop token (not included). With return_logits, also returns the
  [batch, steps, vocab] logits from which each step's token was chosen (with beam search: the
  [batch] scores of the returned sequences instead). With `mesh`, `params` may be sharded over it
  (across processes too: every process calls this with the same inputs); the cache and
  activations follow the parameters' shardings.
  """
  sampling = dataclasses.replace(sampling, stop_tokens=tuple(int(t) for t in sampling.stop_tokens))
  encoder_decoder = hasattr(model, 'encode')
  check_inputs(model.spec, prompts, sampling, encoder_decoder)
  pad = right_pad if encoder_decoder else left_pad
  tokens, segments, positions = pad(prompts, sampling.pad_id)
  rng = jax.random.key(0) if rng is None else rng
  place = jnp.asarray if mesh is None else functools.partial(_replicated, mesh=mesh)
  if mesh is not None:
    rng = jax.random.wrap_key_data(_replicated(jax.random.key_data(rng), mesh))
  out, extra, steps = _generate(model, params, place(tokens), place(segments), place(positions),
                                sampling, rng, mesh)
  out, steps = np.asarray(out), int(steps)
  results = []
  for row in out[:, :steps].tolist():
    cut = next((i for i, t in enumerate(row) if t in sampling.stop_tokens), len(row))
    results.append(row[:cut])
  if return_logits:
    return results, np.asarray(extra if sampling.num_beams else extra[:, :steps])
  return results


if __name__ == '__main__':  # A library module: point a user who runs it to the commands.
  raise SystemExit('research.decode is the generation library; run python -m research.sample '
                   '(text from a trained run) or python -m research.bench decode (its speed), '
                   'each with --help.')
