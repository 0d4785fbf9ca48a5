#!/usr/bin/env bash
# Run one command against a fresh local SLURM cluster, then stop every daemon it started, whatever happens.
#
#   slurm/with_cluster.sh CMD [ARGS...]
#   e.g. slurm/with_cluster.sh .venv/bin/python -m pytest -q tests/test_slurm.py
#
# Starts the cluster (slurm/local_cluster.sh) in a new temporary STATE_DIR, exports SLURM_CONF (from env.sh) and
# HPCKD_SLURM_STATE=STATE_DIR, runs CMD, and always stops the daemons it recorded (trap on EXIT, HUP, INT, TERM), even
# when CMD or the start fails. Exits with CMD's status. The STATE_DIR (configs, logs, database) is deleted
# afterwards unless CMD failed or HPCKD_SLURM_KEEP=1; then its path is printed so the logs can be read.
set -uo pipefail

if (($# == 0)); then
    echo "usage: $0 CMD [ARGS...]   (runs CMD against a fresh local SLURM cluster)" >&2
    exit 2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# Sourcing (rather than running) local_cluster.sh makes the daemons children of this shell, so it reaps them.
# shellcheck source=slurm/local_cluster.sh
source "$HERE/local_cluster.sh"

STATE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/hpckd-slurm.XXXXXX")" || {
    echo "[with_cluster.sh] ERROR: cannot create a temporary folder" >&2
    exit 1
}
CMD_STATUS=1

cleanup() {
    trap - EXIT HUP INT TERM
    set +e
    cluster_stop "$STATE_DIR"
    if [[ "$CMD_STATUS" == 0 && "${HPCKD_SLURM_KEEP:-0}" != 1 ]]; then
        rm -rf "$STATE_DIR"
    else
        echo "[with_cluster.sh] cluster state and logs kept in $STATE_DIR" >&2
    fi
    exit "$CMD_STATUS"
}
trap cleanup EXIT
# CMD runs in the foreground (it keeps the terminal, and Ctrl-C reaches it); bash runs these traps once it ends.
trap 'CMD_STATUS=129; exit 129' HUP
trap 'CMD_STATUS=130; exit 130' INT
trap 'CMD_STATUS=143; exit 143' TERM

# Any failure while starting aborts (the EXIT trap then stops what did start).
set -e
cluster_start "$STATE_DIR"
# shellcheck disable=SC1091
source "$STATE_DIR/env.sh"
set +e
export HPCKD_SLURM_STATE="$STATE_DIR"

"$@"
CMD_STATUS=$?
exit "$CMD_STATUS"
