"""Text generation. Greedy decoding by full forward passes over a sliding window (no KV cache)."""

import jax
import jax.numpy as jnp
import numpy as np


def greedy_generate(model, params, prompt_ids, num_tokens, window):
  """Appends `num_tokens` greedy tokens to `prompt_ids`, attending to the last `window` tokens."""
  @jax.jit
  def next_token(buffer, length):
    logits = model.apply({'params': params}, buffer[None])
    return jnp.argmax(logits[0, length - 1])

  tokens = list(np.asarray(prompt_ids).tolist())
  for _ in range(num_tokens):
    context = tokens[-window:]
    buffer = np.zeros(window, np.int32)  # Right padding: causal attention never sees it.
    buffer[:len(context)] = context
    tokens.append(int(next_token(jnp.asarray(buffer), len(context))))
  return tokens[len(prompt_ids):]
