"""Fine-tuning for sequence and sentence-pair classification, from a pretraining workdir.

Launch (TASK[,MODEL]; MODEL is FAMILY.VARIANT, default encoder.bert_tiny, with the sizes of the
run it warm-starts from, or that run's workdir, whose model and tokenizer are then taken):
  python -m research.train --config configs/finetune.py:sst2 --workdir DIR \
      --config.checkpoint.init_from=PRETRAINING_WORKDIR --config.data.data_dir=TFDS_DIR
  python -m research.train --config configs/finetune.py:csv --workdir DIR \
      --config.checkpoint.init_from=PRETRAINING_WORKDIR --config.data.train_path=train.csv \
      --config.data.validation_path=dev.csv [--config.data.pair_field=text2]
  python -m research.train --config configs/finetune.py:jsonl,decoder.tiny ...
  python -m research.train --config configs/finetune.py:sst2,HF_WORKDIR --workdir DIR \
      --config.checkpoint.init_from=HF_WORKDIR   (HF_WORKDIR: from research.convert from_hf)

The encoder classifies from its pooled first token, the decoder from its last real token
(research/objectives/classification.py). Warm start loads every parameter the pretraining run
shares with this model (the body) and initialises the classification head afresh; the state
with the best eval_accuracy is kept in DIR/best beside the latest checkpoints.
"""

import importlib
import json
import os

import ml_collections

from configs import common

TASKS = {
    # glue/sst2 must be prepared by TFDS (with TensorFlow) as array_record under data.data_dir.
    'sst2': dict(source='tfds', tfds_name='glue/sst2', text_field='sentence', pair_field='',
                 label_field='label', num_labels=2),
    'csv': dict(source='csv', text_field='text', pair_field='', label_field='label',
                num_labels=2),
    'jsonl': dict(source='jsonl', text_field='text', pair_field='', label_field='label',
                  num_labels=2),
}


def get_config(arg: str = 'sst2') -> ml_collections.ConfigDict:
  task, _, model = arg.partition(',')
  if task not in TASKS:
    raise ValueError(f'Unknown fine-tuning task {task!r}; choose one of {sorted(TASKS)} '
                     '(optionally followed by ,FAMILY.VARIANT such as ,encoder.bert_tiny).')
  pretraining = _pretraining_config(model or 'encoder.bert_tiny', arg)
  family, variant = pretraining.model.family, pretraining.variant
  small = variant in ('bert_tiny', 'tiny', 'nanogpt_cpu')
  shape = dict(batch_size=32, seq_len=min(128, pretraining.model.max_len), num_steps=1000,
               warmup_steps=100, lr=1e-3 if small else 2e-5)
  config = common.base_config(f'{task},{family}.{variant}', shape, source=TASKS[task]['source'])
  config.model = pretraining.model
  config.model.num_labels = TASKS[task]['num_labels']
  if family == 'encoder':  # The sentence-pair pretraining head has no use here.
    config.model.pair_head = 'none'
  config.model.dropout_rate = 0.0 if small else 0.1
  config.data.tokenizer = pretraining.data.tokenizer
  config.objective = ml_collections.ConfigDict(dict(name='classification'))
  config.data.update(dict(
      train_path='',  # csv / jsonl files (globs allowed) of the training examples...
      validation_path='',  # ...and of the validation examples.
      tfds_name=TASKS[task].get('tfds_name', ''),  # tfds: the prepared dataset, e.g. glue/sst2.
      validation_split='validation',  # tfds: the split evaluated.
      text_field=TASKS[task]['text_field'],
      pair_field=TASKS[task]['pair_field'],  # '' for single-text tasks.
      label_field=TASKS[task]['label_field'],  # Integer class ids in [0, model.num_labels).
  ))
  config.optim.update(dict(b2=0.999, eps=1e-6, weight_decay=0.01, decay='linear',
                           end_lr_ratio=0.0))
  config.train.eval_every = 100
  config.checkpoint.best_metric = 'eval_accuracy'
  config.checkpoint.every_steps = 500
  config.lock()
  return config


def _pretraining_config(model, arg):
  """The config of the model to fine-tune: a variant of a family's config file, or the
  config.json of a workdir (a run of ours or one converted from Hugging Face)."""
  if os.path.isdir(model):
    path = os.path.join(model, 'config.json')
    if not os.path.isfile(path):
      raise ValueError(f'{model} holds no config.json; pass the workdir of a training run or of '
                       'research.convert from_hf.')
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  family, _, variant = model.partition('.')
  try:
    return importlib.import_module(f'configs.{family}').get_config(variant)
  except (ModuleNotFoundError, AttributeError):  # No such file, or a file without variants.
    raise ValueError(f'Unknown model {model!r} in {arg!r}; write FAMILY.VARIANT (e.g. '
                     'encoder.bert_tiny or decoder.tiny) or the path of a workdir.') from None
