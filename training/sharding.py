"""``train.fsdp``: the UNet, its gradients, optimizer state and EMA sharded over the workers with
PyTorch's FSDP2 ``fully_shard`` (Zhao et al., 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel"), the memory option for SVD's high-resolution stages.

Each down, mid and up block is one FSDP unit (its parameters all-gathered for its forward and
backward, then freed), the root holds the rest. Gradients are reduce-scattered and averaged, as
DDP averages them, so a sharded run follows the unsharded one to float rounding.

accelerate 1.15 applies its FSDP plugin only on accelerator devices (on CPU it falls back to
DDP), so winnow calls ``fully_shard`` itself: the same call on GPUs (NCCL) and on CPU workers
(gloo), where the tests run it.

Checkpoints stay in the unsharded format (``training/checkpoint.py``): ``gathered`` collects full
copies on rank 0 before a save, and a resume restores into the plain model, then ``shard_training``
shards it and moves the optimizer and EMA state onto the shards. So a run can switch ``fsdp`` on
or off, or change its worker count, between resumes.
"""
from __future__ import annotations

from dataclasses import dataclass


def units(unet) -> list:
    """The blocks that become FSDP units (each all-gathered on its own)."""
    blocks = [*unet.down_blocks, getattr(unet, "mid_block", None), *unet.up_blocks]
    return [b for b in blocks if b is not None]


def _by_name(state: dict, names: list[str]) -> dict:
    """An optimizer ``state_dict()`` (parameters by index) keyed by parameter name instead."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def _by_index(state: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)          # accelerate's AcceleratedOptimizer wraps one


def shard_training(unet, optimizer, lr_sched, ema, make_optimizer):
    """Shard ``unet`` in place and return (optimizer, lr scheduler) rebuilt on its shards with the
    given ones' state (restored from a checkpoint or fresh); the EMA's shadow weights become shards
    laid out as the parameters they follow."""
    import warnings

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    # FSDP2 warns on every block that returns a view, in case a caller modifies it in place (which
    # would skip its gradient hook); diffusers' UNets do not, and tests/test_fsdp.py checks the
    # sharded run against DDP
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    names = [n for n, _ in unet.named_parameters()]
    saved = _by_name(optimizer.state_dict(), names)
    for block in units(unet):
        fully_shard(block)
    fully_shard(unet)
    optimizer, new_sched = make_optimizer(unet)
    new_sched.load_state_dict(lr_sched.state_dict())
    if saved["state"]:
        set_optimizer_state_dict(unet, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    if ema is not None:
        ema.shadow_params = [distribute_tensor(s.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                             for s, p in zip(ema.shadow_params, unet.parameters(), strict=True)]
    return optimizer, new_sched


def clip_grad_norm_(parameters, max_norm: float):
    """Every rank calls this: scale the sharded gradients so their total L2 norm is at most
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does on whole gradients; returns the norm
    (a 0-d tensor).

    Each rank sums the squares of its own shards and one blocking ``all_reduce`` adds them up.
    torch's clip on DTensor gradients gets there through DTensor's lazy (functional) collectives
    instead; this keeps the step's communication to the plain, synchronous calls FSDP itself uses.
    Shards are disjoint and FSDP's padding is zeros, so the sum is the whole gradient's."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = list(parameters)
    grads = [(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).detach()
             for p in params if p.grad is not None]
    # summed on the gradients' device (NCCL reduces device tensors), without a host sync
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else params[0].device)
    groups = {dtype: [g for g in grads if g.dtype == dtype] for dtype in sorted({g.dtype for g in grads}, key=str)}
    for group in groups.values():
        squares += torch.stack(torch._foreach_norm(group)).float().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)        # every rank, grads or not
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for dtype, group in groups.items():
        torch._foreach_mul_(group, scale.to(dtype))
    return norm


def plain_class(module) -> type:
    """The model's own class (``fully_shard`` swaps in a subclass that also derives from FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    return next(b for b in cls.__bases__ if b is not FSDPModule) if issubclass(cls, FSDPModule) else cls


def gather_module(unet):
    """Every rank calls this (a collective); rank 0 gets an unsharded copy of ``unet``, the others None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    full = plain_class(unet).from_config(unet.config)
    full.load_state_dict(state)
    return full


@dataclass
class _Saved:
    """A state already gathered, in the shape ``save_checkpoint`` writes (``state_dict()``)."""
    state: dict

    def state_dict(self) -> dict:
        return self.state


def gathered(unet, optimizer, lr_sched, ema) -> dict | None:
    """Every rank calls this (collectives); rank 0 gets the checkpoint mapping of full copies
    (the names of ``Worker.states``), the others None."""
    import torch.distributed as dist
    from diffusers.training_utils import EMAModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    names = [n for n, _ in unet.named_parameters()]
    full = gather_module(unet)
    opt_state = get_optimizer_state_dict(unet, _inner(optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    shadow = None if ema is None else [s.full_tensor().cpu() for s in ema.shadow_params]
    if dist.get_rank() != 0:
        return None
    full_ema = None
    if ema is not None:
        full_ema = EMAModel(full.parameters(), model_cls=type(full), model_config=full.config)
        full_ema.load_state_dict({**{k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                                  "shadow_params": shadow})
    return {"unet": full, "ema_unet": full_ema, "optimizer": _Saved(_by_index(opt_state, names)),
            "lr_scheduler": lr_sched}


__all__ = ["clip_grad_norm_", "gather_module", "gathered", "plain_class", "shard_training", "units"]
