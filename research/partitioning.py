"""The one place where logical axis names meet mesh axes.

Parameters are annotated with logical names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `positions`, `layers`); activations and batches with `batch`, `length`, `kv_length`,
`act_embed`, `act_heads`, `act_kv_heads`, `act_mlp`, `act_vocab`, `predictions`.
LOGICAL_AXIS_RULES maps each name to mesh axes, tried in order: a candidate is taken when its mesh
axes are all in the mesh, none is already used by another dimension of the same array, and their
size divides the dimension; otherwise that dimension stays replicated. A name that is neither in
the rules nor in UNSHARDED is an error, so that a misspelt name is never silently replicated.
"""

import dataclasses
import math

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from research.mesh import BATCH_AXES, DATA, EXPERT, FSDP, SEQUENCE, STAGE, TENSOR

LOGICAL_AXIS_RULES = (
    ('batch', BATCH_AXES),
    ('batch', DATA),
    ('length', SEQUENCE),  # Activations along the sequence (queries, hidden states).
    ('vocab', TENSOR),
    ('embed', FSDP),
    ('mlp', TENSOR),
    ('heads', TENSOR),
    ('kv_heads', TENSOR),
    ('act_heads', TENSOR),
    ('act_kv_heads', TENSOR),
    ('act_mlp', TENSOR),
    ('act_vocab', TENSOR),
    # Reserved for mixture-of-experts and pipeline layers (mesh axes not built yet).
    ('expert', EXPERT),
    ('act_expert', EXPERT),
    ('stage', STAGE),
)

# Logical names that are never sharded. `kv_length`: attention gathers keys and values along the
# whole sequence, whatever the sharding of the queries.
UNSHARDED = ('head_dim', 'layers', 'positions', 'kv_length', 'act_embed', 'predictions')

LOGICAL_AXES = frozenset(name for name, _ in LOGICAL_AXIS_RULES) | frozenset(UNSHARDED)


def _as_tuple(mesh_axes):
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical_axes, shape, mesh, rules=LOGICAL_AXIS_RULES):
  """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`."""
  used = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f'Unknown logical axis name {name!r}; use one of {sorted(LOGICAL_AXES)} '
                       'or add it to LOGICAL_AXIS_RULES (or UNSHARDED) in '
                       'research/partitioning.py.')
    chosen = None
    for rule_name, mesh_axes in rules:
      axes = _as_tuple(mesh_axes)
      if (rule_name != name or not axes or used & set(axes)
          or not set(axes) <= set(mesh.axis_names)):
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
