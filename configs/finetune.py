"""Fine-tuning from a pretraining workdir: classification, and sequence-to-sequence on text pairs.

Launch (TASK[,MODEL]; MODEL is FAMILY.VARIANT, default encoder.bert_tiny for classification and
encoder_decoder.t5_tiny for pairs, with the sizes of the run it warm-starts from, or that run's
workdir, whose model and tokenizer are then taken):
  python -m research.train --config configs/finetune.py:sst2 --workdir DIR \
      --config.checkpoint.init_from=PRETRAINING_WORKDIR --config.data.data_dir=TFDS_DIR
  python -m research.train --config configs/finetune.py:csv --workdir DIR \
      --config.checkpoint.init_from=PRETRAINING_WORKDIR --config.data.train_path=train.csv \
      --config.data.validation_path=dev.csv [--config.data.pair_field=text2]
  python -m research.train --config configs/finetune.py:jsonl,decoder.tiny ...
  python -m research.train --config configs/finetune.py:sst2,HF_WORKDIR --workdir DIR \
      --config.checkpoint.init_from=HF_WORKDIR   (HF_WORKDIR: from research.convert from_hf)
  python -m research.train --config configs/finetune.py:pairs --workdir DIR \
      --config.checkpoint.init_from=T5_WORKDIR --config.data.train_path=train.jsonl \
      --config.data.validation_path=dev.jsonl [--config.train.target_len=64]
  python -m research.train --config configs/finetune.py:pairs,T5_WORKDIR --workdir DIR \
      --config.checkpoint.init_from=T5_WORKDIR --config.data.source=tfds \
      --config.data.tfds_name=NAME --config.data.data_dir=TFDS_DIR \
      --config.data.text_field=INPUT_FEATURE --config.data.target_field=TARGET_FEATURE
  python -m research.sample --workdir DIR --input "some input"

Classification (csv, jsonl, sst2; research/objectives/classification.py): the encoder classifies
from its pooled first token, the decoder from its last real token. Warm start loads every
parameter the pretraining run shares with this model (the body) and initialises the
classification head afresh; the state with the best eval_accuracy is kept in DIR/best beside the
latest checkpoints.

Sequence to sequence (pairs; research/objectives/seq2seq.py): an encoder-decoder reads
data.text_field and learns to write data.target_field (JSON lines such as {"input": "...",
"target": "..."}, a CSV file with data.source=csv, or any prepared TFDS dataset with two text
features, as above). Inputs are cut to train.seq_len and targets to train.target_len (taken from
the pretraining run); warm start loads every parameter, and without checkpoint.init_from the
model trains from scratch. The state with the best eval_sequence_accuracy (exact match of the
whole target) is kept in DIR/best.
"""

import importlib
import json
import os

import ml_collections

from configs import common

TASKS = {
    # glue/sst2 must be prepared by TFDS (with TensorFlow) as array_record under data.data_dir.
    'sst2': dict(objective='classification', source='tfds', tfds_name='glue/sst2',
                 text_field='sentence', pair_field='', label_field='label', num_labels=2),
    'csv': dict(objective='classification', source='csv', text_field='text', pair_field='',
                label_field='label', num_labels=2),
    'jsonl': dict(objective='classification', source='jsonl', text_field='text', pair_field='',
                  label_field='label', num_labels=2),
    'pairs': dict(objective='seq2seq', source='jsonl', text_field='input', target_field='target'),
}
DEFAULT_MODELS = {'classification': 'encoder.bert_tiny', 'seq2seq': 'encoder_decoder.t5_tiny'}
BEST_METRICS = {'classification': 'eval_accuracy', 'seq2seq': 'eval_sequence_accuracy'}
# Variants that train in minutes on CPU.
_SMALL = ('bert_tiny', 'tiny', 'nanogpt_cpu', 't5_tiny', 'gru_attention_tiny')


def get_config(arg: str = 'sst2') -> ml_collections.ConfigDict:
  task, _, model = arg.partition(',')
  if task not in TASKS:
    raise ValueError(f'Unknown fine-tuning task {task!r}; choose one of {sorted(TASKS)} '
                     '(optionally followed by ,FAMILY.VARIANT such as ,encoder.bert_tiny).')
  spec = TASKS[task]
  objective = spec['objective']
  pretraining = _pretraining_config(model or DEFAULT_MODELS[objective], arg)
  family, variant = pretraining.model.family, pretraining.variant
  small = variant in _SMALL
  large_lr = 1e-4 if objective == 'seq2seq' else 2e-5  # T5 fine-tunes at higher rates than BERT.
  shape = dict(batch_size=32, seq_len=min(128, pretraining.model.max_len), num_steps=1000,
               warmup_steps=100, lr=1e-3 if small else large_lr)
  config = common.base_config(f'{task},{family}.{variant}', shape, source=spec['source'])
  config.model = pretraining.model
  if family == 'encoder':  # The sentence-pair pretraining head has no use here.
    config.model.pair_head = 'none'
  config.model.dropout_rate = 0.0 if small else 0.1
  config.data.tokenizer = pretraining.data.tokenizer
  # The pretraining run's sentinels (T5) keep its vocabulary; absent from earlier workdirs.
  config.data.extra_ids = pretraining.data.get('extra_ids', 0)
  config.objective = ml_collections.ConfigDict(dict(name=objective))
  config.data.update(dict(
      train_path='',  # csv / jsonl files (globs allowed) of the training examples...
      validation_path='',  # ...and of the validation examples.
      tfds_name=spec.get('tfds_name', ''),  # tfds: the prepared dataset, e.g. glue/sst2.
      validation_split='validation',  # tfds: the split evaluated.
      text_field=spec['text_field'],
  ))
  if objective == 'seq2seq':
    _text_to_text(config, pretraining, spec, arg)
  else:
    _classification(config, spec)
  config.optim.update(dict(b2=0.999, eps=1e-6, weight_decay=0.01, decay='linear',
                           end_lr_ratio=0.0))
  config.train.eval_every = 100
  config.checkpoint.best_metric = BEST_METRICS[objective]
  config.checkpoint.every_steps = 500
  config.lock()
  return config


def _classification(config, spec):
  if 'num_labels' not in config.model:  # A locked family config cannot take the key.
    raise ValueError(f'objective.name=classification needs a family with a classification head; '
                     f'model.family={config.model.family!r} has none.')
  config.model.num_labels = spec['num_labels']
  config.data.pair_field = spec['pair_field']  # '' for single-text tasks.
  config.data.label_field = spec['label_field']  # Integer class ids in [0, model.num_labels).


def _text_to_text(config, pretraining, spec, arg):
  if 'target_len' not in pretraining.train:
    raise ValueError(f'The model of {arg!r} has no train.target_len, so it is no encoder-decoder; '
                     'fine-tune pairs with ,encoder_decoder.VARIANT or an encoder-decoder workdir.')
  config.train.target_len = pretraining.train.target_len  # Decoder positions per row.
  config.data.target_field = spec['target_field']  # The text the model learns to write.
  config.objective.update(dict(z_loss=0.0, label_smoothing=0.0,
                               **common.distill_defaults('seq2seq')))


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
