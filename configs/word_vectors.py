"""Static word embeddings: word2vec (skip-gram, CBOW with negative sampling) and GloVe.

Words are the tokens of a word-level vocabulary (a Hugging Face WordLevel tokenizer.json, passed
as data.tokenizer=hf:DIR), which `python -m research.word_vectors vocab` trains on the corpus.
On the planted corpus (research/data/planted.py), whose analogies are known:
  python -m research.data.planted --out /tmp/planted
  python -m research.word_vectors vocab --source text:/tmp/planted/corpus --out /tmp/planted/vocab
  python -m research.train --config configs/word_vectors.py:skipgram_tiny --workdir /tmp/sg \
      --config.data.paths=/tmp/planted/corpus --config.data.tokenizer=hf:/tmp/planted/vocab
  python -m research.word_vectors evaluate --workdir /tmp/sg --analogies /tmp/planted/analogies.txt
  python -m research.word_vectors export --workdir /tmp/sg --out /tmp/sg/vectors.txt

VARIANT is one of the names in VARIANTS below.
"""

import ml_collections

from configs import common

# Each variant: (model overrides, objective, training shape).
VARIANTS = {
    'skipgram_tiny': (dict(emb_dim=32, vocab_size=128),
                      dict(name='skipgram', window=3, negatives=5, subsample=0.0),
                      dict(batch_size=16, seq_len=64, num_steps=300, warmup_steps=20, lr=2e-2)),
    'cbow_tiny': (dict(emb_dim=32, vocab_size=128),
                  dict(name='cbow', window=3, negatives=5, subsample=0.0),
                  dict(batch_size=16, seq_len=64, num_steps=300, warmup_steps=20, lr=2e-2)),
    # A row holds seq_len co-occurrence entries (i, j, X_ij).
    'glove_tiny': (dict(emb_dim=32, vocab_size=128, biases=True),
                   dict(name='glove', window=5, xmax=100.0, alpha=0.75),
                   dict(batch_size=8, seq_len=256, num_steps=300, warmup_steps=20, lr=2e-2)),
    # As the paper: 300 dimensions, 5 words either side, 5 negatives, subsampling at 1e-3.
    'skipgram_base': (dict(emb_dim=300, vocab_size=100_000),
                      dict(name='skipgram', window=5, negatives=5, subsample=1e-3),
                      dict(batch_size=256, seq_len=256, num_steps=200_000, warmup_steps=1000,
                           lr=1e-3)),
}


def _model_defaults():
  return ml_collections.ConfigDict(dict(
      family='word_vectors',
      emb_dim=300,
      vocab_size=100_000,
      biases=False,  # GloVe's per-word biases.
      max_len=4096,  # Bounds train.seq_len only: the tables know no positions.
      dropout_rate=0.0,
      dtype='float32',
      param_dtype='float32',
  ))


def _objective_defaults():
  return ml_collections.ConfigDict(dict(
      name='skipgram',  # skipgram | cbow | glove
      window=5,  # Words either side of the centre.
      negatives=5,  # word2vec: negatives per pair.
      subsample=0.0,  # word2vec: frequent-word subsampling threshold t (0: off).
      xmax=100.0,  # GloVe: f(X) = min(1, (X / xmax) ** alpha).
      alpha=0.75,
  ))


def get_config(variant: str = 'skipgram_tiny') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'Unknown word_vectors variant {variant!r}; choose one of '
                     f'{sorted(VARIANTS)}.')
  model, objective, shape = VARIANTS[variant]
  config = common.base_config(variant, shape, source='text')
  config.model = _model_defaults()
  config.model.update(model)
  config.objective = _objective_defaults()
  config.objective.update(objective)
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 0.0  # Sparse rows: a global norm would couple unrelated words.
  config.optim.b2 = 0.999
  config.train.eval_every = 100
  config.train.eval_batches = 2
  config.train.log_every = 50
  config.lock()
  return config
