"""Generate text from a trained (or converted) model.

  python -m research.sample --workdir DIR --prompt "def " [--prompt "class "] \
      [--max_new_tokens 200 --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0]
  python -m research.sample --workdir DIR --prompt_ids 15496,11 ...   (token ids in and out)
  python -m research.sample --workdir T5_DIR --input "translate: abc" [--num_beams 4 \
      --length_penalty 0.6]   (an encoder-decoder answers its inputs)
  python -m research.sample --workdir DIR --prompt "def " --mesh fsdp=-1   (parameters sharded
      over every device: a model larger than one device)

Text goes through the tokenizer saved in DIR/tokenizer (a model converted from Hugging Face brings
its tokenizer.json there), else through the run's data.tokenizer.

Every input is checked before the checkpoint is read; a bad one stops with one sentence.
"""

import os
import sys

import jax
from absl import flags

from research import cli
from research import config as config_lib
from research import decode
from research import hf
from research import mesh as mesh_lib
from research import workdir as workdir_lib
from research.data import tokenizer as tokenizer_lib

_PROMPTS = flags.DEFINE_multi_string('prompt', [], 'Prompt text to continue (decoders; repeat for '
                                     'a batch).')
_INPUTS = flags.DEFINE_multi_string('input', [], 'Input text to answer (encoder-decoders; repeat '
                                    'for a batch).')
_PROMPT_IDS = flags.DEFINE_multi_string('prompt_ids', [], 'Comma-separated token ids (repeatable).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 decodes greedily.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Keep the smallest set with this probability mass.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed, in [0, 2**32).')
_NUM_BEAMS = flags.DEFINE_integer('num_beams', 0, 'Beam search with this many beams (0: greedy '
                                  'or sampled decoding).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 1.0, 'Beam search: finished beams score '
                                     'log p / length ** this.')
_FLAG_NAMES = ('workdir', 'prompt', 'input', 'prompt_ids', 'max_new_tokens', 'temperature',
               'top_k', 'top_p', 'seed', 'num_beams', 'length_penalty', 'mesh', 'cpu_devices')


def parse_ids(text):
  try:
    return [int(t) for t in text.split(',')]
  except ValueError:
    raise ValueError(f'--prompt_ids {text!r} is not a comma-separated list of integer token ids '
                     '(e.g. 15496,11).') from None


def _tokenizer(workdir, config):
  """The run's saved tokenizer, else config.data.tokenizer."""
  saved = workdir_lib.saved_tokenizer(workdir)
  if saved is None and hf.read_source(workdir) is not None:
    # Its data.tokenizer is our default, not the model's.
    raise ValueError(f'{workdir} was converted from Hugging Face, whose tokenizer is not ours, '
                     'from a directory without a tokenizer.json; pass token ids with --prompt_ids '
                     'or convert again from a directory that has one.')
  return saved if saved is not None else workdir_lib.tokenizer(workdir, config)


def _mesh(config, family):
  """The --mesh over every device; its tensor axis must divide the model's heads."""
  sizes = mesh_lib.resolve_shape(mesh_lib.parse_sizes(mesh_lib.MESH_FLAG.value), {},
                                 jax.device_count(), 1)
  config_lib.check_tensor_axis(family, config.model, sizes[mesh_lib.TENSOR])
  return mesh_lib.make_mesh(sizes)


def main(argv):
  try:
    config_lib.parse_command_flags(argv, __doc__, _FLAG_NAMES)
    mesh_lib.configure_cpu_devices()
    mesh_lib.initialize_distributed()  # A model sharded over several hosts samples on all.
    workdir = config_lib.WORKDIR.value
    texts = _PROMPTS.value + _INPUTS.value
    if not workdir or bool(texts) == bool(_PROMPT_IDS.value) or (_PROMPTS.value and _INPUTS.value):
      raise ValueError('Pass --workdir and one of --prompt (text to continue), --input (text to '
                       'answer) or --prompt_ids (token ids), each repeatable for a batch.')
    if not os.path.isdir(workdir):
      raise ValueError(f'--workdir {workdir} is not a directory; pass the workdir of a training '
                       'run or of research.convert from_hf.')
    if not 0 <= _SEED.value < 2**32:  # jax keys hold 32 bits: larger seeds alias or overflow.
      raise ValueError(f'--seed={_SEED.value} must lie in [0, 2**32).')
    config = workdir_lib.load_config(workdir)
    family = workdir_lib.family(config)
    if not getattr(family, 'GENERATES_TEXT', False):
      raise ValueError(f'{workdir} holds a model.family={config.model.family!r} model, which '
                       'does not generate text; pass the workdir of a decoder or '
                       'encoder-decoder run.')
    answers = getattr(family, 'IS_ENCODER_DECODER', False)
    if _PROMPTS.value and answers or _INPUTS.value and not answers:
      raise ValueError(f'{workdir} holds a model.family={config.model.family!r} model, which '
                       + ('answers inputs; pass --input instead of --prompt.' if answers else
                          'continues prompts; pass --prompt instead of --input.'))
    tokenizer = None
    if _PROMPT_IDS.value:
      prompts = [parse_ids(ids) for ids in _PROMPT_IDS.value]
      stops, pad = (), 0
    else:
      tokenizer = _tokenizer(workdir, config)
      # An encoder-decoder's inputs end with EOS, as its training examples do.
      end = [tokenizer.eos_id] if answers and tokenizer.eos_id is not None else []
      prompts = [tokenizer.encode(p).tolist() + end for p in texts]
      stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
      pad = tokenizer_lib.filler_id(tokenizer)
    sampling = decode.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                     top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=stops,
                                     pad_id=pad, num_beams=_NUM_BEAMS.value,
                                     length_penalty=_LENGTH_PENALTY.value)
    # Before the checkpoint is read, so that a bad input costs no restore.
    decode.check_inputs(family.spec_from_config(config.model), prompts, sampling, answers)
    mesh = _mesh(config, family) if mesh_lib.MESH_FLAG.value else None
    config, params, step = workdir_lib.load_params(workdir, config, mesh)
    outputs = decode.generate(family.build(config.model), params, prompts, sampling,
                              rng=jax.random.key(_SEED.value), mesh=mesh)
  except ValueError as error:  # Includes CheckpointError and ConfigError.
    print(f'error: {error}', file=sys.stderr)
    return 2
  if jax.process_index() != 0:  # Every process sampled; one prints.
    return 0
  print(f'# {workdir}, step {step}', file=sys.stderr)
  for text, prompt_ids, ids in zip(texts or _PROMPT_IDS.value, prompts, outputs):
    if tokenizer is None:
      print(','.join(map(str, ids)))
    elif _INPUTS.value:
      print(tokenizer.decode(ids))
    else:
      print(text + tokenizer_lib.continuation_text(tokenizer, prompt_ids, ids))
  return 0


if __name__ == '__main__':
  cli.exit_on_interrupt('Interrupted; nothing was written.')
  sys.exit(main(sys.argv))
