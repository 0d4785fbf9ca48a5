#!/usr/bin/env bash
# Launch with OpenMPI; ranks come from mpi4py's COMM_WORLD (local rank from a shared-memory split) and rank 0
# broadcasts the rendezvous address. Usage:
#   NP=2 launchers/mpirun.sh distill configs/quickstart.yaml
#   NP=2 MPIRUN_ARGS=--oversubscribe launchers/mpirun.sh dist-check --cpu   # more ranks than cores (laptops, CI)
# PYTHON picks the interpreter (default: python on PATH); MPIRUN_ARGS adds mpirun options.
set -euo pipefail
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
read -ra user_args <<<"${MPIRUN_ARGS:-}"
exec mpirun "${extra[@]}" "${user_args[@]}" -np "${NP:-2}" "${PYTHON:-python}" -m hpckd "$@"
