"""Decoder-only language models (GPT-2 and Llama styles).

Launch:
  python -m research.train --config configs/decoder.py:tiny --workdir /tmp/tiny
  python -m research.train --config configs/decoder.py:gpt2_small --workdir DIR \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.train.batch_size=512
  python -m research.bench train --config configs/decoder.py:nanogpt_cpu

VARIANT is one of the names in VARIANTS below.
"""

import ml_collections

from configs import common

# Each variant overrides the GPT-2-style defaults in `_model_defaults`; `style` selects the
# architecture (gpt2: learned positions, LayerNorm, GELU, biases, tied; llama: RoPE, RMSNorm,
# SwiGLU, grouped-query attention, no biases).
VARIANTS = {
    'tiny': dict(style='llama', num_layers=4, num_heads=4, num_kv_heads=2, emb_dim=128,
                 mlp_dim=352, vocab_size=264, max_len=256, dtype='float32'),
    # Unscanned and without remat (common.CPU_LAYOUT).
    'nanogpt_cpu': dict(style='gpt2', num_layers=4, num_heads=4, emb_dim=128, mlp_dim=512,
                        vocab_size=65, max_len=64, dtype='float32', **common.CPU_LAYOUT),
    'gpt2_small': dict(style='gpt2', num_layers=12, num_heads=12, emb_dim=768, mlp_dim=3072),
    'gpt2_medium': dict(style='gpt2', num_layers=24, num_heads=16, emb_dim=1024, mlp_dim=4096),
    'gpt2_large': dict(style='gpt2', num_layers=36, num_heads=20, emb_dim=1280, mlp_dim=5120),
    'gpt2_xl': dict(style='gpt2', num_layers=48, num_heads=25, emb_dim=1600, mlp_dim=6400),
    'llama_1b': dict(style='llama', num_layers=16, num_heads=32, num_kv_heads=8, emb_dim=2048,
                     mlp_dim=8192, vocab_size=128256, max_len=131072, rope_theta=500000.0,
                     tie_embeddings=True),
    'llama2_7b': dict(style='llama', num_layers=32, num_heads=32, num_kv_heads=32, emb_dim=4096,
                      mlp_dim=11008, vocab_size=32000, max_len=4096, rope_theta=10000.0,
                      tie_embeddings=False),
}

# Training shapes per variant (global batch in sequences, sequence length in tokens).
TRAIN_SHAPES = {
    'tiny': dict(batch_size=16, seq_len=128, num_steps=1200, warmup_steps=100, lr=3e-3),
    'nanogpt_cpu': dict(batch_size=12, seq_len=64, num_steps=2000, warmup_steps=100, lr=1e-3),
}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='decoder',
      style='gpt2',
      num_layers=12,
      num_heads=12,
      num_kv_heads=0,  # 0 means "same as num_heads" (multi-head attention).
      head_dim=0,  # 0 means emb_dim // num_heads.
      emb_dim=768,
      mlp_dim=3072,
      vocab_size=50257,
      max_len=1024,
      rope_theta=10000.0,
      tie_embeddings=True,
      norm_eps=1e-5,
      dropout_rate=0.0,
      dtype='bfloat16',  # Compute dtype; softmax and loss always run in float32.
      param_dtype='float32',
      scan_layers=True,
      remat='dots',  # none | full | dots | minimal | offload (research/models/layers.py).
      attention='auto',  # auto | explicit | xla | cudnn | pallas_gpu | pallas_tpu (attention.py).
      num_labels=0,  # > 0: a sequence-classification head (configs/finetune.py).
  ))


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown decoder variant {variant!r}; choose one of {sorted(VARIANTS)}.')
  shape = TRAIN_SHAPES.get(variant, dict(batch_size=256, seq_len=1024, num_steps=100_000,
                                         warmup_steps=2000, lr=3e-4))
  config = common.base_config(variant, shape,
                              source='markov' if variant == 'nanogpt_cpu' else 'stdlib')
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  config.objective = ml_collections.ConfigDict(dict(name='causal_lm',
                                                    **common.distill_defaults('causal_lm')))
  config.train.sample_tokens = min(120, config.model.max_len - 8)
  config.lock()
  return config
