"""Causal language modelling: predict token t+1 from tokens <= t.

Losses are returned as sums with their token counts so that callers can normalise by the number
of real target tokens of the whole global batch (across micro-batches and hosts).
"""

import jax
import jax.numpy as jnp


def example_from_document(tokens):
  """Data side: a document of n + 1 tokens gives n (input, target) pairs."""
  return tokens[:-1], tokens[1:]


def token_losses(logits, targets):
  """Per-token cross entropy in float32: logsumexp(logits) - logits[target]."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def loss_sums(logits, targets, weights):
  """Weighted sums: cross entropy, number of target tokens, number of correct argmax predictions."""
  weights = weights.astype(jnp.float32)
  losses = token_losses(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return dict(loss=jnp.sum(losses * weights), tokens=jnp.sum(weights),
              correct=jnp.sum(correct * weights))
