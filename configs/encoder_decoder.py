"""Encoder-decoder models (T5 v1.0, T5 v1.1, ByT5) pretrained by span corruption, prefix LM or UL2.

Launch:
  python -m research.train --config configs/encoder_decoder.py:t5_tiny --workdir /tmp/t5_tiny
  python -m research.train --config configs/encoder_decoder.py:t5_1_1_base --workdir DIR \
      --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 \
      --config.data.tokenizer=spm:T5_SPM.model --config.data.extra_ids=100 --config.mesh.fsdp=-1
  python -m research.train --config configs/encoder_decoder.py:t5_tiny --workdir DIR \
      --config.objective.name=ul2 --config.train.target_len=128
  python -m research.bench train --config configs/encoder_decoder.py:t5_tiny --peer=torch

VARIANT is one of VARIANTS below (their sizes are those of the published checkpoints, so their
parameter counts equal transformers' T5ForConditionalGeneration of the same configuration).
train.seq_len is the encoder's input length and train.target_len the decoder's (T5: 512 / 114:
span corruption of 568 tokens at noise density 0.15 and mean span 3 fills both exactly).
"""

import ml_collections

from configs import common

_V1_0 = dict(gated=False, activation='relu', tie_embeddings=True, vocab_size=32128)
_V1_1 = dict(gated=True, activation='gelu_tanh', tie_embeddings=False, vocab_size=32128,
             dropout_rate=0.0)

VARIANTS = {
    # Two small stacks over bytes with 122 sentinels above them (ByT5's ids, vocabulary 384):
    # trains in minutes on a CPU. Unscanned and without remat (common.CPU_LAYOUT).
    't5_tiny': dict(_V1_1, num_layers=2, num_decoder_layers=2, num_heads=4, head_dim=16,
                    emb_dim=64, mlp_dim=256, vocab_size=384, dtype='float32',
                    **common.CPU_LAYOUT),
    't5_small': dict(_V1_0, num_layers=6, num_heads=8, head_dim=64, emb_dim=512, mlp_dim=2048),
    't5_base': dict(_V1_0, num_layers=12, num_heads=12, head_dim=64, emb_dim=768, mlp_dim=3072),
    't5_large': dict(_V1_0, num_layers=24, num_heads=16, head_dim=64, emb_dim=1024,
                     mlp_dim=4096),
    't5_1_1_small': dict(_V1_1, num_layers=8, num_heads=6, head_dim=64, emb_dim=512,
                         mlp_dim=1024),
    't5_1_1_base': dict(_V1_1, num_layers=12, num_heads=12, head_dim=64, emb_dim=768,
                        mlp_dim=2048),
    't5_1_1_large': dict(_V1_1, num_layers=24, num_heads=16, head_dim=64, emb_dim=1024,
                         mlp_dim=2816),
    'byt5_small': dict(_V1_1, num_layers=12, num_decoder_layers=4, num_heads=6, head_dim=64,
                       emb_dim=1472, mlp_dim=3584, vocab_size=384),
}

# Sentinels of the byte tokenizer up to ByT5's vocabulary of 384.
BYTE_SENTINELS = 384 - 262

TRAIN_SHAPES = {
    't5_tiny': dict(batch_size=32, seq_len=128, num_steps=600, warmup_steps=50, lr=3e-3),
}
TARGET_LENGTHS = {'t5_tiny': 32}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='encoder_decoder',
      num_layers=6,  # Encoder blocks.
      num_decoder_layers=0,  # 0: as many as the encoder.
      num_heads=8,
      head_dim=64,  # T5's d_kv; 0 means emb_dim // num_heads.
      emb_dim=512,
      mlp_dim=2048,
      gated=False,  # v1.0: act(x W1) W2; v1.1: act(x W0) * (x W1) W2.
      activation='relu',  # relu (v1.0) | gelu_tanh (v1.1, ByT5).
      tie_embeddings=True,  # v1.0 ties the output layer to the token embedding.
      vocab_size=32128,
      relative_buckets=32,
      relative_max_distance=128,
      max_len=2048,  # Longest input or target (relative positions need no table).
      norm_eps=1e-6,
      dropout_rate=0.1,
      dtype='bfloat16',  # Compute dtype; softmax, norms and the loss run in float32.
      param_dtype='float32',
      scan_layers=True,
      remat='dots',  # none | full | dots | minimal | offload (research/models/layers.py)
      attention='auto',  # auto | explicit | xla | cudnn | pallas_gpu | pallas_tpu (attention.py).
  ))


def objective_defaults(name='span_corruption'):
  """Settings of every encoder-decoder objective (each reads its own; research/objectives)."""
  return ml_collections.ConfigDict(dict(
      name=name,  # span_corruption | prefix_lm | ul2
      noise_density=0.15,  # span_corruption: share of tokens in noise spans...
      mean_span_length=3.0,  # ...of this mean length.
      # prefix_lm: 'random' splits each example at a uniform point (the encoder reads the
      # prefix); 'none' gives the encoder nothing (decoder-side causal LM).
      prefix='random',
      # ul2: DENOISER=WEIGHT;... with DENOISER R:MEAN_SPAN:DENSITY, X:MEAN_SPAN:DENSITY or S
      # (prefix LM); R reads [NLU], X [NLG] and S [S2S] before its inputs (UL2's mode tokens).
      denoisers='R:3:0.15=1;R:8:0.15=1;X:3:0.5=1;X:8:0.5=1;X:64:0.15=1;X:64:0.5=1;S=2',
      z_loss=0.0,  # Coefficient of log(Z)^2 per target (T5X: 1e-4).
      label_smoothing=0.0,
      **common.distill_defaults(name),
  ))


def get_config(variant: str = 't5_tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown encoder_decoder variant {variant!r}; choose one of '
                     f'{sorted(VARIANTS)}.')
  shape = TRAIN_SHAPES.get(variant, dict(batch_size=128, seq_len=512, num_steps=524_288,
                                         warmup_steps=10_000, lr=1e-2))
  config = common.base_config(variant, shape)
  config.train.target_len = TARGET_LENGTHS.get(variant, 114)  # Decoder positions per row.
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  config.objective = objective_defaults()
  # The default tokenizer is bytes with ByT5's sentinels; T5's SentencePiece model takes
  # --config.data.tokenizer=spm:FILE --config.data.extra_ids=100.
  config.data.extra_ids = BYTE_SENTINELS
  if variant == 'byt5_small':
    config.objective.mean_span_length = 20.0  # ByT5's spans, longer in bytes than in pieces.
  if variant != 't5_tiny':
    # T5's pretraining: Adafactor at a constant 0.01 after warm-up, decaying as 1/sqrt(step).
    config.optim.update(dict(name='adafactor', decay='rsqrt', weight_decay=0.0, clip_norm=0.0))
  # The input of the greedy answer printed at the end with --config.train.sample_tokens=N (off
  # by default: a span-corruption model answers with sentinels and spans, not a continuation).
  config.train.sample_prompt = 'def main():'
  config.lock()
  return config
