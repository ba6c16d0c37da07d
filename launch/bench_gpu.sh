#!/usr/bin/env bash
# Throughput of the four benchmark configs (configs/bench.py) and the attention backends'
# equivalence tests on one GPU machine without network, in under 8 minutes.
#
#   launch/bench_gpu.sh wheels        (with network) the wheels the GPU image lacks, into wheels/
#                                     (or BENCH_WHEELS), which `run` installs
#   launch/bench_gpu.sh run OUT_DIR   (on the GPU) install them, run the tests and the benchmarks
#
# The GPU image holds Python 3.12 with jax, flax, optax, orbax-checkpoint, numpy and pytest but
# not ml-collections, tensorflow-datasets, grain or array-record. `wheels` downloads those and
# every dependency the image does not already hold (found by resolving both sets for Python 3.12
# on manylinux x86_64), builds the one that publishes no wheel (promise), and leaves out pyarrow
# (about 45 MB; only Parquet sources read it), so that wheels/ stays small enough to travel with
# the working tree. `run` installs them with --no-deps into a folder on PYTHONPATH (the image's
# packages, its jax among them, stay as they are), then writes into OUT_DIR: environment.txt
# (nvidia-smi, the jax devices), attention.log and attention.xml (pytest tests/test_attention.py
# -m "not slow" -k "not mesh": every kernel the GPU runs against the textbook form; the mesh
# tests want 8 devices and run on CPU in CI), <config>.log per benchmark, results.jsonl (one line
# per benchmark, research.bench train), table.md (research.bench table) and profile_<config>/
# (a jax.profiler trace of BENCH_PROFILE_STEPS (2) more steps and profile.md, the time of each
# pass and model scope; BENCH_PROFILE=0: none). PYTHON names the Python to use (default python3).
#
# Time budget of `run`: BENCH_BUDGET (460 s) from its start to its end, the table included; every
# part's limit below is cut to what the budget leaves (less 25 s: the 10 s in which a process
# that ignores SIGTERM is killed, and the table), and a part with under 15 s left is skipped,
# named. Installing and listing devices take under a minute; the tests stop after
# BENCH_TEST_TIMEOUT (120 s); llama_1b_2048 after 100 s and each other benchmark after
# BENCH_TIMEOUT (70 s): start-up, initialisation and compilation take most of that, BENCH_STEPS
# (40) timed steps after 3 warm-up steps take 5-15 s at the expected rates, and the profile's
# steps and its trace come last (a limit that cuts them short leaves the figures in place).
# BENCH_CONFIGS (configs/bench.py names, or FILE:VARIANT), BENCH_OVERRIDES (more flags of
# research.bench: --config.key=value ...), BENCH_STEPS and BENCH_WARMUP shrink a run, for a check
# on CPU; BENCH_TESTS=0 skips the tests, BENCH_PROFILE=0 the profiles.
set -euo pipefail
help_text() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
usage() { help_text >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 2; }
commands="'launch/bench_gpu.sh wheels' (with network) or 'launch/bench_gpu.sh run OUT_DIR'"
commands+=" (on the GPU)"

[[ $# -ge 1 ]] || usage
case $1 in -h|-help|--help|help) help_text; exit 0 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
wheels=${BENCH_WHEELS:-$root/wheels}
# What the four need beyond the image, at the project's own ranges (requirements.txt).
needed=('ml-collections>=1.0,<2' 'tensorflow-datasets>=4.9.9,<5' 'array-record>=0.8,<0.9'
        'grain>=0.2.12,<0.3')
image=('jax==0.11.2' flax optax orbax-checkpoint numpy pytest)
target=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
left_out='pyarrow'
python=${PYTHON:-python3}  # `wheels`: any Python with pip; `run`: the image's.
command -v "$python" > /dev/null \
  || fail "PYTHON=$python is not a Python here; set PYTHON to one (the default is python3)."

resolve() {  # resolve REPORT REQUIREMENT...: what pip would install for Python 3.12 (no download).
  local report=$1; shift
  "$python" -m pip install --quiet --dry-run --ignore-installed --find-links "$fresh" \
    --report "$report" "${target[@]}" --target "$scratch/target" "$@"
}

names() {  # names REPORT: the "name==version" of each package in a pip report, one a line.
  "$python" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
  name, version = item["metadata"]["name"], item["metadata"]["version"]
  print(name.lower().replace("_", "-") + "==" + version)' "$1"
}

case $1 in
  wheels)
    [[ $# -eq 1 ]] || fail "wheels takes no arguments; run $commands."
    scratch=$(mktemp -d); trap 'rm -rf "$scratch" "${fresh:-}"' EXIT
    # Downloaded beside wheels/ (one file system: renames), and put in its place only once
    # complete: a failed download leaves the wheels already there.
    mkdir -p "$(dirname "$wheels")"
    fresh=$(mktemp -d "$wheels.new.XXXXXX")
    # promise (a dependency of tensorflow-datasets) is published as source only: build its wheel.
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$fresh" 'promise==2.3'
    resolve "$scratch/image.json" "${image[@]}"
    resolve "$scratch/all.json" "${image[@]}" "${needed[@]}"
    names "$scratch/image.json" | sed 's/==.*//' > "$scratch/image.txt"
    names "$scratch/all.json" | while IFS= read -r pinned; do
      name=${pinned%%==*}
      if grep -q -x -F "$name" "$scratch/image.txt" || [[ $name == "$left_out" ]] \
          || [[ $name == promise ]]; then
        continue
      fi
      echo "$pinned"
    done > "$scratch/missing.txt"
    "$python" -m pip download --quiet --no-deps --dest "$fresh" "${target[@]}" \
      -r "$scratch/missing.txt"
    old=$(mktemp -d "$wheels.old.XXXXXX")  # Kept should the last rename fail.
    if [[ -d $wheels ]]; then mv "$wheels" "$old/"; fi
    mv "$fresh" "$wheels"
    rm -rf "$old"
    ls "$wheels"
    du -sh "$wheels" | awk '{print "wheels/: " $1}' ;;
  run)
    [[ $# -eq 2 ]] || fail "run takes one argument, the folder for the results; run $commands."
    [[ ! -e $2 || -d $2 ]] || fail "$2 is a file; pass a folder for the results."
    for setting in BENCH_BUDGET BENCH_TIMEOUT BENCH_LLAMA_TIMEOUT BENCH_TEST_TIMEOUT BENCH_STEPS \
        BENCH_WARMUP BENCH_PROFILE_STEPS; do
      [[ -z ${!setting:-} || ${!setting} =~ ^(0|[1-9][0-9]*)$ ]] \
        || fail "$setting=${!setting} is not a whole number of seconds or steps; give one."
    done
    budget_end=$((SECONDS + ${BENCH_BUDGET:-460}))
    within() {  # within LIMIT: LIMIT seconds, or fewer where the budget leaves fewer.
      local left=$((budget_end - SECONDS - 25))
      ((left > 1)) || left=1
      echo $(($1 < left ? $1 : left))
    }
    out=$(mkdir -p "$2" 2> /dev/null && cd "$2" && pwd) \
      || fail "cannot make the folder $2; pass one that can be written."
    cd "$root"
    # Only what the image lacks, beside it (--no-deps: nothing of the image is replaced); a
    # Python without pip gets the wheels unpacked, which is all that installing them does here.
    if ! "$python" -c 'import ml_collections, grain, array_record, tensorflow_datasets' 2> /dev/null
    then
      ls "$wheels"/*.whl > /dev/null 2>&1 \
        || fail "no wheels in $wheels; run 'launch/bench_gpu.sh wheels' with network first."
      site=${BENCH_SITE:-/tmp/bench_site}
      mkdir -p "$site"
      "$python" -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl \
        || "$python" -c 'import sys, zipfile
for wheel in sys.argv[2:]:
  zipfile.ZipFile(wheel).extractall(sys.argv[1])' "$site" "$wheels"/*.whl
      export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    {
      date -u; nvidia-smi || echo 'nvidia-smi: not available'
      "$python" -c 'import jax; print("jax", jax.__version__, jax.devices())' \
        || echo "jax: does not start (exit $?)"
    } > "$out/environment.txt" 2>&1
    cat "$out/environment.txt"
    if [[ ${BENCH_TESTS:-1} != 0 ]]; then
      # The tests pick the CPU unless JAX_PLATFORMS names the backend (tests/conftest.py).
      platform=$("$python" -c 'import jax; print(jax.default_backend())') \
        || fail "jax does not start; see $out/environment.txt."
      JAX_PLATFORMS=$platform timeout -k 10 "$(within "${BENCH_TEST_TIMEOUT:-120}")" \
        "$python" -m pytest -q \
        tests/test_attention.py -m 'not slow' -k 'not mesh' --junitxml "$out/attention.xml" \
        > "$out/attention.log" 2>&1 || echo "attention tests: failed or timed out (exit $?)"
      tail -n 3 "$out/attention.log"
    fi
    all='llama_1b_2048 gpt2_small_1024 bert_base_512 t5_1_1_base_512'
    read -r -a configs <<< "${BENCH_CONFIGS:-$all}"
    read -r -a overrides <<< "${BENCH_OVERRIDES:-}"
    for config in "${configs[@]}"; do
      [[ $config == *:* ]] || config=configs/bench.py:$config
      name=${config##*:}
      limit=${BENCH_TIMEOUT:-70}
      [[ $name != llama_1b_2048 ]] || limit=${BENCH_LLAMA_TIMEOUT:-100}
      limit=$(within "$limit")
      if ((limit < 15)); then
        echo "$name: skipped, the ${BENCH_BUDGET:-460} s budget is spent."
        continue
      fi
      profile=()
      if [[ ${BENCH_PROFILE:-1} != 0 ]]; then
        profile=(--profile_dir "$out/profile_$name" --profile_steps "${BENCH_PROFILE_STEPS:-2}")
      fi
      # The figures are printed and recorded before the profile, which the limit may cut short.
      timeout -k 10 "$limit" "$python" -m research.bench train --config "$config" \
        --steps "${BENCH_STEPS:-40}" --windows 4 --warmup_steps "${BENCH_WARMUP:-3}" \
        --results "$out/results.jsonl" "${profile[@]}" "${overrides[@]}" > "$out/$name.log" 2>&1 \
        || echo "$name: failed or timed out after ${limit} s (exit $?); see $name.log"
      grep -E '^ *(mfu|tokens_per_s_per_device|compile_s):' "$out/$name.log" || true
    done
    if [[ -s $out/results.jsonl ]]; then
      "$python" -m research.bench table --results "$out/results.jsonl" --markdown "$out/table.md"
      cat "$out/table.md"
    else
      echo 'no benchmark finished: no table.'
    fi ;;
  *) fail "unknown command '$1'; run $commands." ;;
esac
