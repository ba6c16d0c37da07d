"""Cross entropy over a vocabulary without the float32 logits of every position at once.

A vocabulary head's logits are features @ kernel (+ bias): [batch, length, vocab] in float32,
which for a large vocabulary is the largest activation of a step (Llama 3's 128256 entries take
0.5 MiB per position, and their gradient as much again). Here they are computed `chunk` positions
at a time in a scan, reduced at once to a few numbers per position (log Z, the target's logit,
the sum of the logits, whether the argmax is the target), and a custom gradient recomputes each
chunk's logits in the backward pass: d_features is written chunk by chunk, d_kernel and d_bias
are summed over chunks, so neither pass holds more than one chunk's logits. Every loss of the
objectives (plain, label-smoothed, z-loss) is a function of those per-position numbers.

Chunk i takes the positions i, i + n, i + 2n, ... (n chunks): positions sharded over the mesh's
sequence axis then stay spread over it in every chunk, as strided micro-batches keep the batch
spread over the data axes (research/train_step.py).

`train.loss_chunk` chooses: 0 computes the plain logits, N > 0 chunks of N positions, -1 (the
default) chunks of AUTO_CHUNK positions when model.vocab_size >= AUTO_VOCAB and the plain
logits otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np

from research.partitioning import constrain

# From 32768 entries on, the float32 logits (128 KiB per position) and their gradient are the
# largest activations of a step by far, larger than a whole layer's hidden states (d_model bf16
# values per position); below it (the CPU and byte-level configs, BERT, T5) the plain program
# is kept as it is.
AUTO_VOCAB = 32768
# Positions per chunk: with a few rows per device the chunk's matrix product still has thousands
# of rows (efficient on any accelerator), while at 128256 entries its float32 logits take 256 MiB
# per row on a device (a 2048-position row's whole logits: 1 GiB, and as much for the gradient).
AUTO_CHUNK = 512


def check_config(config, family, length, what):
  """ValueError, in one sentence, for a train.loss_chunk that cannot apply to family module
  `family`'s loss over `length` positions per row (`what` names them)."""
  chunk = config.train.get('loss_chunk', -1)
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < -1:
    raise ValueError(f'train.loss_chunk={chunk!r} must be an integer: 0 (plain logits), N > 0 '
                     '(chunks of N positions) or -1 (chunked for a large vocabulary).')
  if chunk > length:
    raise ValueError(f'train.loss_chunk={chunk} exceeds the {length} positions per row the loss '
                     f'covers ({what}); use at most {length}, or 0 for the plain logits.')
  if chunk > 0 and (getattr(family, 'COUNTED', False)
                    or not hasattr(family.build(config.model), 'head_inputs')):
    raise ValueError(f'train.loss_chunk={chunk} needs a vocabulary head, which '
                     f'model.family={config.model.family} does not have; set train.loss_chunk=0 '
                     'or -1.')
  if chunk > 0 and config.objective.name == 'distill':
    raise ValueError('objective.name=distill compares the full logits of student and teacher; '
                     'set train.loss_chunk=0 or -1.')


def chunk_size(config, length):
  """Positions per chunk for a loss over `length` positions per row; 0: the plain logits."""
  chunk = config.train.get('loss_chunk', -1)
  if chunk == -1:
    return min(AUTO_CHUNK, length) if config.model.vocab_size >= AUTO_VOCAB else 0
  return chunk


def uses_chunks(model, chunk):
  """Whether `model` computes its loss in chunks: a chunk size is set and the model exposes its
  vocabulary head (research/models/__init__.py `head_inputs`). A wrapped model that only passes
  applies on (distillation records the logits it returns) has no head of its own."""
  return chunk > 0 and hasattr(model, 'head_inputs')


def _dims(vocab_axis):
  """dot_general dimension numbers of (logits, d_features, d_kernel) for features [b, c, d] and
  a kernel [vocab, d] (vocab_axis=0, a tied table) or [d, vocab] (vocab_axis=1)."""
  embed_axis = 1 - vocab_axis
  logits = (((2,), (embed_axis,)), ((), ()))
  d_features = (((2,), (vocab_axis,)), ((), ()))
  # d_logits [b, c, v] with features [b, c, d] -> [v, d] or, transposed, [d, v].
  d_kernel = (((0, 1), (0, 1)), ((), ()))
  return logits, d_features, d_kernel


def _position_stats(chunk, vocab_axis, sharding):
  """f(features [n, b, c, d], kernel, bias, targets [n, b, c]) -> (log_z, target_logit,
  logit_sum, correct), each [n, b, c] float32, by a scan over the n chunks with a custom
  gradient (correct has none)."""
  logits_dims, features_dims, kernel_dims = _dims(vocab_axis)
  # The kernel is read whole along d once, before the scan (as FSDP gathers any weight before
  # use), and stays sharded over the vocabulary as the logits are; so is its gradient's sum.
  kernel_axes = ('vocab', None) if vocab_axis == 0 else (None, 'vocab')

  def chunk_logits(features, kernel, bias):
    logits = jax.lax.dot_general(features, kernel, logits_dims,
                                 preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    return constrain(logits, sharding, ('batch', 'length', 'act_vocab'))

  def forward(features, kernel, bias, targets):
    kernel = constrain(kernel, sharding, kernel_axes)

    def body(_, xs):
      f, t = xs
      logits = chunk_logits(f, kernel, bias)
      log_z = jax.nn.logsumexp(logits, axis=-1)
      target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
      correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
      return None, (log_z, target, jnp.sum(logits, axis=-1), correct)
    return jax.lax.scan(body, None, (features, targets))[1]

  @jax.custom_vjp
  def stats(features, kernel, bias, targets):
    return forward(features, kernel, bias, targets)

  def stats_forward(features, kernel, bias, targets):
    out = forward(features, kernel, bias, targets)
    return out, (features, kernel, bias, targets, out[0])

  def stats_backward(residuals, cotangents):
    features, kernel, bias, targets, log_z = residuals
    g_log_z, g_target, g_sum, _ = cotangents
    vocab = kernel.shape[vocab_axis]
    kernel = constrain(kernel, sharding, kernel_axes)

    def body(carry, xs):
      d_kernel, d_bias = carry
      f, t, z, gz, gt, gs = xs
      logits = chunk_logits(f, kernel, bias)
      # d/d logits of (log Z, logit[target], sum of logits) weighted by their cotangents.
      d_logits = (gz[..., None] * jnp.exp(logits - z[..., None]) + gs[..., None]
                  + gt[..., None] * jax.nn.one_hot(t, vocab, dtype=jnp.float32))
      d_logits = constrain(d_logits, sharding, ('batch', 'length', 'act_vocab'))
      # The products run in the compute dtype, accumulating in float32, as the forward's.
      dl = d_logits.astype(f.dtype)
      d_features = jax.lax.dot_general(dl, kernel, features_dims,
                                       preferred_element_type=jnp.float32)
      pair = (dl, f) if vocab_axis == 0 else (f, dl)
      d_kernel += jax.lax.dot_general(*pair, kernel_dims, preferred_element_type=jnp.float32)
      if bias is not None:
        d_bias += jnp.sum(d_logits, axis=(0, 1))
      return (d_kernel, d_bias), d_features.astype(f.dtype)

    zeros = (constrain(jnp.zeros(kernel.shape, jnp.float32), sharding, kernel_axes),
             None if bias is None else jnp.zeros(bias.shape, jnp.float32))
    (d_kernel, d_bias), d_features = jax.lax.scan(
        body, zeros, (features, targets, log_z, g_log_z, g_target, g_sum))
    return (d_features, d_kernel.astype(kernel.dtype),
            None if bias is None else d_bias.astype(bias.dtype),
            np.zeros(targets.shape, jax.dtypes.float0))

  stats.defvjp(stats_forward, stats_backward)
  return stats


def position_stats(features, kernel, targets, chunk, bias=None, vocab_axis=1, sharding=None):
  """Per-position numbers of the logits features @ kernel (+ bias), in float32, computed `chunk`
  positions at a time: {'log_z', 'target_logit', 'logit_sum', 'correct'}, each [batch, length].

  features [batch, length, d]; kernel [d, vocab] (vocab_axis=1) or a tied embedding table
  [vocab, d] (vocab_axis=0), read in place; bias [vocab] or None; targets [batch, length] ids.
  Gradients reach features, kernel and bias, computed chunk by chunk in the backward pass.
  """
  b, t, d = features.shape
  n = -(-t // chunk)
  pad = n * chunk - t  # Padded positions take target 0; their numbers are dropped below.
  features = jnp.pad(features, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # Position p = i * n + j lies in chunk j: [b, chunk, n, ...] -> [n, b, chunk, ...].
  features = jnp.moveaxis(features.reshape(b, chunk, n, d), 2, 0)
  targets = jnp.moveaxis(targets.reshape(b, chunk, n), 2, 0)
  stats = _position_stats(chunk, vocab_axis, sharding)(features, kernel, bias, targets)
  names = ('log_z', 'target_logit', 'logit_sum', 'correct')
  return {name: jnp.moveaxis(x, 0, 2).reshape(b, n * chunk)[:, :t]
          for name, x in zip(names, stats)}


def cross_entropy_sums(features, kernel, targets, weights, chunk, bias=None, vocab_axis=1,
                       sharding=None):
  """objectives.cross_entropy_sums of the logits features @ kernel (+ bias), without them:
  {'loss': weighted cross-entropy sum, 'correct': weighted count of correct argmaxes}."""
  stats = position_stats(features, kernel, targets, chunk, bias, vocab_axis, sharding)
  weights = weights.astype(jnp.float32)
  return dict(loss=jnp.sum((stats['log_z'] - stats['target_logit']) * weights),
              correct=jnp.sum(stats['correct'] * weights))


def head_stats(module, hidden, targets, chunk):
  """position_stats of the vocabulary head of a bound model `module` (its `head_inputs`) on
  hidden states [batch, length, d], with the model's activation sharding."""
  return position_stats(**module.head_inputs(hidden), targets=targets, chunk=chunk,
                        sharding=module.sharding)


def head_sums(module, hidden, targets, weights, chunk):
  """cross_entropy_sums of the vocabulary head of a bound model `module` (its `head_inputs`)."""
  return cross_entropy_sums(**module.head_inputs(hidden), targets=targets, weights=weights,
                            chunk=chunk, sharding=module.sharding)
