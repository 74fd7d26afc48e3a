#!/usr/bin/env bash
# Create Mergeflow's work pools and tag concurrency limit, then deploy every deployment of
# deployments/prefect.yaml (merge-adapter and merge-adapters, each on gpu and cpu, and the
# watcher). Idempotent: rerun it after changing the YAML or the code's location.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/deploy.sh
#
# Environment (defaults in brackets):
#   PREFECT_API_URL            the server to deploy to (required)
#   MERGEFLOW_WATCH_LOCATION   folder or s3://bucket/prefix the watcher scans [~/mergeflow/adapters]
#   MERGEFLOW_OUT_ROOT         folder the watcher's merges are written under [~/mergeflow/merged]
#   MERGEFLOW_GPU_POOL_TYPE    type of the `gpu` pool: process (one machine) or kubernetes
#                              (uses deployments/work-pools/kubernetes-gpu.json) [process]
#   MERGEFLOW_GPU_SLOTS        concurrency limit of tasks tagged `gpu` [1]
#   PREFECT                    the prefect command [the one next to this repo's .venv, else PATH]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ -z "${PREFECT:-}" ]; then
  if [ -x "$repo/.venv/bin/prefect" ]; then PREFECT="$repo/.venv/bin/prefect"; else PREFECT=prefect; fi
fi
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server API, e.g. http://127.0.0.1:4200/api}"
export PREFECT_API_URL
export MERGEFLOW_WATCH_LOCATION=${MERGEFLOW_WATCH_LOCATION:-$HOME/mergeflow/adapters}
export MERGEFLOW_OUT_ROOT=${MERGEFLOW_OUT_ROOT:-$HOME/mergeflow/merged}
gpu_type=${MERGEFLOW_GPU_POOL_TYPE:-process}

# Pools: `--overwrite` keeps a rerun from failing and updates a changed template.
if [ "$gpu_type" = kubernetes ]; then
  "$PREFECT" work-pool create gpu --type kubernetes --overwrite \
    --base-job-template deployments/work-pools/kubernetes-gpu.json
else
  "$PREFECT" work-pool create gpu --type "$gpu_type" --overwrite
fi
"$PREFECT" work-pool create cpu --type process --overwrite

# Tasks tagged `gpu` (merge groups of a device=cuda run) hold one slot each.
"$PREFECT" concurrency-limit delete gpu >/dev/null 2>&1 || true
"$PREFECT" concurrency-limit create gpu "${MERGEFLOW_GPU_SLOTS:-1}"

"$PREFECT" deploy --no-prompt --all --prefect-file deployments/prefect.yaml

# A run's `spec` is layered over the deployment's default spec (flows/parameters.py): give only
# what changes. These commands work as printed once the paths are real:
cat <<'USAGE'

Start a merge (the deployment's default spec fills in the rest: device, workers, ...):
  prefect deployment run merge-adapter/merge-adapter-cpu --param spec='{"adapter": "/path/to/adapter", "out": "/path/to/merged"}'
  prefect deployment run merge-adapter/merge-adapter --param spec='{"adapter": "/path/to/adapter", "out": "/path/to/merged"}'

Several adapters of one base in one sweep over it, each into <out>/<name>:
  prefect deployment run merge-adapters/merge-adapters --param adapters='["/path/to/ckpt-1", "/path/to/ckpt-2"]' --param spec='{"out": "/path/to/merged"}'
USAGE
