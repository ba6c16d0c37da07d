"""Objectives at equal compute, step 1 of 2: pretrain causal LM (decoder), MLM + NSP (BERT-style
encoder), span corruption and prefix LM (T5-style encoder-decoder) on the embedded corpus, each
for the number of steps that spends the same model FLOPs as BUDGET_STEPS steps of the decoder.

  python -m launch.sweep --sweep configs/sweeps/objectives.py --workdir runs/objectives \
      -- --config.train.progress_bar=False
  python -m research.data.coherence --out runs/objectives/probe
  python -m launch.sweep --sweep configs/sweeps/objectives_probe.py:runs/objectives \
      --workdir runs/objectives_probe -- --config.train.progress_bar=False
  python -m research.report runs/objectives_probe --metric eval_sequence_accuracy,eval_accuracy

Step 2 (configs/sweeps/objectives_probe.py) fine-tunes every pretrained model, and the same
architectures from scratch, on one held-out task (research/data/coherence.py) that each family
can be scored on: accuracy at telling intact snippets of unseen files from spliced ones.
FLOPs are the objectives' model FLOPs (research/objectives, as MFU counts them), so a family that
spends fewer FLOPs per step trains for more steps.
"""

from research.sweeps import flops_per_step, points

BUDGET_STEPS = 600  # Steps of configs/decoder.py:tiny (16 x 128 tokens): 6.2 model TFLOP.
REFERENCE = 'configs/decoder.py:tiny'
PRETRAINING = (
    ('configs/decoder.py:tiny', {}),
    ('configs/encoder.py:bert_tiny', {}),
    ('configs/encoder_decoder.py:t5_tiny', {'objective.name': 'span_corruption'}),
    ('configs/encoder_decoder.py:t5_tiny', {'objective.name': 'prefix_lm'}),
)


def get_sweep():
  budget = BUDGET_STEPS * flops_per_step(REFERENCE)
  return points(*[{'config': spec, **settings,
                   'train.num_steps': round(budget / flops_per_step(spec, **settings)),
                   'train.eval_every': 200, 'checkpoint.every_steps': 500}
                  for spec, settings in PRETRAINING])
