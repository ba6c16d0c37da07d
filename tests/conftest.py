"""Tests run on CPU with 8 simulated devices; the flag must be set before jax is imported."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most tests run the command lines in subprocesses with the same few shapes: a persistent
# compilation cache (inherited through the environment) halves each run's time after the first.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(REPO, '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402
import pytest  # noqa: E402

from research import host_memory  # noqa: E402
from research.config import load_config_file  # noqa: E402

# As the command lines do: a step's temporaries are reused, not faulted in again on every call.
host_memory.reuse_freed_memory()


def pytest_configure():
  """Tests that run in this process compile far more than they run: LLVM's cheapest level
  halves their compile time. XLA reads XLA_FLAGS once, when the backend starts, so the flag is set
  for that moment only; the command lines under test, which train for many steps, still inherit
  the optimising flags. The persistent cache keys on the XLA_FLAGS of the moment of compilation,
  so this process keeps its unoptimised programs in a cache of their own."""
  flags = os.environ['XLA_FLAGS']
  os.environ['XLA_FLAGS'] = flags + ' --xla_backend_optimization_level=0'
  jax.devices()
  os.environ['XLA_FLAGS'] = flags
  jax.config.update('jax_compilation_cache_dir',
                    os.environ['JAX_COMPILATION_CACHE_DIR'] + '-unoptimised')


def _fast(config):
  """Unit tests train on the in-memory synthetic source, without checkpoints or samples."""
  config.data.source = 'markov'
  config.train.sample_tokens = 0
  return config


@pytest.fixture
def decoder_config():
  """Returns a function variant -> a fresh locked decoder config (synthetic data)."""
  path = os.path.join(REPO, 'configs', 'decoder.py')
  return lambda variant='tiny': _fast(load_config_file(f'{path}:{variant}'))


# The longest test files first: the two parallel workers take files in collection order, so
# the short ones then fill in at the end instead of one worker finishing a long file alone.
_LONGEST_FIRST = ('test_multiprocess.py', 'test_checkpoint.py', 'test_train_cli.py',
                  'test_finetune.py', 'test_encoder_decoder.py', 'test_sharding.py',
                  'test_encoder_decoder_cli.py', 'test_seq2seq.py', 'test_t5_convert.py',
                  'test_encoder_cli.py', 'test_distill.py', 'test_rnn_seq2seq.py',
                  'test_word_vectors.py', 'test_mlm.py', 'test_rnn.py', 'test_ngram.py',
                  'test_run_control.py', 'test_bench.py', 'test_decode.py', 'test_remat_scan.py',
                  'test_plan.py', 'test_convert_cli.py', 'test_layout.py', 'test_warm_start.py',
                  'test_train_step.py', 'test_data.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable within a file.
