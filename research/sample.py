"""Generate text from a trained (or converted) model.

  python -m research.sample --workdir DIR --prompt "def " [--prompt "class "] \
      [--max_new_tokens 200 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0]
  python -m research.sample --workdir DIR --prompt_ids 15496,11 ...   (token ids in and out,
      e.g. for a model converted from Hugging Face, whose tokenizer is not ours)
"""

import sys

import jax
from absl import flags

from research import checkpoint as checkpoint_lib
from research import config as config_lib
from research import decode
from research import workdir as workdir_lib
from research.data import tokenizer as tokenizer_lib
from research.models import decoder

_PROMPTS = flags.DEFINE_multi_string('prompt', [], 'Prompt text (repeat for a batch).')
_PROMPT_IDS = flags.DEFINE_multi_string('prompt_ids', [], 'Comma-separated token ids (repeatable).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 decodes greedily.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Keep the smallest set with this probability mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  flags.FLAGS(argv)
  try:
    if not config_lib.WORKDIR.value or not (_PROMPTS.value or _PROMPT_IDS.value):
      raise ValueError('Pass --workdir and at least one --prompt or --prompt_ids.')
    config, params, step = workdir_lib.load_params(config_lib.WORKDIR.value)
    if _PROMPT_IDS.value:
      tokenizer = None
      prompts = [[int(t) for t in ids.split(',') if t] for ids in _PROMPT_IDS.value]
      stops, pad = (), 0
    else:
      tokenizer = tokenizer_lib.get(config.data.tokenizer)
      prompts = [tokenizer.encode(p).tolist() for p in _PROMPTS.value]
      stops, pad = (tokenizer.eos_id,), tokenizer.pad_id
    sampling = decode.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                     top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=stops,
                                     pad_id=pad)
    outputs = decode.generate(decoder.build(config.model), params, prompts, sampling,
                              rng=jax.random.key(_SEED.value))
  except (ValueError, checkpoint_lib.CheckpointError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'# {config_lib.WORKDIR.value}, step {step}', file=sys.stderr)
  for prompt, ids in zip(_PROMPTS.value or _PROMPT_IDS.value, outputs):
    print(prompt + tokenizer.decode(ids) if tokenizer else ','.join(map(str, ids)))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
