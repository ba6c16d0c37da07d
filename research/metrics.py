"""Device peaks, MFU and metric writers (TensorBoard, JSONL, console progress bar).

MFU = achieved model FLOPs/s / device peak FLOPs/s. Model FLOPs per token come from the run's
family and objective (research/models, research/objectives): training = 3x forward, a
multiply-add = 2 FLOPs, every matrix product counted where it is applied, attention full or
causal as the family computes it, and nothing that remat recomputes. The peak is published per
accelerator and compute dtype, and measured on CPU (device_peak).
"""

import contextlib
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Published dense peaks per chip in FLOP/s, by (device-kind substring, compute dtype); the first
# entry whose substring the device's kind holds decides. The PCIe H100 runs at three quarters of
# the SXM part; the NVL cards' per-GPU figures differ between NVIDIA's datasheets, so they get no
# peak (MFU "no peak known") rather than the SXM part's. Every other H100 or H200 kind
# ("NVIDIA H100 80GB HBM3", "NVIDIA H200") is the SXM part.
_PUBLISHED_PEAKS = (
    ('H100 PCIe', 'bfloat16', 756e12), ('H100 PCIe', 'float32', 51e12),
    ('NVL', 'bfloat16', None), ('NVL', 'float32', None),
    ('H200', 'bfloat16', 989e12), ('H100', 'bfloat16', 989e12),
    ('H200', 'float32', 67e12), ('H100', 'float32', 67e12),
    ('A100', 'bfloat16', 312e12), ('A100', 'float32', 19.5e12),
    ('TPU v6', 'bfloat16', 918e12), ('TPU v5p', 'bfloat16', 459e12),
    ('TPU v5 lite', 'bfloat16', 197e12), ('TPU v5e', 'bfloat16', 197e12),
    ('TPU v4', 'bfloat16', 275e12),
)


# Square sizes whose products measure a CPU's peak. XLA:CPU runs mid-sized products fastest: a
# 2048 x 2048 one no longer fits the caches and runs at two thirds of a 1024 one's rate on a
# 2-core machine, and a model's products are of that middle size, so a peak measured at 2048
# alone read too low and put MFU above 1. The best over several sizes, each the least disturbed
# of several repeats (other processes share the cores), comes as close to the machine's peak as
# a cheap measurement can: about a second, compilation included, once per process and dtype.
# The model's own products can still beat it while other processes leave the cores idle, so a
# CPU MFU near 1 says "as fast as a plain matmul", not more.
CPU_PEAK_SIZES = (256, 512, 1024)
CPU_PEAK_REPEATS = 5

_measured_peaks = {}


def _square_product(dtype_name):
  """size -> a function that computes one size x size product in `dtype_name` and waits for it."""
  product = jax.jit(lambda x: x @ x)

  def at(size):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype_name)
    return lambda: product(a).block_until_ready()
  return at


def best_matmul_rate(product, sizes, repeats, clock=time.perf_counter):
  """FLOP/s (2 n^3 per n x n product) of the fastest run over `sizes`: each size is run once
  untimed (compilation, caches), then `repeats` times, of which the fastest counts.
  `product(size)` returns a function that runs one product to completion."""
  best = 0.0
  for size in sizes:
    run = product(size)
    run()
    fastest = float('inf')
    for _ in range(repeats):
      start = clock()
      run()
      fastest = min(fastest, clock() - start)
    best = max(best, 2 * size ** 3 / max(fastest, 1e-12))
  return best


def measured_matmul_peak(dtype_name='float32'):
  """FLOP/s of the default device's fastest matrix product in `dtype_name` (measured once per
  process and dtype; used for CPUs, which publish no peak)."""
  if dtype_name not in _measured_peaks:
    _measured_peaks[dtype_name] = best_matmul_rate(_square_product(dtype_name), CPU_PEAK_SIZES,
                                                   CPU_PEAK_REPEATS)
  return _measured_peaks[dtype_name]


def device_peak(dtype_name):
  """(peak FLOP/s per device, label) for the first local device, in compute dtype `dtype_name`.

  A CPU's peak is measured in that dtype with every core (XLA:CPU runs one product on all of
  them); simulated CPU devices share the cores, so each gets its share of the machine's peak.
  """
  device = jax.local_devices()[0]
  if device.platform == 'cpu':
    return (measured_matmul_peak(dtype_name) / jax.local_device_count(),
            f'measured {dtype_name} matmul peak')
  for kind, dtype, peak in _PUBLISHED_PEAKS:
    if kind in device.device_kind and dtype == dtype_name:
      if peak is None:
        break
      return peak, f'published {dtype} dense peak of {device.device_kind}'
  return None, f'unknown peak for {device.device_kind}'


def _summary_writer(logdir):
  """tensorboardX's SummaryWriter for `logdir`, imported without PyTorch where PyTorch is not
  yet loaded: tensorboardX imports it only to accept torch tensors (we write floats), and that
  import made a short run start 2.5 s later where torch is installed."""
  if 'tensorboardX' not in sys.modules and 'torch' not in sys.modules:
    sys.modules['torch'] = None  # `import torch` raises ImportError until removed again.
    try:
      import tensorboardX  # pylint: disable=unused-import
    finally:
      del sys.modules['torch']
  from tensorboardX import SummaryWriter
  return SummaryWriter(logdir)


class MetricWriter:
  """Writes scalars to <workdir>/metrics.jsonl and TensorBoard (tensorboardX, no TensorFlow)."""

  def __init__(self, workdir, tensorboard=True):
    self.is_writer = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if self.is_writer:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      if tensorboard:
        self._tb = _summary_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step, scalars):
    if not self.is_writer:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    # Strict JSON (no NaN or Infinity literals): a non-finite value is written as null.
    line = {k: v if math.isfinite(v) else None for k, v in scalars.items()}
    self._jsonl.write(json.dumps(dict(step=int(step), **line), allow_nan=False) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class Throughput:
  """Tokens/s, step time and MFU over the time since the last report, pauses excluded."""

  def __init__(self, flops_per_token, peak_flops_total):
    self.flops_per_token = flops_per_token
    self.peak = peak_flops_total
    self.reset()

  def reset(self):
    self.start = time.perf_counter()

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evaluation, saving) does not count as training time."""
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.start += time.perf_counter() - begin

  def report(self, steps, tokens):
    """`tokens`: real (non-padding) target tokens trained on in those `steps`."""
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    tokens_per_s = float(tokens) / elapsed
    result = dict(tokens_per_s=tokens_per_s, step_time_s=elapsed / max(steps, 1))
    if self.peak:
      result['mfu'] = tokens_per_s * self.flops_per_token / self.peak
    self.reset()
    return result
