"""The two layouts of a layer stack in a parameter tree, and conversion between them.

`model.scan_layers=True` keeps every block's parameters stacked on a leading axis under one
'layers' subtree (nn.scan: compile time independent of depth); False keeps `layers_0`,
`layers_1`, ... (each block its own arrays). Optimizer states mirror the parameter tree, so the
same conversion applies to a whole train state.
"""

import jax
import numpy as np


def _layer_count(tree):
  return sum(1 for k in tree if k.startswith('layers_') and k[len('layers_'):].isdigit())


def stack(tree):
  """layers_0..layers_{L-1} -> one 'layers' subtree stacked on axis 0 (no-op if stacked)."""
  if 'layers' in tree:
    return tree
  rest = {k: v for k, v in tree.items() if not k.startswith('layers_')}
  per_layer = [tree[f'layers_{i}'] for i in range(_layer_count(tree))]
  rest['layers'] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  return rest


def unstack(tree):
  """The 'layers' subtree -> layers_0..layers_{L-1} (no-op if already per layer); L is the
  length of its leading axis."""
  if 'layers' not in tree:
    return tree
  rest = {k: v for k, v in tree.items() if k != 'layers'}
  for i in range(max(len(leaf) for leaf in jax.tree.leaves(tree['layers']))):
    rest[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], tree['layers'])
  return rest


def _holds_layers(node):
  return isinstance(node, dict) and ('layers' in node or 'layers_0' in node)


def convert(tree, scan_layers):
  """Every parameter-like dict of `tree` (a train state, parameters, optimizer moments; the
  encoder and decoder stacks of an encoder-decoder each on their own) in the layout of
  `scan_layers`; other leaves (step counts, scalars) unchanged. Arrays come back as host numpy
  arrays."""
  tree = jax.tree.map(np.asarray, tree)
  change = stack if scan_layers else unstack
  return jax.tree.map(lambda node: change(node) if _holds_layers(node) else node,
                      tree, is_leaf=_holds_layers)
