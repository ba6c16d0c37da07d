"""Every attention kernel this backend can run equals the textbook form, values and gradients,
with packed segments, grouped-query heads, biases and cross-attention; the backend's choice of
kernel; the Pallas kernels per shard of a mesh.

On CPU the Pallas kernels (GPU flash attention, TPU splash and flash attention) run in interpret
mode; launch/bench_gpu.sh runs this file on a GPU, where cuDNN and the compiled Pallas kernel are
checked the same way.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
import runs

from research import config as config_lib
from research import mesh as mesh_lib
from research import partitioning
from research.data import packing
from research.models import attention
from research.models import flash_attention
from research.models import tpu_attention
from research.objectives import text_to_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def available_implementations():
  """The kernels this backend runs: on CPU both Pallas kernels, interpreted."""
  backend = jax.default_backend()
  names = ['explicit', 'xla']
  if backend in ('cpu', 'gpu'):
    names.append('pallas_gpu')
  if backend in ('cpu', 'tpu'):
    names.append('pallas_tpu')
  if backend == 'gpu':
    names.append('cudnn')
  return names


def _dtype_and_tolerance(implementation):
  """cuDNN takes 16-bit inputs only; accelerators multiply float32 at reduced precision."""
  if implementation == 'cudnn':
    return jnp.bfloat16, 5e-2
  return jnp.float32, (2e-5 if jax.default_backend() == 'cpu' else 2e-2)


def _inputs(heads, kv_heads, seed=0, b=3, t=20, d=16):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  d_out = jax.random.normal(keys[3], (b, t, heads, d))
  segments = np.ones((b, t), np.int32)
  segments[0, 7:] = 2  # Two documents in row 0,
  segments[1, 15:] = 0  # padding at the end of row 1.
  return q, k, v, d_out, jnp.asarray(segments)


@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_explicit_attention_matches_jax_nn(heads, kv_heads, with_segments):
  q, k, v, d_out, segments = _inputs(heads, kv_heads)
  segments = segments if with_segments else None

  def run(implementation):
    out, vjp = jax.vjp(lambda *x: attention.causal_attention(*x, segments, implementation), q, k, v)
    return (out,) + vjp(d_out)

  for got, want in zip(jax.jit(lambda: run('explicit'))(), jax.jit(lambda: run('xla'))()):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize('heads, kv_heads', [(4, 4), (4, 2)])
@pytest.mark.parametrize('with_segments', [False, True])
def test_bidirectional_explicit_attention_matches_jax_nn(heads, kv_heads, with_segments):
  q, k, v, d_out, segments = _inputs(heads, kv_heads, seed=1)
  segments = segments if with_segments else None

  def run(implementation):
    attend = lambda *x: attention.dot_product_attention(*x, segments, False, implementation)
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(d_out)

  for got, want in zip(jax.jit(lambda: run('explicit'))(), jax.jit(lambda: run('xla'))()):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_bidirectional_attention_sees_later_keys_of_its_own_segment_only():
  q, k, v, _, segments = _inputs(4, 4, seed=2)
  base = attention.dot_product_attention(q, k, v, segments, False, 'explicit')
  # Row 0 holds documents [0, 7) and [7, 20); row 1 has padding from 15.
  changed = attention.dot_product_attention(q, k.at[0, 5].add(1.0), v, segments, False, 'explicit')
  assert not np.allclose(changed[0, :5], base[0, :5])  # Earlier queries see the later key,
  np.testing.assert_array_equal(changed[0, 7:], base[0, 7:])  # the next document does not.
  changed = attention.dot_product_attention(q, k, v.at[1, 17].add(1.0), segments, False,
                                            'explicit')
  np.testing.assert_array_equal(changed[1, :15], base[1, :15])  # Padding is never attended to.
  np.testing.assert_array_equal(
      attention.causal_attention(q, k, v, segments, 'explicit'),
      attention.dot_product_attention(q, k, v, segments, True, 'explicit'))


def _plain_attention(q, k, v, bias, mask, scale):
  """The textbook form, differentiated by jax: softmax(q k^T * scale + bias, masked) v."""
  groups = q.shape[2] // k.shape[2]  # Grouped-query heads share their key and value heads.
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('bthd,bshd->bhts', q, k) * scale + bias
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(logits, axis=-1), v)


_SLOW_PALLAS = [pytest.param(name, marks=pytest.mark.slow) if name == 'pallas_tpu' else name
                for name in available_implementations()]


@pytest.mark.parametrize('implementation', _SLOW_PALLAS)
@pytest.mark.parametrize('cross, batch_bias', [(False, True), (True, False)])
def test_attention_bias_and_its_gradient_match_autodiff_of_the_plain_form(implementation, cross,
                                                                        batch_bias):
  """T5's relative-position bias (shared over the batch: [1, heads, q, k]) or a per-row one, in
  self-attention with packed segments and grouped-query heads, and in cross-attention over keys
  of another length."""
  dtype, tolerance = _dtype_and_tolerance(implementation)
  b, t, s, h, d = 3, 12, 17 if cross else 12, 4, 8
  kv_heads = h if cross else 2
  keys = jax.random.split(jax.random.key(3), 5)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k, v = (jax.random.normal(key, (b, s, kv_heads, d), dtype) for key in keys[1:3])
  bias = jax.random.normal(keys[3], (b if batch_bias else 1, h, t, s), dtype)
  d_out = jax.random.normal(keys[4], (b, t, h, d), dtype)
  segments = np.ones((b, t), np.int32)
  segments[0, 5:] = 2  # Two examples in row 0 and padding in row 1, in both streams.
  segments[1, 9:] = 0
  kv_segments = None
  if cross:
    kv_segments = np.ones((b, s), np.int32)
    kv_segments[0, 8:] = 2
    kv_segments[1, 13:] = 0
  mask = attention.segment_mask(segments, t, not cross, kv_segments, s)

  def ours(q, k, v, bias):
    return attention.dot_product_attention(q, k, v, segments, not cross, implementation,
                                           bias=bias, scale=1.0, kv_segment_ids=kv_segments)

  def run(attend):
    out, vjp = jax.vjp(attend, q, k, v, bias)
    return (out,) + vjp(d_out)

  got = jax.jit(lambda: run(ours))()
  want = jax.jit(lambda: run(lambda *x: _plain_attention(
      *(y.astype(jnp.float32) for y in x), mask, 1.0)))()
  for got_grad, want_grad in zip(got, want):  # The output, then q, k, v and bias gradients.
    assert got_grad.shape == want_grad.shape
    np.testing.assert_allclose(got_grad.astype(jnp.float32), want_grad, atol=tolerance, rtol=0)


def _packed_causal_inputs(dtype, b=2, t=40, heads=4, kv_heads=2, d=16):
  keys = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d), dtype)
  k, v = (jax.random.normal(key, (b, t, kv_heads, d), dtype) for key in keys[1:3])
  segments = np.ones((b, t), np.int32)
  segments[0, 13:] = 2  # Three documents in row 0,
  segments[0, 29:] = 3
  segments[1, 33:] = 0  # one and its padding in row 1.
  return q, k, v, jax.random.normal(keys[3], (b, t, heads, d), dtype), jnp.asarray(segments)


@pytest.mark.parametrize('implementation', available_implementations())
def test_every_kernel_keeps_packed_documents_apart(implementation):
  """Causal grouped-query attention over packed rows: each kernel equals the textbook form
  (values and gradients), and rewriting one document's keys and values changes no output of
  the others; a kernel that ignored segment ids fails both."""
  dtype, tolerance = _dtype_and_tolerance(implementation)
  q, k, v, d_out, segments = _packed_causal_inputs(dtype)
  mask = attention.segment_mask(segments, q.shape[1])

  def ours(q, k, v):
    return attention.causal_attention(q, k, v, segments, implementation)

  def plain(q, k, v):
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (k, v))
    return _plain_attention(q.astype(jnp.float32), k, v, 0.0, mask, q.shape[-1] ** -0.5)

  def run(attend):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(d_out)

  for got, want in zip(jax.jit(lambda: run(ours))(), jax.jit(lambda: run(plain))()):
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=tolerance, rtol=0)
  second = np.asarray(segments) == 2
  rewritten = [jnp.where(second[:, :, None, None], x + 3.0, x) for x in (k, v)]
  before = jax.jit(ours)(q, k, v)
  after = jax.jit(ours)(q, *rewritten)
  np.testing.assert_array_equal(np.asarray(before)[~second], np.asarray(after)[~second])
  assert not np.allclose(np.asarray(before)[second], np.asarray(after)[second])



@pytest.mark.skipif('pallas_gpu' not in available_implementations(),
                    reason='the GPU kernel runs on GPUs, and interpreted on CPUs')
@pytest.mark.parametrize('tiles, t, s, causal', [
    ((16, 16), 40, 40, True),  # Several tiles each way, the last one partly padding.
    ((32, 16), 40, 40, True),  # Query tiles longer than key tiles.
    ((16, 32), 20, 40, False),  # Cross-attention, with a query that sees no key.
])
def test_gpu_kernel_over_several_tiles(tiles, t, s, causal):
  """The online softmax across key tiles, the causal tile bounds, the skipped tiles' bias
  gradient and padded tails, against the textbook form; a query that sees no key outputs zeros
  and passes no gradient."""
  h, kv_heads, d = 4, 2, 16
  keys = jax.random.split(jax.random.key(7), 5)
  q = jax.random.normal(keys[0], (2, t, h, d))
  k, v = (jax.random.normal(key, (2, s, kv_heads, d)) for key in keys[1:3])
  bias = jax.random.normal(keys[3], (1, h, t, s))
  q_seg = np.ones((2, t), np.int32)
  q_seg[0, t // 2:] = 2
  kv_seg = q_seg if s == t else np.where(np.arange(s) < s // 3, 1, 2)[None].repeat(2, 0)
  if not causal:
    q_seg[1, -3:] = 3  # No key has segment 3.
  sees_no_key = q_seg == 3
  d_out = jnp.where(sees_no_key[:, :, None, None], 0.0,
                    jax.random.normal(keys[4], (2, t, h, d)))
  mask = attention.segment_mask(jnp.asarray(q_seg), t, causal,
                                None if s == t else jnp.asarray(kv_seg), s)
  blocks = flash_attention.Blocks(q=tiles[0], kv=tiles[1])

  def ours(q, k, v, bias):
    return flash_attention.flash_attention(q, k, v, q_seg, kv_seg, bias, causal, blocks)

  def plain(q, k, v, bias):
    k, v = (jnp.repeat(x, h // kv_heads, axis=2) for x in (k, v))
    return _plain_attention(q, k, v, bias, mask, 1.0)

  tolerance = _dtype_and_tolerance('pallas_gpu')[1]
  got_out, got_vjp = jax.vjp(ours, q, k, v, bias)
  want_out, want_vjp = jax.vjp(plain, q, k, v, bias)
  np.testing.assert_allclose(np.asarray(got_out)[~sees_no_key],
                             np.asarray(want_out)[~sees_no_key], atol=tolerance, rtol=0)
  assert not np.asarray(got_out)[sees_no_key].any()
  for got, want in zip(got_vjp(d_out), want_vjp(d_out)):
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)
  if sees_no_key.any():  # Alone: the textbook form spreads such a query over every key.
    only_there = jnp.where(sees_no_key[:, :, None, None],
                           jax.random.normal(keys[4], (2, t, h, d)), 0.0)
    for name, got in zip(('dq', 'dk', 'dv', 'dbias'), got_vjp(only_there)):
      assert not np.asarray(got).any(), name

@pytest.mark.parametrize('backend, packed, dtype, fits, expected', [
    ('cpu', True, jnp.float32, True, 'explicit'),
    ('gpu', False, jnp.bfloat16, True, 'cudnn'),  # No segment ids: cuDNN needs no dense mask.
    ('gpu', True, jnp.bfloat16, True, 'pallas_gpu'),
    ('gpu', False, jnp.float32, True, 'pallas_gpu'),  # cuDNN takes 16-bit inputs only.
    ('gpu', True, jnp.bfloat16, False, 'xla'),
    ('tpu', True, jnp.bfloat16, True, 'pallas_tpu'),
    ('tpu', True, jnp.bfloat16, False, 'xla'),
])
def test_auto_chooses_the_kernel_for_the_backend(monkeypatch, backend, packed, dtype, fits,
                                                 expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert attention.resolve_implementation('auto', dtype, packed, fits) == expected
  assert attention.resolve_implementation('xla', dtype, packed, fits) == 'xla'


def test_pallas_kernel_runs_per_shard_of_a_mesh_and_equals_one_device():
  """Batch over (data, fsdp) and heads over tensor: the kernel runs once per shard
  (shard_map), with each shard's query heads reading their own key/value heads."""
  q, k, v, d_out, segments = _packed_causal_inputs(jnp.float32, b=4, heads=4, kv_heads=2)
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  sharding = partitioning.ActivationSharding(mesh)
  assert attention._kernel_specs(q, k, None, mesh) is not None

  def loss(implementation, sharding, q, k, v):
    out = attention.dot_product_attention(q, k, v, segments, True, implementation,
                                          sharding=sharding)
    return jnp.sum(out * d_out)

  want = jax.jit(jax.value_and_grad(lambda *x: loss('explicit', None, *x), (0, 1, 2)))(q, k, v)
  got = jax.jit(jax.value_and_grad(lambda *x: loss('pallas_gpu', sharding, *x), (0, 1, 2)))(
      q, k, v)
  for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_part, want_part, atol=1e-4, rtol=1e-5)
  # Per shard, not on gathered arrays (on CPU both give the same numbers): one shard_map whose
  # query, key and value blocks are whole rows of a batch shard and a tensor shard of heads.
  jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
      q, k, v, segments, True, 'pallas_gpu', sharding=sharding))(q, k, v)
  [shard_map] = [e for e in jaxpr.eqns if e.primitive.name == 'shard_map']
  heads = P(('data', 'fsdp'), None, 'tensor', None)
  assert shard_map.params['in_specs'][:3] == (heads, heads, heads)
  assert shard_map.params['out_specs'] == (heads,)


def test_pallas_kernel_refuses_a_mesh_it_cannot_run_per_shard_on():
  """Queries split along the sequence: 'auto' takes XLA's kernel there, and naming a Pallas
  kernel is one sentence."""
  q, k, v, _, segments = _packed_causal_inputs(jnp.float32, b=4)
  mesh = mesh_lib.make_mesh(dict(data=2, sequence=2, tensor=2), jax.devices()[:8])
  assert attention._kernel_specs(q, k, None, mesh) is None
  with pytest.raises(ValueError, match=r"model.attention='pallas_gpu' cannot run per shard"):
    attention.dot_product_attention(q, k, v, segments, True, 'pallas_gpu',
                                    sharding=partitioning.ActivationSharding(mesh))


@pytest.mark.parametrize('implementation, platform',
                         [('pallas_gpu', 'cuda'), ('pallas_tpu', 'tpu')])
@pytest.mark.parametrize('shape', [
    dict(t=2048, s=2048, heads=32, kv_heads=8, causal=True, bias=False),  # llama_1b.
    dict(t=512, s=512, heads=12, kv_heads=12, causal=False, bias=True),  # T5 encoder.
    dict(t=114, s=512, heads=12, kv_heads=12, causal=False, bias=False),  # T5 cross-attention.
])
def test_kernels_lower_for_their_accelerator(implementation, platform, shape):
  """The forward and backward kernels lower to Triton (GPU) or Mosaic (TPU) at the benchmark
  shapes, checked here without the device: a kernel the compiler cannot take fails here."""
  b, d = 2, 64
  q = jax.ShapeDtypeStruct((b, shape['t'], shape['heads'], d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, shape['s'], shape['kv_heads'], d), jnp.bfloat16)
  q_seg, kv_seg = (jax.ShapeDtypeStruct((b, n), jnp.int32) for n in (shape['t'], shape['s']))
  bias = jax.ShapeDtypeStruct((1, shape['heads'], shape['t'], shape['s']), jnp.bfloat16)
  kernel = {'pallas_gpu': flash_attention.flash_attention,
            'pallas_tpu': tpu_attention.tpu_attention}[implementation]

  def loss(q, k, v, q_seg, kv_seg, bias):
    out = kernel(q, k, v, q_seg, kv_seg, bias, shape['causal'], interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  args = (q, k, k, q_seg, kv_seg, bias if shape['bias'] else None)
  lowered = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(*args).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  custom_call = {'cuda': 'xla.gpu.triton', 'tpu': 'tpu_custom_call'}[platform]
  assert text.count(custom_call) >= 3, 'expected forward and backward kernels'


def _config(family, attention_name):
  variant = {'decoder': 'decoder.py:tiny', 'encoder_decoder': 'encoder_decoder.py:t5_tiny'}[family]
  config = config_lib.load_config_file(os.path.join(REPO, 'configs', variant))
  config.train.batch_size, config.train.seq_len = 4, 24  # One row per (data, fsdp) shard.
  # One layer (of each stack) holds every kind of attention the model has: more layers would
  # only repeat the kernels, which the TPU kernel's interpret mode runs through host callbacks.
  config.model.num_layers = 1
  if family == 'encoder_decoder':
    config.train.target_len = 16
    config.model.num_decoder_layers = 1
  config.optim.warmup_steps, config.optim.lr = 1, 1e-2
  config.model.attention = attention_name
  return config


def _decoder_batch(rng):
  """Rows of two packed documents (positions restart at each), the second row ending in
  padding."""
  b, t = 4, 24
  tokens = rng.integers(3, 250, (b, t + 1)).astype(np.int32)
  segments = np.where(np.arange(t) < 10, 1, 2).astype(np.int32)[None].repeat(b, 0)
  segments[1, 20:] = 0
  positions = np.where(segments == 2, np.arange(t) - 10, np.arange(t)).astype(np.int32)
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], weights=(segments > 0).astype(
      np.float32), positions=positions, segment_ids=segments)


def _t5_batch(rng):
  """Rows of two packed examples each (inputs and targets ending with EOS, 2), then padding."""
  fields = text_to_text.fields(24, 16)
  rows = []
  for _ in range(4):
    examples = [dict(inputs=np.r_[rng.integers(3, 250, int(rng.integers(3, 10))), 2],
                     targets=np.r_[rng.integers(3, 250, int(rng.integers(2, 7))), 2])
                for _ in range(2)]
    rows.append(packing.pack_pairs(examples, 24, 16, fields))
  return {name: np.concatenate([row[name] for row in rows]) for name in fields}


@pytest.mark.slow
@pytest.mark.parametrize('family', ['decoder', 'encoder_decoder'])
@pytest.mark.parametrize('implementation', [name for name in available_implementations()
                                            if name in attention.PALLAS])
def test_models_train_alike_with_the_pallas_kernels_on_a_mesh(implementation, family):
  """A Llama-style decoder (grouped-query heads, packed documents) and T5 (relative-position
  bias, packed cross-attention) through the real train step, batch over (data, fsdp) and heads
  over tensor: two steps of a Pallas kernel give the losses and parameters of the explicit
  kernel on one device."""
  rng = np.random.default_rng(0)
  make_batch = _decoder_batch if family == 'decoder' else _t5_batch
  batches = [make_batch(rng) for _ in range(2)]
  want_losses, want_params = runs.train_steps(_config(family, 'explicit'), dict(data=1), batches)
  config = _config(family, implementation)
  mesh = dict(data=2, fsdp=2, tensor=2)
  if implementation == 'pallas_tpu' and family == 'encoder_decoder':
    # The TPU interpret mode that runs the biased kernel on CPU works through host callbacks,
    # which remat cannot replay and which stall when eight simulated devices run them at once:
    # here the kernel trains on one device. On a TPU it is compiled, and remats and shards like
    # any other; the mesh is tested with splash (the decoder) and the GPU kernel (both models).
    config.model.remat, mesh = 'none', dict(data=1)
  losses, params = runs.train_steps(config, mesh, batches)
  np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, want_params)
  assert max(jax.tree.leaves(diffs)) <= 1e-4, diffs
