"""Sections every family's config shares: seed, mesh, optim, data, checkpoint, train.

A family file (configs/<family>.py) adds its `model` and `objective` sections and overrides the
training shape of its variants; nothing here is copied into a family file.
"""

import importlib

import ml_collections

# The layer layout of the benchmark's CPU variants (nanogpt_cpu, bert_tiny, t5_tiny). At two
# to four layers, scanning saves little compile time, and their activations take a few hundred
# megabytes, so recomputing them saves nothing worth having. On XLA:CPU the unscanned step
# without remat runs faster: it can run independent work side by side (weight gradients beside
# the backward pass) where a scanned body cannot, and stacking a scan's saved activations costs
# copies. Measured in one process, alternating, against scan_layers=True with remat='dots':
# 8-12% (nanogpt_cpu), 15% (bert_tiny) and 21% (t5_tiny) less time per step. The Llama-style
# `tiny` measured 4% slower this way and keeps the default.
CPU_LAYOUT = dict(scan_layers=False, remat='none')


def base_config(variant, shape, source='stdlib'):
  """Everything but `model` and `objective` (which the family file adds before locking).

  shape: batch_size (global, in sequences), seq_len, num_steps, warmup_steps, lr.
  """
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0

  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # -1: whatever devices the other axes leave.
      fsdp=1,
      sequence=1,  # Shards activations along the sequence (long contexts).
      tensor=1,
      # Of each size above, how many shards lie in different slices (TPU slices, or hosts on
      # GPU and CPU), talking over the data-centre network; the product is the slice count.
      dcn_data=1,
      dcn_fsdp=1,
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
      mu_dtype='float32',  # float32 | bfloat16: adamw's and lion's first moment (research/optim).
  ))

  config.data = ml_collections.ConfigDict(dict(
      # stdlib: this Python's standard-library sources (embedded default, no download);
      # text | jsonl | parquet: data.paths; tfds: data.tfds_name; markov: in-memory synthetic
      # tokens (research/data/synthetic.py). See research/data/sources.py.
      source=source,
      paths='',  # Comma-separated files, directories or globs (text, jsonl, parquet).
      tfds_name='',  # A TFDS dataset prepared as array_record under data_dir: c4/en:3.1.0.
      train_split='train',  # tfds: the splits read (TFDS slicing allowed: train[:99%]).
      validation_split='validation',
      text_field='text',  # jsonl, parquet, tfds: the field holding each document's text.
      # Several sources by weight, 'SOURCE=WEIGHT;...' with SOURCE as KIND or KIND:LOCATION, e.g.
      # 'tfds:c4/en:3.1.0=0.7;text:/data/wiki=0.3'; when set it replaces data.source.
      mixture='',
      # TFDS datasets are read from here (a local path, or gs:// through etils.epath).
      data_dir='~/.cache/research/tfds',
      tokens_dir='',  # Where tokenized shards are written ('' = <data_dir>/tokens); local/shared.
      tokenized_dir='',  # The shards of one source made elsewhere (research.data.pretokenize).
      validation_percent=5,  # Local sources: the share of files (or of one file) that validates.
      # bytes | spm:FILE.model (SentencePiece) | hf:DIR (a Hugging Face tokenizer.json).
      tokenizer='bytes',
      extra_ids=0,  # Sentinel tokens appended above a SentencePiece vocabulary (T5: 100).
      prefetch=2,  # Steps whose rows a background thread computes ahead of the devices.
      markov_branching=2,
      min_doc_len=8,
  ))

  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=500,
      keep=3,
      init_from='',  # Another run's workdir: start from its parameters (warm start).
      # An evaluation metric (e.g. eval_accuracy): the state with its best value so far is also
      # kept in <workdir>/best, beside the latest checkpoints; '' keeps only the latest.
      best_metric='',
      best_mode='max',  # max | min: which values of best_metric are better.
  ))

  config.watchdog = ml_collections.ConfigDict(dict(
      # A step slower than slow_factor x the median recent step (and than slow_min_s) makes
      # every process write its Python stacks to stderr.
      slow_factor=10.0,
      slow_min_s=30.0,
      exit_after_s=3600.0,  # A step this long ends the process with code 1; 0 never does.
      # A process silent this long is declared lost by the multi-host runtime, which then ends
      # every other process with an error naming it.
      peer_timeout_s=100,
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=shape['batch_size'],  # Global batch, in sequences.
      seq_len=shape['seq_len'],
      num_steps=shape['num_steps'],
      num_tokens=0,  # > 0: train on this many tokens instead (sets num_steps).
      # Vocabulary losses: 0 computes the float32 logits of every position at once, N > 0 N
      # positions at a time, -1 chunks for a vocabulary of 32768 or more (objectives/chunked_loss).
      loss_chunk=-1,
      log_every=10,
      eval_every=100,
      eval_batches=4,
      profile_start_step=-1,  # >= 0 captures a jax.profiler trace from this step.
      profile_num_steps=5,
      progress_bar=True,
      tensorboard=True,
      stop_at_step=-1,  # Stop (as if preempted) at this step; -1 runs to num_steps.
      # Greedy sample printed at the end by families that generate text (prompt + sample
      # within max_len); 0 disables.
      sample_tokens=0,
      sample_prompt='def ',
  ))
  return config


def distill_defaults(base):
  """objective.* settings of distillation (research/objectives/distill.py), used when
  objective.name=distill: `base` (the family's own objective) gives the data and the hard-label
  loss, and a trained run in objective.teacher the soft targets."""
  return dict(
      base=base,
      teacher='',  # The teacher run's workdir (its config.json and newest checkpoint are read).
      alpha=0.5,  # Weight of the soft (KL) term; 1 - alpha weighs the base objective's loss.
      temperature=2.0,  # Both distributions are softened by it; the KL term is scaled by T^2.
      hidden_weight=0.0,  # > 0 adds the mean squared error of projected hidden states.
      teacher_dtype='float32',  # float32 | bfloat16: the teacher's parameters and computation.
  )


def preset_config(what, name, records, common):
  """The config of preset `name` of `records` (configs/papers.py, configs/bench.py): the family
  config its record's `base` names ('family.variant'), with `common` and then the record's own
  `settings` (dotted keys) set on it. `what` names the kind of preset in errors."""
  if name not in records:
    raise ValueError(f'Unknown {what} {name!r}; choose one of {sorted(records)}.')
  record = records[name]
  family, _, variant = record['base'].partition('.')
  config = importlib.import_module(f'configs.{family}').get_config(variant)
  config.unlock()
  config.variant = name
  for key, value in {**common, **record['settings']}.items():
    section, _, field = key.rpartition('.')
    if field not in config[section]:  # A setting the family does not have is a typo here.
      raise ValueError(f'{what.split()[-1].capitalize()} {name!r} sets {key}, which configs of '
                       f'{record["base"]} lack.')
    config[section][field] = value
  config.lock()
  return config
