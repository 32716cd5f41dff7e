"""Data-parallel training over several processes: `torchrun`, or Submitit tasks on SLURM.

The one training loop (fastmix.train.loop) averages gradients across ranks by hand;
this module only joins the process group and offers the few collectives it and
the mixture hooks need. In a single process (no launcher variables) nothing is
initialised and every helper is a no-op, so the single-process numbers do not
change. See docs/DECISIONS.md, "Data-parallel training".
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def _slurm_tasks() -> bool:
    """One of several tasks of one SLURM step, and no torch launcher around it."""
    env = os.environ
    return "WORLD_SIZE" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env


def init() -> bool:
    """Join the process group if this process was launched as one of several;
    idempotent. Returns whether training is distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if _slurm_tasks():
        from submitit.helpers import TorchDistributedEnvironment
        try:
            # Leave CUDA_VISIBLE_DEVICES alone: each rank picks cuda:LOCAL_RANK, as under torchrun.
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        except RuntimeError as e:  # SLURM variables, but not a Submitit task (e.g. a bare srun)
            raise RuntimeError("SLURM_NTASKS > 1 but this is not a Submitit task: launch the tasks with "
                               "torchrun or through Submitit, or run one task (--ntasks=1)") from e
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        # gloo for the small CPU-side reductions (hook statistics), nccl for CUDA tensors
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    # torch warns about a process group still open at exit
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 writes the run folder's files; the others must not (no half files)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (a new tensor; `t` itself for one process)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / world_size()


def average_gradients(params) -> None:
    """Replace each .grad by its mean over ranks, in one flat all-reduce. Every rank
    runs the same model code, so the set of parameters with a gradient matches."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))
