"""Throughput benchmarks on one GPU: four published models at their pretraining lengths.

  python -m research.bench train --config configs/bench.py:llama_1b_2048 --steps 60
  python -m research.plan --config configs/bench.py:llama_1b_2048 --topology h100-80gb:1

NAME is one of BENCHMARKS below. Each starts from its family's config of the same model
(configs/decoder.py, encoder.py, encoder_decoder.py), so it trains as that config does: bfloat16
compute over float32 parameters and optimizer state, full packed rows (research.bench feeds each
objective's synthetic_batch, one full-length document per row) and the family's optimizer. Only
the training shape changes: the per-device batch and the remat policy, picked with the planner
(research/plan.py) as the largest power-of-two batch whose step fits one H100 80 GB with room to
spare (an H200 has 141 GB). The planner compiles for XLA:CPU, whose activation memory only
estimates a GPU's; without a fused attention kernel it should run high, so the batches are
conservative.
`launch/bench_gpu.sh` runs the four; the README's Performance section holds their figures.
"""

import ml_collections

from configs import common

# Each record: the family variant, the settings it changes (dotted keys), the MFU target on one
# H100 or H200, and what the planner reported for it (--topology h100-80gb:1; the H200's plan is
# the same bytes against 141 GiB). remat='dots' keeps the weight matmuls' outputs and recomputes
# attention and elementwise work: on GPU that recompute is cheap next to the matmuls it saves,
# and MFU does not count it.
BENCHMARKS = {
    'llama_1b_2048': dict(
        base='decoder.llama_1b', target_mfu=0.55,
        # Batch 16 would need about 91 GiB: an H200 only.
        planned='4.6 GiB parameters, 9.2 GiB AdamW moments, 40.7 GiB activations: 54.5 GiB',
        settings={'train.seq_len': 2048, 'train.batch_size': 8, 'model.remat': 'dots'}),
    'gpt2_small_1024': dict(
        base='decoder.gpt2_small', target_mfu=0.45,
        # Batch 128 plans at 66.3 GiB: too close to 80 for an estimate.
        planned='0.5 GiB parameters, 0.9 GiB AdamW moments, 32.7 GiB activations: 34.1 GiB',
        settings={'train.seq_len': 1024, 'train.batch_size': 64, 'model.remat': 'dots'}),
    'bert_base_512': dict(
        base='encoder.bert_base', target_mfu=0.50,
        planned='0.4 GiB parameters, 0.8 GiB AdamW moments, 32.7 GiB activations: 34.0 GiB',
        settings={'train.seq_len': 512, 'train.batch_size': 128, 'model.remat': 'dots'}),
    't5_1_1_base_512': dict(
        base='encoder_decoder.t5_1_1_base', target_mfu=0.45,
        planned='0.9 GiB parameters, 0.3 GiB Adafactor state, 39.8 GiB activations: 41.0 GiB',
        settings={'train.seq_len': 512, 'train.target_len': 114, 'train.batch_size': 128,
                  'model.remat': 'dots'}),
}

# Every benchmark: one device holds the whole model (no sharding to measure), the batches are
# synthetic and nothing is sampled at the end.
_COMMON = {'mesh.data': -1, 'mesh.fsdp': 1, 'train.sample_tokens': 0,
           'model.dtype': 'bfloat16', 'model.param_dtype': 'float32'}


def get_config(name: str = 'gpt2_small_1024') -> ml_collections.ConfigDict:
  return common.preset_config('benchmark', name, BENCHMARKS, _COMMON)
