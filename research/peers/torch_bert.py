"""Our encoder (BERT, RoBERTa, ALBERT) as eager Hugging Face transformers, for benchmark ratios.

The model is transformers' own pretraining class for `config.model` (BertForPreTraining, or
BertForMaskedLM without a pair head; RobertaForMaskedLM; AlbertForPreTraining, or
AlbertForMaskedLM), float32, in train mode with the config's dropout, so that the ratio measures
us against how transformers trains. It holds exactly our parameters (`parameter_count` equals
research.models.count_params of the encoder family, except for a pooler without a pair head,
which the masked-LM classes leave out); like ours it drops out hidden states but not attention
probabilities, and ALBERT's sentence-order head has no dropout of its own.
Attention is 'sdpa' (`scaled_dot_product_attention`, transformers' default): on CPU it is a few
percent faster than 'eager' at bert_tiny's shape (32 x 128) and about a tenth at length 512, and
level with it at base size, where the dense layers dominate.
The masked-LM loss reads `max_predictions` random positions per row, as ours does, but
transformers projects every position onto the vocabulary and ignores the unlabelled ones (-100):
that extra work is part of how transformers trains, and so part of the ratio.
AdamW with the config's settings and no decay on biases and norms (as BERT), at a constant
learning rate, with global-norm clipping. Needs torch and transformers (`pip install -r
requirements-bench.txt`); never imported by the framework itself.
"""

import torch
import transformers

_FIRST_ID = 3  # Random ids start above the byte tokenizer's first special tokens.
# style -> (config class, class with a pair head, class without, hidden_act).
_CLASSES = {
    'bert': ('BertConfig', 'BertForPreTraining', 'BertForMaskedLM', 'gelu'),
    'roberta': ('RobertaConfig', None, 'RobertaForMaskedLM', 'gelu'),
    'albert': ('AlbertConfig', 'AlbertForPreTraining', 'AlbertForMaskedLM', 'gelu_new'),
}
# The keyword each pretraining class takes its pair labels by.
_PAIR_LABEL = {'bert': 'next_sentence_label', 'albert': 'sentence_order_label'}


def _build(model_config):
  """The transformers model of `config.model`, in train mode."""
  m = model_config
  config_class, paired, unpaired, activation = _CLASSES[m.style]
  if m.pair_head != 'none' and paired is None:
    raise ValueError(f"transformers has no {m.style} class with a pair head; set "
                     "model.pair_head='none'.")
  offset = m.pad_id + 1 if m.style == 'roberta' else 0  # RoBERTa's positions follow pad_id.
  fields = dict(vocab_size=m.vocab_size, hidden_size=m.emb_dim, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
                hidden_act=activation, hidden_dropout_prob=m.dropout_rate,
                attention_probs_dropout_prob=0.0, max_position_embeddings=m.max_len + offset,
                type_vocab_size=m.type_vocab_size, layer_norm_eps=m.norm_eps,
                pad_token_id=m.pad_id, tie_word_embeddings=True, attn_implementation='sdpa')
  if m.style == 'albert':
    fields.update(embedding_size=m.embedding_dim or m.emb_dim, num_hidden_groups=1,
                  inner_group_num=1, classifier_dropout_prob=0.0)
  hf_config = getattr(transformers, config_class)(**fields)
  model_class = getattr(transformers, paired if m.pair_head != 'none' else unpaired)
  return model_class(hf_config).float().train()


def parameter_count(config):
  """Trainable parameters of the peer (tied tensors once), to check it is our model."""
  torch.manual_seed(0)
  return sum(p.numel() for p in _build(config.model).parameters() if p.requires_grad)


def _optimizer(model, optim):
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([dict(params=decay, weight_decay=optim.weight_decay),
                            dict(params=no_decay, weight_decay=0.0)],
                           lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)


def _random_batch(config, batch_size, seq_len):
  """Full-length rows of random ids (never the pad id), with `max_predictions` labelled
  positions per row and, with a pair task, random pair labels."""
  m, o = config.model, config.objective
  ids = torch.arange(_FIRST_ID, m.vocab_size)
  ids = ids[ids != m.pad_id]
  tokens = ids[torch.randint(len(ids), (batch_size, seq_len))]
  labels = torch.full_like(tokens, -100)
  chosen = torch.rand(batch_size, seq_len).argsort(dim=1)[:, :o.max_predictions]
  labels.scatter_(1, chosen, ids[torch.randint(len(ids), chosen.shape)])
  batch = dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=labels)
  if m.type_vocab_size > 1:  # Sentence A, then sentence B.
    types = torch.zeros_like(tokens)
    types[:, seq_len // 2:] = 1
    batch['token_type_ids'] = types
  if o.pair != 'none':
    batch[_PAIR_LABEL[m.style]] = torch.randint(2, (batch_size,))
  return batch


def _train_step(model, optimizer, batch, clip_norm):
  """One optimizer step; returns the loss (masked LM plus the pair task's)."""
  loss = model(**batch).loss
  loss.backward()
  if clip_norm > 0:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  return loss.detach()


def make_trainer(config, batch_size, seq_len):
  """Returns run_steps(n) -> non-padding tokens trained, like research.bench's JAX side."""
  if config.objective.name != 'mlm':
    raise ValueError('The torch peer of the encoder pretrains with masked LM; benchmark a '
                     'configs/encoder.py variant.')
  torch.manual_seed(0)
  model = _build(config.model)
  optimizer = _optimizer(model, config.optim)

  def run_steps(count):
    for _ in range(count):
      loss = _train_step(model, optimizer, _random_batch(config, batch_size, seq_len),
                         config.optim.clip_norm)
    loss.item()  # Wait for the last step.
    return float(count * batch_size * seq_len)  # Full rows: no padding.

  return run_steps
