"""Many processes: ``torchrun`` + DistributedDataParallel, and a resumable sharded sampler.

``torchrun --nproc_per_node=K -m icnn train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_distributed` reads them (nothing happens when ``WORLD_SIZE`` is 1 or unset). The
backend is NCCL for CUDA and gloo for CPU. Only rank 0 logs and writes checkpoints.

Equivalence with one process: every process draws the same per-epoch permutation and takes every
``world``-th index (:class:`EpochSampler`), so step ``i`` of the ``k`` processes together sees
exactly the images of step ``i`` of one process with batch ``k * batch_size``; DDP averages the
gradients of the per-process means, which is the gradient of the global mean. The filter losses
all-reduce their own running statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Subset


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0  # this process among all
    world_size: int = 1  # number of processes
    local_rank: int = 0  # this process on its machine (selects cuda:local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistEnv:
    """Initialises the default process group from torchrun's environment when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class EpochSampler(DistributedSampler):
    """DistributedSampler whose order is a function of ``(seed, epoch)`` only, with a start offset.

    ``set_epoch(e)`` fixes the permutation (``torch.randperm`` seeded with ``seed + e``, as
    DistributedSampler does), ``set_start(n)`` skips the first ``n`` indices of this process (a
    resume in the middle of an epoch). Works without a process group (``num_replicas=1``).
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(dataset: Dataset) -> Dataset:
    """This process's share of ``dataset`` for a pass whose sums are all-reduced: every world-th
    item from its rank (the whole dataset without a process group)."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all processes).

    ``torch.nn.SyncBatchNorm`` needs GPUs; this is the same computation for any backend (gloo on
    CPU): the per-channel mean, then the centred sum of squares (two passes, as BatchNorm), each
    all-reduced with ``torch.distributed.nn.functional.all_reduce``, which carries the gradient
    back to every process. Running statistics are updated with the global mean and the unbiased
    global variance, as one process on the global batch would. Same parameters and buffers as the
    BatchNorm it replaces (checkpoints are interchangeable).
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        n = all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=x.dtype))
        mean = all_reduce(x.sum(dims)) / n
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Makes every BatchNorm of ``model`` that trains compute global-batch statistics under DDP:
    ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere. Frozen modules (in eval
    mode, no trainable parameters) are left alone. In place; returns ``model``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm) or isinstance(child, (GlobalBatchNorm, nn.SyncBatchNorm)):
                continue
            if not child.training and not any(p.requires_grad for p in child.parameters()):
                continue
            cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(parent, name, new)
    return model
