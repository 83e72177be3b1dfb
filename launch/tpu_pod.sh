#!/usr/bin/env bash
# Run J-BOND on a Cloud TPU VM pod: create the pod, copy this repository to every worker and install it,
# run bond_jax.train on all workers at once (jax.distributed.initialize() finds the pod by itself), then
# delete the pod. See launch/README.md.
#
#   launch/tpu_pod.sh --name=bond-v5p --zone=us-east5-a --accelerator=v5p-128 \
#       --config=configs/dialogue.py:gemma_7b --workdir=gs://BUCKET/runs/gemma_7b [--dry-run] \
#       [--runtime=VERSION] [--project=P] [--steps=create,setup,run,delete] [--spot] -- [extra train flags]
#
# --dry-run prints every command (one per line, prefixed with '+ ') instead of running it.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "error: $*" >&2; exit 2; }

name="" zone="" accelerator="" runtime="" config="" workdir="" project="" dry_run=0 spot=0
steps="create,setup,run,delete"
extra=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --steps=*) steps="${1#*=}" ;;
    --spot) spot=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1'; see --help" ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$accelerator" ]] || die "--accelerator is required (v4-32, v5e-16 = v5litepod-16, v5p-128, v6e-16 ...)"
[[ -n "$config" ]] || die "--config is required (e.g. configs/dialogue.py:gemma_2b)"
[[ "$workdir" == gs://* ]] || die "--workdir='$workdir' must be a gs:// path (every worker writes there)"

# v5e-N is the user-facing name; the API calls it v5litepod-N.
case "$accelerator" in
  v5e-*) accelerator="v5litepod-${accelerator#v5e-}" ;;
esac
if [[ -z "$runtime" ]]; then
  case "$accelerator" in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5litepod-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "--accelerator='$accelerator' is not known; allowed: v4-N, v5e-N (v5litepod-N), v5p-N, v6e-N" ;;
  esac
fi

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tarball="/tmp/${name}-bond_jax.tgz"

run() {
  if ((dry_run)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"; }

train_cmd="cd ~/bond_jax && python3 -m bond_jax.train --config=$(printf '%q' "$config")"
train_cmd+=" --workdir=$(printf '%q' "$workdir") --distributed=auto"
for flag in "${extra[@]}"; do train_cmd+=" $(printf '%q' "$flag")"; done

IFS=',' read -r -a step_list <<< "$steps"
for step in "${step_list[@]}"; do
  case "$step" in
    create)
      create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accelerator"
              --version="$runtime")
      ((spot)) && create+=(--spot)
      run "${create[@]}" ;;
    setup)
      run tar -czf "$tarball" --exclude=.venv --exclude=.git --exclude=runs -C "$repo_root" .
      run gcloud compute tpus tpu-vm scp "$tarball" "$name:bond_jax.tgz" "${common[@]}" --worker=all
      ssh_all "mkdir -p ~/bond_jax && tar -xzf ~/bond_jax.tgz -C ~/bond_jax && cd ~/bond_jax && \
python3 -m pip install -q -e . 'jax[tpu]==0.10.2'" ;;
    run) ssh_all "$train_cmd" ;;
    delete) run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet ;;
    *) die "--steps entry '$step' is not known; allowed: create, setup, run, delete" ;;
  esac
done
