"""
Several processes for train.py (torchrun), with PyTorch's own engine: torch.distributed, NCCL on
GPUs and gloo on CPUs. Its own file because it is plumbing, not the method.

    torchrun --nproc_per_node=N train.py ...                      # N processes on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-endpoint=HOST:PORT train.py ...   # two machines

What train.py does with it (see its docstring): every rank draws the same batch and sampling keys
and rolls out its share; each rank's loss is divided by the whole batch and the adapters'
gradients are summed (all_reduce_grads), which is what DistributedDataParallel does, written out
because one step makes several forward passes through two adapters; the finished trajectories are
gathered on every rank (all_gather) for the reference buffer and the statistics. Without torchrun
every function here is the identity of a single process.
"""

import datetime
import os

import torch
import torch.distributed as dist


def dist_info():
    """(rank, world size): (0, 1) without torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU) and
    return this rank's device; else return the device of --device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_of(cfg.device)
    if world == 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    else:  # share the cores: each rank's threads would otherwise compete for all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # stage 1 runs on rank 0 while the others wait at a barrier: allow hours, not the default 30 min
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(hours=12))
    return device


def barrier():
    if dist_info()[1] > 1:
        dist.barrier()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params):
    """Sum the gradients over ranks (each rank's loss is already divided by the whole batch)."""
    if dist_info()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def merge_stats(stats):
    """One agent's train.agent_loss statistics from every rank -> those of the whole batch."""
    n = sum(st["messages"] for st in stats)
    out = dict(messages=n)
    for k in ("reward", "credit", "credit_abs"):
        if n:
            out[k] = sum(st.get(k, 0.0) * st["messages"] for st in stats) / n
    if any("kl" in st for st in stats):    # each rank's part is already divided by the whole batch
        out["kl"] = sum(st.get("kl", 0.0) for st in stats)
    # where the credit falls (distill.credit_stats): exact on one rank; over several, each rank's
    # value weighted by its messages (for the stds, the correlation and the share an approximation)
    extra = sorted({k for st in stats for k in st if k.startswith("credit_") and k != "credit_abs"})
    for k in extra:
        have = [st for st in stats if st.get(k) is not None and st["messages"]]
        m = sum(st["messages"] for st in have)
        out[k] = sum(st[k] * st["messages"] for st in have) / m if have else None  # None: undefined
    return out


def device_of(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
