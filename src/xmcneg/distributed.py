"""The one place that asks whether a multi-process (DDP) run is active."""
import torch


def active_dist():
    """torch.distributed when a process group of more than one rank is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def is_rank0():
    dist = active_dist()
    return dist is None or dist.get_rank() == 0


def to_device(x, device):
    """Move a tensor, or the tensors inside a dict / list / tuple (an encoder input), to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
