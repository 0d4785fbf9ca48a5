#!/usr/bin/env bash
# Launch with OpenMPI; ranks come from mpi4py's COMM_WORLD, rank 0 broadcasts the rendezvous address. Usage:
#   NP=2 launchers/mpirun.sh distill configs/quickstart.yaml
set -euo pipefail
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
exec mpirun "${extra[@]}" -np "${NP:-2}" python -m hpckd "$@"
