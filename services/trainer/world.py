"""The processes that train one run together: this process alone, or the workers of a Ray Train
run (services/trainer/ray_backend.py), joined by torch.distributed.

The recipe asks the world four things, and with one process each is a no-op:
- `rank`, `size`: which share of each step's sequences this process computes
  (`share_of_step`: sequence j goes to rank j % size);
- `all_sum`: add numbers over the workers (the step's trained tokens, its loss);
- `reduce_gradients`: add the gradients over the workers. Every worker weights its loss by its
  share of the step's trained tokens over the whole step's, so the sum is exactly the gradient
  one process would get from the whole step (the same loss curve, to float rounding, at any
  worker count); every worker then clips and steps the same way;
- `agree`: a decision only the main worker can make (go on, or stop and checkpoint) reaches all.

Gradients are added by hand (one flat all-reduce per step) rather than by
DistributedDataParallel's hooks: a worker whose share of a step is empty, or smaller, joins the
same single collective, where DDP needs the same number of backward passes on every worker.
"""

from __future__ import annotations

import torch


class World:
    """One process: nothing to share."""

    rank = 0
    size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def reduce_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        return None

    def agree(self, main_says: bool) -> bool:
        return main_says


class DistributedWorld(World):
    """The workers of a torch.distributed process group (Ray Train sets it up)."""

    def __init__(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        if not dist.is_initialized():
            raise RuntimeError("DistributedWorld needs an initialised torch.distributed process group")
        self._dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        backend = dist.get_backend()
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM)
        return tensor.tolist()

    def reduce_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        trainable = [p for p in parameters if p.requires_grad]
        for p in trainable:
            if p.grad is None:  # nothing computed here this step: this worker adds zeros
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in trainable])
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        offset = 0
        for p in trainable:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def agree(self, main_says: bool) -> bool:
        flag = torch.tensor([1 if main_says else 0], device=self._device)
        self._dist.broadcast(flag, src=0)
        return bool(flag.item())
