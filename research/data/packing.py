"""Packs (inputs, targets) examples into fixed-length rows with segment ids and positions."""

import numpy as np

FIELDS = ('tokens', 'targets', 'weights', 'positions', 'segment_ids')


def pack_examples(examples, num_rows, seq_len, pad_id=0):
  """Greedy first-fit packing in order; an example longer than a row is cut at `seq_len`.

  Returns a dict of [num_rows, seq_len] int32/float32 arrays (see FIELDS) and the number of
  examples consumed. Padding has segment id 0 and weight 0; segments count from 1 within a row.
  """
  rows = {name: np.zeros((num_rows, seq_len), np.int32) for name in FIELDS}
  rows['tokens'][:] = pad_id
  rows['weights'] = np.zeros((num_rows, seq_len), np.float32)
  row, column, segment, consumed = 0, 0, 0, 0
  for inputs, targets in examples:
    length = min(len(inputs), seq_len)
    if column + length > seq_len:
      row, column, segment = row + 1, 0, 0
    if row == num_rows:
      break
    segment += 1
    span = slice(column, column + length)
    rows['tokens'][row, span] = inputs[:length]
    rows['targets'][row, span] = targets[:length]
    rows['weights'][row, span] = 1.0
    rows['positions'][row, span] = np.arange(length)
    rows['segment_ids'][row, span] = segment
    column += length
    consumed += 1
  return rows, consumed
