#!/usr/bin/env bash
# A TPU VM slice through `gcloud compute tpus`: create it, install this project on every worker,
# train on all workers, stream the logs, delete it.
#
#   launch/tpu_pod.sh ACTION --name NAME --zone ZONE [options] [-- --config.key=value ...]
#   ACTION: create | setup | run | status | logs | delete
#   --type v5p-64          accelerator type (create)       --version RUNTIME  TPU software (create)
#   --spot                 spot capacity (create)          --queued           a queued resource
#   --project PROJECT      gcloud project                  --bucket BUCKET    GCS bucket (setup)
#   --config FILE:VARIANT  and --run NAME (run): the workdir is /mnt/BUCKET/runs/NAME, the bucket
#                          mounted on every worker by `setup` (checkpoints survive the slice)
#   --dry_run              print the commands instead of running them
#
# Every worker runs `python -m research.train` with RESEARCH_CLUSTER=tpu_pod, which joins them
# through jax.distributed; SIGTERM (preemption, maintenance) saves a checkpoint on all of them.
# `run` returns once the job has started in the background; `status` prints each worker's state
# (running, or the exit status it ended with) and fails if any worker's job failed or never ran.
set -euo pipefail
header() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
usage() { header >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || usage
case $1 in -h|-help|--help|help) header; exit 0 ;; esac
action=$1; shift
name='' zone='' type='v5p-8' version='v2-alpha-tpuv5' spot=0 queued=0 project='' bucket=''
config='' run='' dry_run=0 overrides=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name|--zone|--type|--version|--project|--bucket|--config|--run)
      [[ $# -ge 2 ]] || fail "$1 needs a value."
      declare "${1#--}=$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; overrides=("$@")
        for override in "${overrides[@]}"; do  # It would reach research.train, and gcloud run.
          [[ $override != --dry_run ]] || fail "--dry_run goes before --; what follows -- is \
passed to research.train."
        done
        break ;;
    *) fail "unknown option $1; launch/tpu_pod.sh --help lists the options." ;;
  esac
done
[[ -n $name && -n $zone ]] || fail "pass --name and --zone."

run_cmd() {  # Prints the command (quoted as a shell would need it), then runs it unless dry.
  printf '%q ' "$@" | sed 's/ $/\n/'
  [[ $dry_run == 1 ]] || "$@"
}
common=(--zone "$zone")
[[ -z $project ]] || common+=(--project "$project")
on_all() {  # Runs its arguments on every worker, one after another while each succeeds.
  local remote=$1; shift
  for step in "$@"; do remote+=" && $step"; done
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$remote"
}
repo=research
# A worker's job, in one line that names the worker; false where it failed or never started, so
# that gcloud, and this script, fail too. `run` leaves the job's shell's pid in ~/train.pid and
# its exit status in ~/train.exit.
worker_status='if [ -f ~/train.exit ]; then code=$(cat ~/train.exit);'
worker_status+=' echo "$(hostname): research.train exited with status $code"; [ "$code" = 0 ];'
# (A process state from ps, not kill -0, which a killed job's unreaped zombie would pass.)
worker_status+=' elif [ -f ~/train.pid ]; then state=$(ps -o stat= -p "$(cat ~/train.pid)");'
worker_status+=' if [ -n "$state" ] && [ "${state#Z}" = "$state" ];'
worker_status+=' then echo "$(hostname): research.train is running";'
worker_status+=' else echo "$(hostname): research.train ended without an exit status (killed)";'
worker_status+=' false; fi; else echo "$(hostname): research.train has not run here"; false; fi'

case $action in
  create)
    extra=(); [[ $spot == 0 ]] || extra+=(--spot)
    if [[ $queued == 1 ]]; then
      run_cmd gcloud compute tpus queued-resources create "$name" --node-id "$name" "${common[@]}" \
        --accelerator-type "$type" --runtime-version "$version" "${extra[@]}"
    else
      run_cmd gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" \
        --version "$version" "${extra[@]}"
    fi ;;
  setup)
    [[ -n $bucket ]] || fail "setup needs --bucket (where checkpoints are kept)."
    archive=/tmp/$repo.tar.gz
    run_cmd git -C "$(dirname "$0")/.." archive --format=tar.gz --prefix="$repo/" -o "$archive" HEAD
    run_cmd gcloud compute tpus tpu-vm scp "$archive" "$name:~/" "${common[@]}" --worker=all
    on_all "rm -rf ~/$repo" "tar xzf ~/$repo.tar.gz -C ~" "cd ~/$repo" \
      "python3 -m pip install -q -r requirements.txt 'jax[tpu]'" \
      "python3 -m pip install -q --no-deps -e ." "sudo mkdir -p /mnt/$bucket" \
      "sudo chmod 777 /mnt/$bucket" \
      "(mountpoint -q /mnt/$bucket || gcsfuse --implicit-dirs $bucket /mnt/$bucket)" ;;
  run)
    [[ -n $config && -n $run && -n $bucket ]] || fail "run needs --config, --run and --bucket."
    # Every word quoted for the workers' shell, so that a name with spaces stays one argument.
    train=(python3 -m research.train --config "$config" --workdir "/mnt/$bucket/runs/$run"
           --config.train.progress_bar=False "${overrides[@]+"${overrides[@]}"}")
    # In a shell of its own, which nohup keeps alive after the ssh session ends, and which outlives
    # a SIGTERM (preemption) to record the status of a trainer that saved and stopped; the status
    # file appears whole, or not at all.
    job="trap : TERM; echo \$\$ > ~/train.pid; $(printf '%q ' "${train[@]}")> ~/train.log 2>&1;"
    job+=" echo \$? > ~/train.exit.tmp && mv ~/train.exit.tmp ~/train.exit"
    # Only the job goes to the background (`a && b &` would put the whole list there, holding
    # the ssh session's output open until the job ends), its input and output away from ssh.
    on_all "cd ~/$repo" "rm -f ~/train.exit ~/train.pid" \
      "{ RESEARCH_CLUSTER=tpu_pod nohup bash -c $(printf '%q' "$job") < /dev/null > /dev/null \
2>&1 & }" ;;
  status)
    on_all "$worker_status" ;;
  logs)
    on_all 'tail -n 50 -f ~/train.log' ;;
  delete)
    if [[ $queued == 1 ]]; then
      run_cmd gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    else
      run_cmd gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
    fi ;;
  *) fail "unknown action $action; use create, setup, run, status, logs or delete." ;;
esac
