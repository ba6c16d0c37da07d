"""Batched autoregressive generation with a key/value cache, for families that generate text
(their module has `decode` and `deterministic` fields, `__call__` returns hidden states and
`logits` applies the output head).

The cache is allocated once (prompt length + new tokens), updated in place inside one jitted
`lax.while_loop`, so the prefill and the per-token step each compile once. Prompts of different
lengths share a batch by left padding: padding carries segment id 0, so no real token attends to
it, and positions count from each prompt's first real token. Sampling: greedy (temperature 0),
temperature, top-k and top-p; generation stops per row at a stop token.
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
  pad_id: int = 0


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


def check_inputs(spec, prompts, sampling):
  """Raises ValueError, in one sentence saying what to change, for what `spec` cannot decode.

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
  if not prompts:
    raise ValueError('No prompt given; pass at least one prompt.')
  for row, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f'Prompt {row} is empty; every prompt needs at least one token.')
    bad = next((t for t in prompt if not (is_int(t) and 0 <= t < spec.vocab_size)), None)
    if bad is not None:
      raise ValueError(f'Prompt {row} holds token id {bad!r}, outside the vocabulary of '
                       f'{spec.vocab_size} ids; pass integer ids in [0, {spec.vocab_size - 1}].')
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


@functools.partial(jax.jit, static_argnums=(0, 5, 7))
def _generate(model, params, tokens, segments, positions, sampling, rng, mesh):
  batch, prompt_length = tokens.shape
  new = sampling.max_new_tokens
  model = model.clone(decode=True)
  cache_shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, prompt_length + new), jnp.int32),
                         method='language_model')['cache'])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

  def forward(cache, tokens, positions, segments):
    # Only the last position's hidden state goes through the output head.
    hidden, variables = model.apply({'params': params, 'cache': cache}, tokens, positions,
                                    segments, mutable=['cache'])
    logits = model.apply({'params': params}, hidden[:, -1], method='logits')
    return logits, variables['cache']

  logits, cache = forward(cache, tokens, positions, segments)  # Prefill.
  stops = jnp.asarray(list(sampling.stop_tokens) or [-1], jnp.int32)
  state = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits=logits, position=positions[:, -1] + 1,
               done=jnp.zeros((batch,), bool), rng=rng,
               out=jnp.full((batch, new), sampling.pad_id, jnp.int32),
               step_logits=jnp.zeros((batch, new, logits.shape[-1]), jnp.float32))

  def step(s):
    rng, key = jax.random.split(s['rng'])
    token = jnp.where(s['done'], sampling.pad_id, _choose(s['logits'], key, sampling))
    out = s['out'].at[:, s['i']].set(token)
    step_logits = s['step_logits'].at[:, s['i']].set(s['logits'])
    done = s['done'] | jnp.isin(token, stops)
    logits, cache = forward(s['cache'], token[:, None], s['position'][:, None],
                            jnp.ones((batch, 1), jnp.int32))
    return dict(i=s['i'] + 1, cache=cache, logits=logits, position=s['position'] + 1, done=done,
                rng=rng, out=out, step_logits=step_logits)

  state = jax.lax.while_loop(lambda s: (s['i'] < new) & ~jnp.all(s['done']), step, state)
  outputs = state['out'], state['step_logits'], state['i']
  if mesh is not None:  # Replicated, so that every process can read them.
    outputs = jax.lax.with_sharding_constraint(outputs, NamedSharding(mesh, PartitionSpec()))
  return outputs


def _replicated(x, mesh):
  """A host array as one global array replicated over `mesh` (on every process)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, PartitionSpec()),
                                      lambda index: x[index])


def generate(model, params, prompts, sampling=SamplingConfig(), rng=None, return_logits=False,
             mesh=None):
  """Continues each prompt (a list of token ids); returns a list of generated id lists.

  A row ends at its first stop token (not included). With return_logits, also returns the
  [batch, steps, vocab] logits from which each step's token was chosen. With `mesh`, `params`
  may be sharded over it (across processes too: every process calls this with the same inputs);
  the cache and activations follow the parameters' shardings.
  """
  sampling = dataclasses.replace(sampling, stop_tokens=tuple(int(t) for t in sampling.stop_tokens))
  check_inputs(model.spec, prompts, sampling)
  tokens, segments, positions = left_pad(prompts, sampling.pad_id)
  rng = jax.random.key(0) if rng is None else rng
  place = jnp.asarray if mesh is None else functools.partial(_replicated, mesh=mesh)
  if mesh is not None:
    rng = jax.random.wrap_key_data(_replicated(jax.random.key_data(rng), mesh))
  out, step_logits, steps = _generate(model, params, place(tokens), place(segments),
                                      place(positions), sampling, rng, mesh)
  out, steps = np.asarray(out), int(steps)
  results = []
  for row in out[:, :steps].tolist():
    cut = next((i for i, t in enumerate(row) if t in sampling.stop_tokens), len(row))
    results.append(row[:cut])
  if return_logits:
    return results, np.asarray(step_logits[:, :steps])
  return results
