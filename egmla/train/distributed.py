"""Process groups and parallelism, applied to the model from outside (torchtitan style: the model code
never imports this). Under `torchrun` the process group starts from the environment: NCCL when the
processes have GPUs, gloo on CPU. `parallelize` wraps the model with DDP or shards it with FSDP2.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda': no CUDA GPU is visible; use train.device='auto' or 'cpu'")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistInfo(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    # share the cores between the processes of this machine, unless OMP_NUM_THREADS says how many (torch took it at
    # start; torchrun sets it to 1 where it is unset and it starts several processes)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed(wait: bool = False) -> None:
    """Leave the process group. wait (a run that ended normally): first wait for every process, so that none leaves
    while another is still finishing (on 2026-12-07 a CPU run's second process aborted at its exit, "terminate called
    without an active exception", while the first was still writing: gloo's threads at interpreter exit are a known
    abort, pytorch/pytorch#179291; seen once in CI, not reproduced since)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def parallelize(model: nn.Module, cfg, info: DistInfo) -> nn.Module:
    """DDP: replicate and all-reduce gradients. FSDP2: shard every block, then the root (embedding,
    final norm and output head). `cfg` is the run's TrainConfig: `parallel` and its ddp_* / fsdp_* settings,
    each left to torch's default where the config keeps its own. Returns the module to call; `unwrap`
    gives back the Transformer."""
    if not info.enabled:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block, **fsdp_options(cfg))
        fully_shard(model, **fsdp_options(cfg))
        return model
    from torch.nn.parallel import DistributedDataParallel

    options = {"device_ids": [info.device.index] if info.device.type == "cuda" else None,
               "gradient_as_bucket_view": cfg.ddp_gradient_as_bucket_view, "static_graph": cfg.ddp_static_graph}
    if cfg.ddp_bucket_cap_mb:
        options["bucket_cap_mb"] = cfg.ddp_bucket_cap_mb
    if cfg.ddp_comm_hook == "bf16" and info.device.type != "cuda":
        raise ValueError("train.ddp_comm_hook='bf16': DDP takes the bf16 compression hook only on CUDA GPUs with "
                         "NCCL >= 2.10, not on gloo (CPU); use 'none' there")
    wrapped = DistributedDataParallel(model, **options)
    if cfg.ddp_comm_hook == "bf16":  # gradients cast to bf16, all-reduced and divided, cast back
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        wrapped.register_comm_hook(None, bf16_compress_hook)
    return wrapped


FSDP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fsdp_options(cfg) -> dict:
    """fully_shard's keyword arguments from the config: none at its defaults (torch's own behaviour)."""
    options = {}
    if (cfg.fsdp_param_dtype, cfg.fsdp_reduce_dtype) != ("fp32", "fp32"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=FSDP_DTYPES[cfg.fsdp_param_dtype],
                                                    reduce_dtype=FSDP_DTYPES[cfg.fsdp_reduce_dtype])
    if not cfg.fsdp_reshard_after_forward:
        options["reshard_after_forward"] = False
    return options


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context for one micro-batch's forward and backward: skip the gradient reduction (DDP's all-reduce, FSDP2's
    reduce-scatter) except on the last one. (FSDP2 takes it as a setting, made here, at the call.)"""
    import contextlib

    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum over processes (float64 on the processes' device)."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def per_rank(value: float, info: DistInfo) -> list[float]:
    """Every process's `value`, indexed by rank, on every process (a sum of one-hot vectors)."""
    values = [0.0] * info.world_size
    values[info.rank] = float(value)
    return all_reduce_sum(values, info)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


RANK_0_WORK_TIMEOUT = datetime.timedelta(hours=24)  # tokenizing many GB; a dead rank 0 ends the wait sooner


@contextlib.contextmanager
def others_wait_for_rank_0(info: DistInfo, timeout: datetime.timedelta = RANK_0_WORK_TIMEOUT):
    """A barrier at the block's end that waits up to `timeout`, for a block in which rank 0 alone works long (data
    preparation): a plain barrier() times out with the process group (NCCL: 10 minutes), and the watchdog killed
    every process in the middle of rank 0's tokenizing. A gloo group of its own carries the longer timeout; made on
    entry, while every process is there. A rank 0 that fails or dies closes its connections: the others stop then."""
    if not info.enabled:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def broadcast_object(obj, info: DistInfo):
    """rank 0's `obj` on every process."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(obj, info: DistInfo) -> list:
    """Every process's `obj` (picklable), indexed by rank, on every process."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient norm before clipping (max_norm <= 0: measured, not clipped)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)
