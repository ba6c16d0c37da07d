"""Decoder-only language models (GPT-2 and Llama styles).

Launch:
  python -m research.train --config configs/decoder.py:tiny --workdir /tmp/tiny
  python -m research.train --config configs/decoder.py:gpt2_small --workdir DIR \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --config.train.batch_size=512
  python -m research.bench train --config configs/decoder.py:nanogpt_cpu

VARIANT is one of the names in VARIANTS below.
"""

import ml_collections

# Each variant overrides the GPT-2-style defaults in `_model_defaults`; `style` selects the
# architecture (gpt2: learned positions, LayerNorm, GELU, biases, tied; llama: RoPE, RMSNorm,
# SwiGLU, grouped-query attention, no biases).
VARIANTS = {
    'tiny': dict(style='llama', num_layers=4, num_heads=4, num_kv_heads=2, emb_dim=128,
                 mlp_dim=352, vocab_size=264, max_len=256, dtype='float32'),
    'nanogpt_cpu': dict(style='gpt2', num_layers=4, num_heads=4, emb_dim=128, mlp_dim=512,
                        vocab_size=65, max_len=64, dtype='float32'),
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
      remat='dots',  # none | full | dots (save weight-matmul outputs, recompute the rest).
      attention='auto',  # auto | explicit | xla | cudnn (research/models/attention.py).
  ))


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown decoder variant {variant!r}; choose one of {sorted(VARIANTS)}.')
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0

  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])

  shape = TRAIN_SHAPES.get(variant, dict(batch_size=256, seq_len=1024, num_steps=100_000,
                                         warmup_steps=2000, lr=3e-4))

  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # -1: whatever devices the other axes leave.
      fsdp=1,
      tensor=1,
  ))

  config.optim = ml_collections.ConfigDict(dict(
      name='adamw',  # adamw | adafactor | lion
      lr=shape['lr'],
      warmup_steps=shape['warmup_steps'],
      decay='cosine',  # cosine | linear | rsqrt | constant
      end_lr_ratio=0.1,  # Final learning rate as a fraction of the peak (cosine, linear).
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      decay_embeddings=False,
      decay_norms_and_biases=False,
      clip_norm=1.0,  # 0 disables clipping.
      grad_accum_steps=1,
  ))

  config.data = ml_collections.ConfigDict(dict(
      # stdlib: this Python's standard-library sources (embedded default, no download);
      # text: data.paths; markov: in-memory synthetic tokens (research/data/synthetic.py).
      source='markov' if variant == 'nanogpt_cpu' else 'stdlib',
      paths='',  # Comma-separated files, directories or globs, for source='text'.
      data_dir='~/.cache/research/tfds',  # Where text sources are prepared as array_record.
      validation_percent=5,
      tokenizer='bytes',
      markov_branching=2,
      min_doc_len=8,
  ))

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      init_from='',  # Another run's workdir: start from its parameters (warm start).
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=shape['batch_size'],  # Global batch, in sequences.
      seq_len=shape['seq_len'],
      num_steps=shape['num_steps'],
      log_every=10,
      eval_every=100,
      eval_batches=4,
      profile_start_step=-1,  # >= 0 captures a jax.profiler trace from this step.
      profile_num_steps=5,
      progress_bar=True,
      tensorboard=True,
      stop_at_step=-1,  # Stop (as if preempted) at this step; -1 runs to num_steps.
      # Greedy sample printed at the end (prompt + sample within max_len); 0 disables.
      sample_tokens=min(120, config.model.max_len - 8),
      sample_prompt='def ',
  ))

  config.lock()
  return config
