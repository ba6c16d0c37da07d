"""Packs examples into fixed-length rows with segment ids and positions.

An example is a dict of equal-length 1-D arrays, one per per-token field of the objective's batch
spec (tokens, targets, weights, ...); packing adds `positions` (counting from 0 in each example)
and `segment_ids` (examples numbered from 1 within a row; padding is 0).
"""

import numpy as np


def empty_rows(fields, num_rows):
  return {name: np.full((num_rows,) + f.shape, f.pad, f.dtype) for name, f in fields.items()}


def pack_examples(examples, num_rows, seq_len, fields):
  """Greedy packing in order; an example longer than a row is cut at `seq_len`.

  Returns (rows, consumed): a dict of [num_rows, ...] arrays for `fields` (padding where no
  example lies) and the number of examples consumed.
  """
  rows = empty_rows(fields, num_rows)
  row, column, segment, consumed = 0, 0, 0, 0
  for example in examples:
    length = min(len(example['tokens']), seq_len)
    if column + length > seq_len:
      row, column, segment = row + 1, 0, 0
    if row == num_rows:
      break
    segment += 1
    span = slice(column, column + length)
    for name, values in example.items():
      rows[name][row, span] = values[:length]
    rows['positions'][row, span] = np.arange(length)
    rows['segment_ids'][row, span] = segment
    column += length
    consumed += 1
  return rows, consumed
