"""Reproduction presets: published models trained with their papers' hyperparameters.

  python -m research.plan --config configs/papers.py:NAME --topology TOPOLOGY
  launch/tpu_pod.sh run --name NAME --zone ZONE --bucket BUCKET --config configs/papers.py:NAME \
      --run NAME -- --config.data.tokenizer=... --config.data.data_dir=...

NAME is one of PAPERS below. Each preset starts from its family's config of the same shape
(configs/decoder.py, encoder.py, encoder_decoder.py) and sets only what the paper fixes and the
family default does not already hold; `describe(NAME)` prints the paper, the data, the tokenizer,
the topology it is planned for and the figure to compare against (docs/reproductions.md gathers
them with the launch commands and the planned memory).
"""

import ml_collections

from configs import common

# English Wikipedia in TFDS has a train split only: its last 1% validates.
_WIKIPEDIA = {'data.tfds_name': 'wikipedia/20230601.en', 'data.train_split': 'train[:99%]',
              'data.validation_split': 'train[99%:]'}

# Each record: the family variant it builds on, the settings it changes (dotted keys), and what a
# reader needs to run and judge it. `topology` is a name research.plan --topology knows.
PAPERS = {
    'gpt2_124m': dict(
        base='decoder.gpt2_small',
        paper='Radford, Wu, Child, Luan, Amodei, Sutskever (2019), Language Models are '
              'Unsupervised Multitask Learners (OpenAI report, no arXiv id); the schedule is '
              "nanoGPT's and llm.c's reproduction, since the report gives only batch 512 x 1024",
        dataset='c4/en:3.1.0, in place of WebText, which is not public (nanoGPT uses '
                'OpenWebText, which TFDS does not build)',
        tokenizer='GPT-2 byte-level BPE, 50257 tokens: hf:DIR holding its tokenizer.json',
        topology='v5p-16',
        reported='validation loss about 2.85 on OpenWebText (nanoGPT, 8 x A100, about 300B '
                 'tokens); not comparable on C4 without the same data',
        notes='batch 512 x 1024 = 2^19 tokens (llm.c; nanoGPT takes 480 x 1024), AdamW lr 6e-4 '
              '(b2 0.95, weight decay 0.1, clipping 1.0), 2000 warm-up steps, cosine to 10% over '
              "600k steps (nanoGPT's schedule), no dropout",
        settings={'optim.lr': 6e-4, 'train.batch_size': 512, 'train.num_steps': 600_000,
                  'data.tfds_name': 'c4/en:3.1.0', 'data.tokenizer': 'hf:tokenizers/gpt2'}),
    'bert_base': dict(
        base='encoder.bert_base',
        paper='Devlin, Chang, Lee, Toutanova (2019), BERT: Pre-training of Deep Bidirectional '
              'Transformers for Language Understanding, arXiv:1810.04805',
        dataset='wikipedia/20230601.en (English Wikipedia); BooksCorpus, the other half of the '
                "paper's data, has no TFDS builder",
        tokenizer='WordPiece, 30522 tokens, uncased: hf:DIR holding bert-base-uncased '
                  'tokenizer.json',
        topology='v5p-16',
        reported='SQuAD v1.1 dev F1 88.5 (Table 2 of the paper; not verified here)',
        notes='256 x 512 for 1M steps, the budget the paper states; the paper ran 90% of the '
              'steps at length 128 and the rest at 512, which this preset does not split. Adam '
              'lr 1e-4 (b2 0.999, weight decay 0.01), 10k warm-up steps, linear decay, dropout '
              '0.1, 15% masking (80/10/10) fixed per example, next-sentence prediction: all '
              'already the family defaults',
        settings={**_WIKIPEDIA, 'data.tokenizer': 'hf:tokenizers/bert-base-uncased'}),
    'roberta_base': dict(
        base='encoder.roberta_base',
        paper='Liu, Ott, Goyal, Du, Joshi, Chen, Levy, Lewis, Zettlemoyer, Stoyanov (2019), '
              'RoBERTa: A Robustly Optimized BERT Pretraining Approach, arXiv:1907.11692',
        dataset='c4/en:3.1.0, in place of the 160 GB of the paper (BookCorpus, Wikipedia, '
                'CC-News, OpenWebText, Stories), which is not public',
        tokenizer='byte-level BPE, 50265 tokens: hf:DIR holding roberta-base tokenizer.json',
        topology='v5p-64',
        reported='GLUE dev MNLI 87.6 (fairseq README, roberta.base)',
        notes='8192 x 512 for 500k steps, Adam lr 6e-4 (b2 0.98, eps 1e-6, weight decay 0.01), '
              '24k warm-up steps, linear decay, dropout 0.1, dynamic masking and no '
              'sentence-pair task (family defaults); no gradient clipping (Table 9 as we read '
              'it; not verified here); 2 micro-batches per step to fit the HBM',
        settings={'optim.lr': 6e-4, 'optim.warmup_steps': 24_000, 'optim.b2': 0.98,
                  'optim.clip_norm': 0.0, 'optim.grad_accum_steps': 2,
                  'train.batch_size': 8192, 'train.num_steps': 500_000,
                  'data.tfds_name': 'c4/en:3.1.0',
                  'data.tokenizer': 'hf:tokenizers/roberta-base'}),
    'albert_base': dict(
        base='encoder.albert_base',
        paper='Lan, Chen, Goodman, Gimpel, Sharma, Soricut (2020), ALBERT: A Lite BERT for '
              'Self-supervised Learning of Language Representations, arXiv:1909.11942',
        dataset='wikipedia/20230601.en; BooksCorpus has no TFDS builder',
        tokenizer='SentencePiece, 30000 pieces: spm:FILE (the released 30k-clean.model)',
        topology='v5p-16',
        reported='SQuAD2.0 dev F1 79.1 / EM 76.1 for ALBERT base (as Papers with Code lists '
                 'it from the paper); the Table 2 average is not verified here',
        notes='4096 x 512 for 125k steps. The paper trains with LAMB at lr 0.00176; no LAMB '
              'here, so AdamW (b2 0.999, weight decay 0.01) at lr 1e-3, the rate RoBERTa '
              '(Table 3) found for Adam at a batch of 8k, with 3125 warm-up steps and linear '
              'decay. Sentence-order prediction and shared layers as in the paper; its n-gram '
              'masking (spans up to 3) is not implemented, so single tokens are masked; 8 '
              'micro-batches per step to fit the HBM',
        settings={'optim.lr': 1e-3, 'optim.warmup_steps': 3125, 'optim.grad_accum_steps': 8,
                  'train.batch_size': 4096, 'train.num_steps': 125_000, **_WIKIPEDIA,
                  'data.tokenizer': 'spm:tokenizers/albert/30k-clean.model'}),
    't5_1_1_base': dict(
        base='encoder_decoder.t5_1_1_base',
        paper='Raffel, Shazeer, Roberts, Lee, Narang, Matena, Zhou, Li, Liu (2020), Exploring '
              'the Limits of Transfer Learning with a Unified Text-to-Text Transformer, '
              'arXiv:1910.10683; v1.1 as in the T5 released-checkpoints notes',
        dataset='c4/en:3.1.0 (the data of v1.1, without the downstream mixture)',
        tokenizer='SentencePiece, 32000 pieces plus 100 sentinels: spm:FILE (the T5 '
                  'spiece.model) with data.extra_ids=100',
        topology='v5p-16',
        reported='not verified: the T5 paper reports v1.0 models, and the v1.1 notes give no '
                 'score to compare with',
        notes='128 x 512 inputs / 114 targets for 2^19 = 524288 steps (the T5 paper\'s '
              'baseline budget, about 34B tokens, not the roughly 1T tokens of the released '
              'checkpoints: 1M steps at batch 2048), Adafactor at 0.01 after 10k warm-up steps '
              'then 1/sqrt(step), no dropout (v1.1), span corruption of 15% with mean span 3: all '
              'family defaults',
        settings={'data.tfds_name': 'c4/en:3.1.0',
                  'data.tokenizer': 'spm:tokenizers/t5/spiece.model', 'data.extra_ids': 100}),
    'llama_1b': dict(
        base='decoder.llama_1b',
        paper='Meta (2024), Llama 3.2 1B model card (shape); training recipe of Touvron et al. '
              '(2023), Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288',
        dataset='c4/en:3.1.0, in place of the 9T tokens of Llama 3.2, which are not public',
        tokenizer='tiktoken BPE, 128256 tokens: hf:DIR holding the Llama 3.2 tokenizer.json',
        topology='v5p-16',
        reported='MMLU 49.3 (5-shot) for the instruction-tuned 1B on Meta\'s model card; the '
                 'base model\'s figure is not verified here',
        notes='512 x 8192 = 4.2M tokens per step (as Llama 2 and 3) for a stated budget of 24k '
              'steps (about 100B tokens, not the 9T of Llama 3.2, which was also distilled from '
              'larger models); AdamW lr 3e-4 (b2 0.95, eps 1e-5, weight decay 0.1, clipping '
              '1.0), 2000 warm-up steps, cosine to 10%; 64 micro-batches per step (one row per '
              'device) to fit the HBM',
        settings={'train.batch_size': 512, 'train.seq_len': 8192, 'train.num_steps': 24_000,
                  'optim.eps': 1e-5,
                  'optim.grad_accum_steps': 64, 'data.tfds_name': 'c4/en:3.1.0',
                  'data.tokenizer': 'hf:tokenizers/llama-3.2'}),
}

# Every preset: TFDS data prepared as array_record (research.data.tfds_convert), parameters
# sharded over all devices (fully sharded data parallel), and no sample printed at the end.
_COMMON = {'data.source': 'tfds', 'mesh.data': 1, 'mesh.fsdp': -1, 'train.sample_tokens': 0}


def get_config(name: str = 'gpt2_124m') -> ml_collections.ConfigDict:
  return common.preset_config('paper preset', name, PAPERS, _COMMON)


def describe(name):
  """The record of preset `name` as lines of text."""
  record = PAPERS[name]
  fields = ('paper', 'dataset', 'tokenizer', 'topology', 'reported', 'notes')
  return '\n'.join([name] + [f'  {field}: {record[field]}' for field in fields])
