#!/usr/bin/env bash
# Runs training on this machine.
#   launch/local.sh configs/decoder.py:tiny /tmp/tiny [--config.key=value ...]
# With NUM_PROCESSES=N (N > 1) it starts N cooperating processes on this machine (CPU, gloo
# collectives), each seeing LOCAL_DEVICES simulated devices: a rehearsal of a multi-host job.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
python=${PYTHON:-.venv/bin/python}
num_processes=${NUM_PROCESSES:-1}
if [[ "$num_processes" == 1 ]]; then
  exec "$python" -m research.train --config "$config" --workdir "$workdir" "$@"
fi
export RESEARCH_COORDINATOR=localhost:${PORT:-12355} RESEARCH_NUM_PROCESSES=$num_processes
export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES:-1}"
pids=()
for ((i = 0; i < num_processes; i++)); do
  RESEARCH_PROCESS_ID=$i "$python" -m research.train --config "$config" --workdir "$workdir" \
    --config.train.progress_bar=$([[ $i == 0 ]] && echo True || echo False) "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
