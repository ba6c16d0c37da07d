"""Scaling study: four Llama-style decoder sizes on the same 2M tokens of the embedded corpus.

  python -m launch.sweep --sweep configs/sweeps/scaling.py --workdir runs/scaling \
      -- --config.train.progress_bar=False
  python -m research.report runs/scaling --fit_power_law non_embedding_params

Sizes (non-embedding parameters, 3 d^2 + 3 d * mlp per layer with half as many key/value heads as
query heads): 2 x 48 wide = 51.8k, 4 x 64 = 184k, 4 x 128 (`tiny`) = 737k, 8 x 192 = 3.32M. Every
size sees the same batches (16 x 128 tokens, 977 steps = 2.0M tokens) at the same learning-rate
schedule, so the loss differences are those of the parameter count alone, Kaplan-style.
"""

from research.sweeps import points, seeds, zipped

CONFIG = 'configs/decoder.py:tiny'
SEEDS = 1  # Two seeds double the 30 minutes one takes on two CPU cores.


def get_sweep():
  sizes = zipped(num_layers=[2, 4, 4, 8], emb_dim=[48, 64, 128, 192], num_heads=[4, 4, 4, 6],
                 num_kv_heads=[2, 2, 2, 3], mlp_dim=[132, 176, 352, 528])
  budget = points({'train.num_tokens': 2_000_000, 'train.eval_every': 250,
                   'train.eval_batches': 16, 'checkpoint.every_steps': 250})
  return sizes * seeds(SEEDS) * budget
