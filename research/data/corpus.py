"""The embedded default corpus: this Python's own standard-library source files.

It needs no download, but differs between Python builds, so its fingerprint is recorded in the
workdir of every run that uses it.
"""

import os
import sysconfig


def stdlib_sources():
  """Globs for the standard library's .py files (site-packages excluded)."""
  root = sysconfig.get_paths()['stdlib']
  if not os.path.isdir(root):
    raise FileNotFoundError(f'The Python standard library was not found at {root}.')
  return [os.path.join(root, '**', '*.py')]


def is_stdlib_file(path):
  return 'site-packages' not in path.split(os.sep) and 'dist-packages' not in path.split(os.sep)
