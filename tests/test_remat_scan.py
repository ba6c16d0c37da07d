"""Every remat policy, scanned or not, computes the plain model's loss and gradients, and each
keeps less than the one before it; a scanned stack compiles in about the same time whatever its
depth."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import layout
from research.models import decoder

TOKENS = np.random.default_rng(0).integers(0, 264, (2, 17)).astype(np.int32)


def _config(decoder_config, scan_layers, remat, num_layers=3):
  config = decoder_config('tiny')
  m = config.model
  m.num_layers, m.emb_dim, m.mlp_dim = num_layers, 64, 128
  m.scan_layers, m.remat = scan_layers, remat
  return m


def _loss_fn(model):
  def loss(params):
    logits = model.apply({'params': params}, jnp.asarray(TOKENS[:, :-1]), method='language_model')
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()
  return jax.jit(jax.value_and_grad(loss))


def test_remat_policies_and_scan_give_the_plain_loss_and_gradients(decoder_config):
  plain = decoder.build(_config(decoder_config, scan_layers=False, remat='none'))
  params = plain.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                      method='initialize')['params']
  params = jax.tree.map(lambda x: getattr(x, 'value', x), params,
                        is_leaf=lambda x: hasattr(x, 'names'))
  want_loss, want_grads = _loss_fn(plain)(params)
  stacked = layout.stack(jax.tree.map(np.asarray, params))
  # Every policy unrolled; scanned, none, the default (dots) and the one that keeps least.
  cases = [(False, 'full'), (False, 'dots'), (False, 'minimal'),
           (True, 'none'), (True, 'dots'), (True, 'minimal')]
  for scan_layers, remat in cases:
    model = decoder.build(_config(decoder_config, scan_layers, remat))
    loss, grads = _loss_fn(model)(stacked if scan_layers else params)
    if scan_layers:
      grads = layout.unstack(grads)
    assert abs(float(loss) - float(want_loss)) <= 1e-6, (scan_layers, remat)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), grads, want_grads)
    assert max(jax.tree.leaves(diffs)) <= 1e-5, (scan_layers, remat, diffs)


def _compiled(decoder_config, num_layers, scan_layers, remat='dots'):
  """The optimised forward + backward program, compiled from abstract parameters."""
  model = decoder.build(_config(decoder_config, scan_layers, remat, num_layers))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32),
                                               method='initialize'))['params']
  abstract = jax.tree.map(lambda x: getattr(x, 'value', x), abstract,
                          is_leaf=lambda x: hasattr(x, 'names'))
  return _loss_fn(model).lower(abstract).compile()


def _compiled_instructions(decoder_config, num_layers, scan_layers):
  """Instructions of the optimised program: what the compiler works through (a count, unlike a
  compile time, does not depend on the machine's load)."""
  text = _compiled(decoder_config, num_layers, scan_layers).as_text()
  return sum(1 for line in text.splitlines() if ' = ' in line)


def test_each_remat_policy_keeps_less_than_the_one_before(decoder_config):
  """The policies are applied, not only harmless: over scanned layers the backward pass's
  temporaries shrink from none through dots and minimal to full."""
  sizes = [_compiled(decoder_config, 3, True, remat).memory_analysis().temp_size_in_bytes
           for remat in ('none', 'dots', 'minimal', 'full')]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4, sizes


def test_a_48_layer_scanned_model_compiles_to_the_program_of_a_4_layer_one(decoder_config):
  """Scanning keeps one block in the program whatever the depth, so compile time does not grow
  with it; unrolled, the program grows with every layer."""
  shallow = _compiled_instructions(decoder_config, 4, scan_layers=True)
  deep = _compiled_instructions(decoder_config, 48, scan_layers=True)
  assert deep < 1.1 * shallow, (shallow, deep)
  unrolled = _compiled_instructions(decoder_config, 4, scan_layers=False)
  assert unrolled > 2 * shallow, (shallow, unrolled)  # The count does see layers.


@pytest.mark.parametrize('remat', ['offload'])
def test_host_offload_is_refused_on_cpu_in_one_sentence(decoder_config, remat):
  from research import config as config_lib
  config = decoder_config('tiny')
  config.model.remat = remat
  with pytest.raises(config_lib.ConfigError, match="remat='offload' keeps activations in pinned"):
    config_lib.validate(config, 1)
