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


def pack_pairs(examples, inputs_length, targets_length, fields, start_id=0):
  """Packs (inputs, targets) examples of an encoder-decoder into one row of two streams.

  Each example is a dict of 1-D `inputs` and `targets` ids. The row holds encoder_tokens,
  encoder_positions, encoder_segment_ids (inputs_length) and decoder_tokens (the targets shifted
  right, each example's first input `start_id`), decoder_targets, decoder_weights,
  decoder_positions and decoder_segment_ids (targets_length); example k is segment k + 1 in both
  streams. An example that does not fit what is left of either stream ends the row.
  """
  row = empty_rows(fields, 1)
  used_inputs = used_targets = 0
  for segment, example in enumerate(examples, 1):
    inputs, targets = example['inputs'], example['targets']
    if (used_inputs + len(inputs) > inputs_length
        or used_targets + len(targets) > targets_length):
      break
    span = slice(used_inputs, used_inputs + len(inputs))
    row['encoder_tokens'][0, span] = inputs
    row['encoder_positions'][0, span] = np.arange(len(inputs))
    row['encoder_segment_ids'][0, span] = segment
    span = slice(used_targets, used_targets + len(targets))
    row['decoder_tokens'][0, span] = np.concatenate([[start_id], targets[:-1]])
    row['decoder_targets'][0, span] = targets
    row['decoder_weights'][0, span] = 1.0
    row['decoder_positions'][0, span] = np.arange(len(targets))
    row['decoder_segment_ids'][0, span] = segment
    used_inputs += len(inputs)
    used_targets += len(targets)
  return row
