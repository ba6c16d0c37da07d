"""Encoder models (BERT, RoBERTa, ALBERT) pretrained with masked language modelling.

Launch:
  python -m research.train --config configs/encoder.py:bert_tiny --workdir /tmp/bert_tiny
  python -m research.train --config configs/encoder.py:bert_base --workdir DIR \
      --config.data.source=text --config.data.paths=CORPUS --config.mesh.fsdp=-1 \
      --config.mesh.data=1
  python -m research.bench train --config configs/encoder.py:bert_tiny

VARIANT is one of the names in VARIANTS below. Each style brings the objective of its paper:
BERT masks statically (the same tokens in every epoch) and adds next-sentence prediction;
RoBERTa masks dynamically (anew in every epoch) with no sentence-pair task; ALBERT adds
sentence-order prediction and shares one block's parameters across its layers.
"""

import math

import ml_collections

from configs import common

_BERT = dict(style='bert', vocab_size=30522, max_len=512, type_vocab_size=2, norm_eps=1e-12,
             pooler=True, pair_head='nsp', share_layers=False, embedding_dim=0, pad_id=0)
_ROBERTA = dict(style='roberta', vocab_size=50265, max_len=512, type_vocab_size=1, norm_eps=1e-5,
                pooler=False, pair_head='none', share_layers=False, embedding_dim=0, pad_id=1)
_ALBERT = dict(style='albert', vocab_size=30000, max_len=512, type_vocab_size=2, norm_eps=1e-12,
               pooler=True, pair_head='sop', share_layers=True, embedding_dim=128, pad_id=0)
_BASE = dict(num_layers=12, num_heads=12, emb_dim=768, mlp_dim=3072)
_LARGE = dict(num_layers=24, num_heads=16, emb_dim=1024, mlp_dim=4096)

VARIANTS = {
    # BERT-Tiny's shape (2 layers, 128 wide) on the byte tokenizer: trains in minutes on a CPU.
    # Unscanned and without remat (common.CPU_LAYOUT).
    'bert_tiny': dict(_BERT, num_layers=2, num_heads=2, emb_dim=128, mlp_dim=512, vocab_size=264,
                      max_len=128, dtype='float32', dropout_rate=0.0, **common.CPU_LAYOUT),
    'bert_base': dict(_BERT, **_BASE),
    'bert_large': dict(_BERT, **_LARGE),
    'roberta_base': dict(_ROBERTA, **_BASE),
    'roberta_large': dict(_ROBERTA, **_LARGE),
    'albert_base': dict(_ALBERT, **_BASE),
    'albert_large': dict(_ALBERT, **_LARGE),
    'albert_xxlarge': dict(_ALBERT, num_layers=12, num_heads=64, emb_dim=4096, mlp_dim=16384),
}

# The pretraining objective of each style (configs/encoder.py docstring).
OBJECTIVES = {
    'bert': dict(dynamic_masking=False, pair='nsp'),
    'roberta': dict(dynamic_masking=True, pair='none'),
    'albert': dict(dynamic_masking=False, pair='sop'),
}

TRAIN_SHAPES = {
    'bert_tiny': dict(batch_size=32, seq_len=128, num_steps=600, warmup_steps=50, lr=2e-3),
}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='encoder',
      style='bert',  # bert | roberta | albert
      num_layers=12,
      num_heads=12,
      emb_dim=768,  # Hidden size.
      embedding_dim=0,  # ALBERT's factorised embedding size; 0 means emb_dim.
      mlp_dim=3072,
      vocab_size=30522,
      max_len=512,  # Usable positions (RoBERTa's table has pad_id + 1 more rows).
      type_vocab_size=2,  # Token types (segments A and B).
      pad_id=0,  # RoBERTa's positions start after it.
      norm_eps=1e-12,
      dropout_rate=0.1,
      dtype='bfloat16',  # Compute dtype; softmax, norms and the loss run in float32.
      param_dtype='float32',
      scan_layers=True,
      remat='dots',  # none | full | dots | minimal | offload (research/models/layers.py)
      attention='auto',  # auto | explicit | xla | cudnn | pallas_gpu | pallas_tpu (attention.py).
      share_layers=False,  # ALBERT: one block's parameters applied num_layers times.
      pooler=True,  # tanh(dense(first token)) for sentence-level heads.
      pair_head='nsp',  # none | nsp | sop: the sentence-pair head on the pooled output.
      num_labels=0,  # > 0: a sequence-classification head (configs/finetune.py).
  ))


def _objective(style, seq_len):
  return ml_collections.ConfigDict(dict(
      name='mlm',
      mask_rate=0.15,  # Fraction of each example's text tokens chosen for prediction...
      mask_token_rate=0.8,  # ...of which this share becomes [MASK],
      random_token_rate=0.1,  # this share a random token, and the rest stays unchanged.
      # Predictions gathered per row: 15% of the length rounded up to a multiple of 4 (BERT's
      # 20 at length 128 and 80 at 512).
      max_predictions=4 * math.ceil(0.15 * seq_len / 4),
      whole_word=False,  # Choose whole words (runs of non-space bytes) instead of tokens.
      **OBJECTIVES[style],  # dynamic_masking: a new mask every epoch; pair: none | nsp | sop.
      **common.distill_defaults('mlm'),
  ))


def get_config(variant: str = 'bert_tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown encoder variant {variant!r}; choose one of {sorted(VARIANTS)}.')
  shape = TRAIN_SHAPES.get(variant, dict(batch_size=256, seq_len=512, num_steps=1_000_000,
                                         warmup_steps=10_000, lr=1e-4))
  config = common.base_config(variant, shape)
  config.model = _model_defaults()
  config.model.update(VARIANTS[variant])
  config.objective = _objective(config.model.style, shape['seq_len'])
  # BERT's optimizer: AdamW (beta2 0.999, weight decay 0.01), linear decay to zero.
  config.optim.update(dict(b2=0.999, eps=1e-6, weight_decay=0.01, decay='linear',
                           end_lr_ratio=0.0))
  config.lock()
  return config
