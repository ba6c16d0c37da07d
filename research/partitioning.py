"""The one place where logical axis names meet mesh axes.

Parameters are annotated with logical names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `layers`); activations with `batch`, `length`, `act_embed`, `act_heads`, `act_mlp`,
`act_vocab`. LOGICAL_AXIS_RULES maps each name to mesh axes, tried in order: a candidate is taken
when none of its mesh axes is already used by another dimension of the same array and their size
divides the dimension. Otherwise that dimension stays replicated.
"""

import dataclasses
import math

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('batch', 'data'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # Not sharded: head_dim, layers, length, act_embed.
)


def _as_tuple(mesh_axes):
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical_axes, shape, mesh, rules=LOGICAL_AXIS_RULES):
  """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`."""
  used = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    chosen = None
    for rule_name, mesh_axes in rules:
      axes = _as_tuple(mesh_axes)
      if rule_name != name or not axes or used & set(axes):
        continue
      if size % math.prod(mesh.shape[a] for a in axes) == 0:
        chosen = axes
        break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def logical_sharding(logical_axes, shape, mesh):
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def tree_shardings(abstract_tree, mesh):
  """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract values.

  Boxes whose names do not match the value's rank (e.g. Adafactor's factored moments) and
  unboxed leaves are replicated.
  """
  def leaf_sharding(leaf):
    if isinstance(leaf, nn.Partitioned):
      value = leaf.value
      if len(leaf.names) == len(value.shape):
        return logical_sharding(leaf.names, value.shape, mesh)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(leaf_sharding, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """Constrains activations by logical names on an explicit mesh (no ambient mesh needed)."""
  mesh: jax.sharding.Mesh

  def __call__(self, x, logical_axes):
    return jax.lax.with_sharding_constraint(x, logical_sharding(logical_axes, x.shape, self.mesh))


def constrain(x, sharding, logical_axes):
  """Applies `sharding` when the model was built with one; a no-op otherwise."""
  return x if sharding is None else sharding(x, logical_axes)
