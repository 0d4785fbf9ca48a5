"""One ``init()`` for every launcher: torchrun, srun, mpirun (mpi4py) and submitit, or a plain single process.

Detection order: torchrun's RANK/WORLD_SIZE, then submitit (which runs under SLURM, or locally with SUBMITIT_*
variables), then SLURM srun (SLURM_PROCID/SLURM_NTASKS), then MPI (OMPI_/PMI_ variables; ranks come from
mpi4py's COMM_WORLD and rank 0's address is broadcast), else one process. The backend is NCCL on CUDA and gloo
on CPU. When SLURM binds one GPU per task (CUDA_VISIBLE_DEVICES holds one id), the device is ``cuda:0``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpckd.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_INFO = DistInfo()


def info() -> DistInfo:
    return _INFO


def detect_launcher(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SUBMITIT_EXECUTOR" in env or "SUBMITIT_LOCAL_JOB_ID" in env:
        return "submitit"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return "srun"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpirun"
    return "single"


def _ranks_from_env(launcher: str) -> tuple[int, int, int, int, str, int]:
    """(rank, world, local_rank, local_world, master_addr, master_port) for the launcher."""
    env = os.environ
    port = int(env.get("MASTER_PORT", "29500"))
    if launcher == "torchrun":
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", 1)), env.get("MASTER_ADDR", "127.0.0.1"), port)
    if launcher == "submitit":
        import submitit

        job_env = submitit.JobEnvironment()
        master = env.get("MASTER_ADDR") or _first_slurm_host() or "127.0.0.1"
        return (job_env.global_rank, job_env.num_tasks, job_env.local_rank, job_env.num_tasks // max(job_env.num_nodes, 1),
                master, int(env.get("MASTER_PORT", _port_from_job(str(job_env.job_id)))))
    if launcher == "srun":
        ntasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        master = env.get("MASTER_ADDR") or _first_slurm_host() or "127.0.0.1"
        return (int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", 0)), max(ntasks // nodes, 1),
                master, int(env.get("MASTER_PORT", _port_from_job(env.get("SLURM_JOB_ID", "0")))))
    if launcher == "mpirun":
        return _ranks_from_mpi(port)
    return 0, 1, 0, 1, "127.0.0.1", port


def _ranks_from_mpi(port: int) -> tuple[int, int, int, int, str, int]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched by mpirun but mpi4py is missing: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    # Rank 0 picks the rendezvous address and a free port, and tells everybody.
    addr, port = comm.bcast((os.environ.get("MASTER_ADDR") or _routable_hostname(), _free_port()) if comm.rank == 0 else None, root=0)
    return comm.rank, comm.size, local.rank, local.size, addr, port


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list without asking scontrol: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"``."""
    out, depth, picking = [], 0, True
    for ch in nodelist:
        if ch == "," and depth == 0:
            break  # end of the first host expression
        if ch == "[":
            depth, picking = 1, True
            continue
        if ch == "]":
            depth = 0
            continue
        if depth and (ch in ",-"):
            picking = False  # only the first number of the first range
        if not depth or picking:
            out.append(ch)
    return "".join(out)


def _port_from_job(job_id: str) -> int:
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return 20000 + int(digits[-4:]) % 20000


def _routable_hostname() -> str:
    host = socket.gethostname()
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def select_device(local_rank: int, want: str = "auto") -> torch.device:
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("dist.device=cuda but no CUDA device is visible")
    index = cuda_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cuda_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of a process: ``cuda:local_rank``, except when SLURM (``--gpus-per-task=1``, or
    ``CUDA_VISIBLE_DEVICES`` per task) lets each task see exactly one GPU: that GPU is ``cuda:0`` whatever the
    local rank."""
    if visible_devices < 1:
        raise UserError("no CUDA device is visible to this process")
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise UserError(f"local rank {local_rank} but only {visible_devices} CUDA devices are visible; "
                        f"start at most {visible_devices} processes per node")
    return local_rank


def init(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise torch.distributed from whatever launched us; idempotent; returns the :class:`DistInfo`."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        return _INFO
    launcher = detect_launcher()
    rank, world, local_rank, local_world, addr, port = _ranks_from_env(launcher)
    dev = select_device(local_rank, device)
    if world > 1:
        import datetime

        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", str(port))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    _INFO = DistInfo(rank, world, local_rank, local_world, launcher, dev)
    return _INFO


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none exists (DeepSpeed needs torch.distributed even for a single process)."""
    if dist.is_initialized():
        return
    port = int(os.environ.get("MASTER_PORT") or _free_port())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, **({"device_id": device} if device.type == "cuda" else {}))


_CONTROL_GROUP = None


def control_group():
    """A CPU (gloo) process group for small host-side agreements, such as "has any rank been asked to stop?";
    the default group when it already is gloo. Created once, by every rank; None when not distributed."""
    global _CONTROL_GROUP
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def max_across_ranks(values: list[int]) -> list[int]:
    """Element-wise maximum of small integers over all ranks (one tiny gloo all-reduce; no device sync)."""
    group = control_group()
    if group is None:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def shutdown() -> None:
    global _INFO, _CONTROL_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
