"""Tests run on CPU with 8 simulated devices; the flag must be set before jax is imported."""

import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest  # noqa: E402

from research.config import load_config_file  # noqa: E402


@pytest.fixture
def decoder_config():
  """Returns a function variant -> a fresh locked decoder config."""
  return lambda variant='tiny': load_config_file(os.path.join(REPO, 'configs', 'decoder.py') +
                                                 f':{variant}')
