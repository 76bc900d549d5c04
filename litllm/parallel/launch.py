"""Starting the N processes of a tensor-parallel run, the way training starts its own.

- Alone (`litllm generate ... --devices 2`): the command is rank 0 and starts ranks 1..N-1 itself as
  `python -m litllm.parallel.worker` processes on this machine (Lightning Fabric's subprocess launcher
  does the same for training), with the rendezvous address in their environment.
- Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set) or Slurm's `srun` (SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID, MASTER_ADDR / MASTER_PORT from the job script): every process runs the command; rank 0
  goes on with it, the others become workers when the command loads its model (`litllm.parallel.runtime`).

A rank that dies takes the job down: rank 0 watches the ranks it started and exits with one line when one
does; the workers exit with one line when rank 0 goes (a broken connection or, at the latest, the process
group's timeout, `LITLLM_TP_TIMEOUT` seconds, default 120; rank 0 sends a heartbeat while idle). Compiling a decode
step is not bound by that timeout: the ranks that finish first wait for the others at the group's store
(`COMPILE_WAIT_S`), rank 0 sending no heartbeat meanwhile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch

from litllm.errors import LitLLMError


@dataclass
class Ranks:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    """This rank's device: `cpu` or `cuda:<local rank>`."""
    children: list = field(default_factory=list)
    """The worker processes rank 0 started itself (none under torchrun or srun)."""
    stopping: bool = False
    """Rank 0 is ending the run: a worker's exit is expected."""


def launcher_env() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) set by torchrun or srun, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and env.get("SLURM_JOB_NAME") != "bash":
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def is_launched_worker() -> bool:
    """This process is a rank > 0 that torchrun or srun started: it serves rank 0's steps, not users."""
    placed = launcher_env()
    return placed is not None and placed[0] != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timeout_s() -> float:
    return float(os.environ.get("LITLLM_TP_TIMEOUT", "120"))


COMPILE_WAIT_S = 3600.0
"""How long a rank that has built its compiled decode step waits for the others to build theirs
(`litllm.parallel.runtime.Channel.wait_for_peers`): each compiles its own, and under load they finish minutes apart.
A rank that dies meanwhile still ends the run at once (rank 0's watch; the workers lose the store rank 0 holds)."""


def start(devices: int, num_nodes: int, device_type: str) -> Ranks:
    """Join (or start, then join) the process group of a run on `devices` devices per node x `num_nodes` nodes."""
    import torch.distributed as dist

    world = devices * num_nodes
    if dist.is_initialized():
        raise LitLLMError(f"--devices {devices}: this process already belongs to a distributed run (one tensor-parallel "
                          f"model per process): load the other model in another process")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise LitLLMError(f"--devices {devices}: CUDA is not available on this machine (use --device cpu)")
    if device_type == "cuda" and torch.cuda.device_count() < devices:
        raise LitLLMError(f"--devices {devices}: this machine has {torch.cuda.device_count()} CUDA devices")
    children = []
    placed = launcher_env()
    if placed is None:
        if num_nodes > 1:
            raise LitLLMError(f"--num_nodes {num_nodes}: start the command on every node with torchrun or srun "
                              f"(see config_hub/slurm/serve.sbatch)")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        children = [spawn_worker(r, world, device_type) for r in range(1, world)]
        placed = (0, world, 0)
    rank, size, local_rank = placed
    if "SLURM_JOB_ID" in os.environ and "MASTER_PORT" not in os.environ:  # as config_hub/slurm/serve.sbatch sets it
        os.environ["MASTER_PORT"] = str(15000 + int(os.environ["SLURM_JOB_ID"]) % 10000)
    if size != world:
        raise LitLLMError(f"--devices {devices} --num_nodes {num_nodes} make {world} ranks, but the launcher "
                          f"started {size} processes")
    device = f"cuda:{local_rank}" if device_type == "cuda" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    ranks = Ranks(rank, size, local_rank, device, children)
    if children:
        watch(ranks)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s()))
    return ranks


def spawn_worker(rank: int, world: int, device_type: str) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               LITLLM_TP_DEVICE=device_type, LITLLM_TP_SPAWNED="1")
    # the workers print nothing on stdout (rank 0's output is the command's); errors go to stderr
    return subprocess.Popen([sys.executable, "-m", "litllm.parallel.worker"], env=env, stdout=subprocess.DEVNULL)


def watch(ranks: Ranks) -> None:
    """Rank 0: when a worker it started exits before the run ends, stop with one line (never hang)."""

    def run():
        while True:
            for r, child in enumerate(ranks.children, start=1):
                code = child.poll()
                if code is not None and not ranks.stopping:
                    fatal(ranks, f"tensor-parallel rank {r} (pid {child.pid}) exited with code {code}")
            time.sleep(0.2)

    threading.Thread(target=run, name="litllm-tp-watch", daemon=True).start()


_fatal = threading.Lock()


def fatal(ranks: Ranks, line: str) -> None:
    """Rank 0: end the run with one line `error: <line>; stopping the other ranks` (said once, whichever thread
    notices first; a second one waits for the exit)."""
    if not _fatal.acquire(blocking=False):
        time.sleep(3600)
    ranks.stopping = True
    print(f"error: {line}; stopping the other ranks", file=sys.stderr, flush=True)
    stop_children(ranks)
    os._exit(1)


def stop_children(ranks: Ranks, wait_s: float = 0.0) -> None:
    """End the workers rank 0 started (after waiting up to `wait_s` for them to leave on their own)."""
    ranks.stopping = True
    deadline = time.monotonic() + wait_s
    for child in ranks.children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def die_with_parent() -> None:
    """A spawned worker: be ended by the kernel when rank 0's process goes (Linux), never left behind."""
    if sys.platform.startswith("linux") and os.environ.get("LITLLM_TP_SPAWNED"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
