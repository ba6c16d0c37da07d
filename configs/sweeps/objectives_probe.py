"""Objectives at equal compute, step 2 of 2: fine-tune each model pretrained by
configs/sweeps/objectives.py, and each architecture from scratch, on the held-out coherence probe
(research/data/coherence.py): `--sweep configs/sweeps/objectives_probe.py:PRETRAINING_SWEEP`,
with the probe written to PRETRAINING_SWEEP/probe (commands in configs/sweeps/objectives.py).

Every run sees the same examples for the same steps at its family's fine-tuning settings
(configs/finetune.py); the decoder and the encoder classify (eval_accuracy), the encoder-decoders
write `intact` or `spliced` (eval_sequence_accuracy: the whole answer right, the same measure;
their eval_accuracy counts tokens), which the report puts in one column with
`--metric eval_sequence_accuracy,eval_accuracy`.
"""

import os

from research.report import load_registry
from research.sweeps import SweepError, points, seeds

STEPS = 300
SEEDS = 1  # Fine-tuning seeds (the order of the examples and the new head's initialisation).

# The fine-tuning config of each pretraining config, and the probe file it reads.
FINETUNING = {
    'configs/decoder.py:tiny': ('configs/finetune.py:jsonl,decoder.tiny', ''),
    'configs/encoder.py:bert_tiny': ('configs/finetune.py:jsonl,encoder.bert_tiny', ''),
    'configs/encoder_decoder.py:t5_tiny': ('configs/finetune.py:pairs', '.pairs'),
}


def get_sweep(pretraining='runs/objectives'):
  probe = os.path.join(pretraining, 'probe')
  if not os.path.exists(os.path.join(probe, 'train.jsonl')):
    raise SweepError(f'{probe} holds no probe task; write it with python -m '
                     f'research.data.coherence --out {probe}.')
  registry = os.path.join(pretraining, 'registry.jsonl')
  runs = [r for r in (load_registry(registry) if os.path.exists(registry) else {}).values()
          if r['status'] == 'finished']
  if not runs:
    raise SweepError(f'{pretraining} has no finished pretraining run; run that sweep first.')
  starts = [(r['config'], r['workdir']) for r in runs] + [(spec, '') for spec in FINETUNING]
  result = []
  for spec, init_from in starts:
    config, suffix = FINETUNING[spec]
    result.append({'config': config, 'checkpoint.init_from': init_from,
                   'data.train_path': os.path.abspath(os.path.join(probe, f'train{suffix}.jsonl')),
                   'data.validation_path': os.path.abspath(os.path.join(probe,
                                                                        f'dev{suffix}.jsonl')),
                   'train.num_steps': STEPS, 'train.eval_every': 100})
  return points(*result) * seeds(SEEDS)
