"""torchrun / DistributedDataParallel helpers.

`torchrun --nproc_per_node N -m blueberry run SPEC` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; without those variables everything here is a no-op and a
run is one process. Backend: NCCL on GPUs, gloo on CPU. `train.batch_size` is per rank: each optimizer step
sees world × batch_size × grad_accum windows, and rank r trains on its own slice of one global draw.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0 or not self.distributed  # a RANK left in the environment makes no job of one process

    @property
    def distributed(self) -> bool:
        return self.size > 1


def env_world() -> World:
    """The world torchrun describes in the environment; one process where it describes none, or a WORLD_SIZE of 1
    or less: -1, which some launchers set for "not distributed" (with RANK -1), is one process, rank 0, not a
    rank that follows a rank 0 that does not exist (it trained and recorded nothing)."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return World()
    return World(rank=int(os.environ.get("RANK", 0)), size=size, local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def torchrun_job() -> dict | None:
    """The torchrun job this process belongs to: {"id": its rendezvous id (TORCHELASTIC_RUN_ID: a fresh uuid per
    `torchrun --standalone`, the --rdzv-id given across machines, where "none", torchrun's default, names no job
    in particular), "restart": how many times torchrun has restarted its ranks after a failure
    (TORCHELASTIC_RESTART_COUNT, with --max-restarts)}; None outside torchrun."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    if job is None:
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"id": job, "restart": int(restart) if restart.isdigit() else 0}


def restart_hazard() -> str | None:
    """A warning where torchrun may restart the ranks (--max-restarts) while they share its rendezvous store: the
    restarted ranks can read the previous start's addresses from it and fail to connect (pytorch/pytorch#135712;
    `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` gives each start a store of its own)."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if restarts in ("", "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return (
        f"torchrun --max-restarts={restarts} with its shared rendezvous store: a restart can fail to connect the "
        "ranks (pytorch/pytorch#135712); start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
    )


def node_devices(world: World, device: torch.device) -> list[int]:
    """CUDA indices of the GPUs on this machine that the run trains on: every local rank's under torchrun (rank 0
    reports for them), else this process's own; none on CPU."""
    if device.type != "cuda":
        return []
    if world.distributed:
        return list(range(int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))))
    return [device.index if device.index is not None else torch.cuda.current_device()]


def current() -> World:
    """The initialised process group's world, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up; on GPUs each rank takes the device cuda:LOCAL_RANK."""
    world = env_world()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return world, device


# gloo's worker threads drop a finished collective's tensors just after `wait()` has returned, and dropping a
# tensor Python has seen takes the GIL. A thread that asks for it once the interpreter has begun to exit is ended
# by Python mid-destructor and aborts the process ("terminate called without an active exception", exit 134): in
# tests/test_distributed.py's two-rank check of a diverged step, 3 times in 54-70 runs under gdb beside a busy
# loop on 2 cores, each a gloo thread in ~AsyncAllreduceWork while the main thread was in Py_FinalizeEx. Joining
# those threads is not an option: a DistributedDataParallel keeps its process group alive after both are deleted.
# So the leaving process sleeps a moment with the GIL released, and the threads finish while the interpreter is
# whole (then none in 50 runs).
GLOO_SETTLE_S = 0.1


def shutdown() -> None:
    """Leave the process group (every rank, at the end of a run), then let gloo's threads finish (see above)."""
    if dist.is_available() and dist.is_initialized():
        uses_gloo = "gloo" in str(dist.get_backend())
        dist.destroy_process_group()
        if uses_gloo:
            time.sleep(GLOO_SETTLE_S)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `model` in a distributed run (it broadcasts rank 0's weights); the model itself otherwise.

    A model whose steps can leave parameters without a gradient (`may_skip_parameters`: experts no token chose)
    has DDP find them each step; otherwise DDP waits for their gradients and fails at the next step.
    """
    if not current().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=getattr(model, "may_skip_parameters", False),
    )


def sync_gradients(model: torch.nn.Module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulation window."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def load_statistics(load: list[float]) -> dict[str, float]:
    """One MoE layer's expert loads (shares summing to 1) summarised: the largest share, the entropy normalised to
    1 for equal loads, and the number of experts that got no token."""
    entropy = -sum(share * math.log(share) for share in load if share > 0)
    return {
        "load_max": max(load),
        "load_entropy": entropy / math.log(len(load)) if len(load) > 1 else 1.0,
        "idle_experts": sum(share == 0 for share in load),
    }


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks in one collective (every rank passes the same keys; no-op alone).

    Each MoE layer's load statistics are re-taken from the averaged expert loads: a mean of maxima is not the max.
    """
    if not current().distributed:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    averaged = dict(zip(keys, (values / dist.get_world_size()).tolist()))
    for key in keys:
        if key.endswith("/load_max"):
            layer = key[: -len("load_max")]
            load = [v for k, v in averaged.items() if k.startswith(layer + "load_e") and k[len(layer) + 6 :].isdigit()]
            averaged.update({layer + name: value for name, value in load_statistics(load).items()})
    return averaged


def smallest_across_ranks(value: int) -> int:
    """The smallest of every rank's `value` (the value itself in one process), for a choice all ranks must share:
    the micro-batch each rank picked from its own memory sets how many micro-steps, so collectives, it runs."""
    if not current().distributed:
        return value
    smallest = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def gather_to_main(obj) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None on the others); `[obj]` in one process."""
    if not current().distributed:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


class MainRankFailed(RuntimeError):
    """Rank 0 failed before training started (it reports why): the other ranks stop without a word of their own,
    `exit_code` 1, or 128 + the stop signal where one reached this rank too (torchrun hands it to every rank)."""

    def __init__(self, reason: str, signum: int | None = None):
        super().__init__(reason)
        self.exit_code = 128 + signum if signum else 1


MAIN_FAILED = "blueberry: rank 0 failed before training"  # what rank 0 broadcasts instead of the resume point


def release_followers() -> None:
    """Rank 0, failing before it broadcast the resume point the other ranks wait for: tell them, so they stop
    quietly rather than each with the process group's own traceback once rank 0 is gone."""
    with contextlib.suppress(Exception):  # the group itself may be what failed
        broadcast_from_main(MAIN_FAILED)


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (what the others pass is ignored); `obj` itself in one process."""
    if not current().distributed:
        return obj
    holder = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class StopVote:
    """Whether a signal asked any rank to stop, answered alike on every rank at the same step.

    torchrun hands a SIGINT/SIGTERM/SIGHUP to each of its ranks (and, across machines, perhaps to some only), each
    at its own moment in the step; a rank that stopped alone would leave the others waiting in the next step's
    collectives. So each step every rank sends the signal it has received (0 for none) when the step starts, and at
    the step's end all take the largest: they stop after the same step. The vote travels on a gloo group of its
    own, on the CPU, while the step runs: it adds no wait on the GPU and no collective to the step's. In one
    process it is the signal received by the step's end. `signal_number` returns this process's signal or None.
    """

    def __init__(self, signal_number):
        self.signal_number = signal_number
        self.group = dist.new_group(backend="gloo") if current().distributed else None  # every rank creates it
        self._sent: torch.Tensor | None = None
        self._work = None

    def send(self) -> None:
        """At a step's start: this rank's signal so far, on its way to the others."""
        if self.group is not None:
            self._sent = torch.tensor([self.signal_number() or 0], dtype=torch.int64)
            self._work = dist.all_reduce(self._sent, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def result(self) -> int | None:
        """At the step's end: the signal that stops the run after this step (every rank's answer), or None."""
        if self.group is None:
            return self.signal_number()
        self._work.wait()
        return int(self._sent.item()) or None


def _collective_device() -> torch.device | None:
    """Where a collective's tensor lives: this rank's GPU under NCCL; gloo takes CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


class NullTracker:
    """What ranks other than 0 log to: nothing (rank 0 alone writes the record and the W&B run)."""

    def log(self, metrics, step) -> None:
        pass

    def summary(self, values) -> None:
        pass

    def finish(self, state, reason=None) -> None:
        pass
