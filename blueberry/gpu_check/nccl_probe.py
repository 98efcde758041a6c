"""`torchrun ... -m blueberry.gpu_check.nccl_probe`: one all-reduce over every rank (NCCL on GPUs, gloo on CPU).

A one-GPU machine runs one process, and `blueberry run` then never forms a process group: this probe forms
one anyway, so NCCL itself is exercised. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        world = dist.get_world_size()
        value = torch.tensor([float(dist.get_rank() + 1)], device=device)
        dist.all_reduce(value)
        if dist.get_rank() == 0:
            expected = world * (world + 1) / 2
            ok = value.item() == expected
            print(json.dumps({"backend": dist.get_backend(), "world_size": world, "sum": value.item(), "ok": ok}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
