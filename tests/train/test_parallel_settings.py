"""The DDP and FSDP2 settings of the train config (issue 20) reach DistributedDataParallel and fully_shard, and
nothing changes at their defaults; train.profile_steps writes a step profile; the step-timeline arithmetic of
egmla.bench.profiling on made-up GPU events. Two-process training with the settings runs in
test_bench_multigpu.py."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from egmla.bench import profiling
from egmla.train.config import TrainConfig
from egmla.train.distributed import DistInfo, fsdp_options, parallelize
from egmla.train.trainer import batch_layout, train
from tests.train.helpers import run_config


def test_defaults_are_torchs_own_behaviour():
    cfg = TrainConfig()
    assert (cfg.ddp_gradient_as_bucket_view, cfg.ddp_static_graph, cfg.ddp_bucket_cap_mb, cfg.ddp_comm_hook) == (
        False, False, 0.0, "none")
    assert (cfg.fsdp_param_dtype, cfg.fsdp_reduce_dtype, cfg.fsdp_reshard_after_forward, cfg.profile_steps) == (
        "fp32", "fp32", True, 0)
    assert fsdp_options(cfg) == {}  # fully_shard exactly as before: no policy, torch's resharding


def test_fsdp_options():
    options = fsdp_options(TrainConfig(fsdp_param_dtype="bf16", fsdp_reshard_after_forward=False))
    policy = options["mp_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert options["reshard_after_forward"] is False
    policy = fsdp_options(TrainConfig(fsdp_reduce_dtype="bf16"))["mp_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("values, error", [
    (dict(ddp_comm_hook="fp16"), r"train.ddp_comm_hook='fp16': choose one of none, bf16"),
    (dict(fsdp_param_dtype="fp16"), r"train.fsdp_param_dtype='fp16': choose one of fp32, bf16"),
    (dict(ddp_bucket_cap_mb=-1), r"train.ddp_bucket_cap_mb=-1: must be greater than or equal to 0"),
    (dict(ddp_static_graph="yes"), r"train.ddp_static_graph='yes': must be true or false"),
    (dict(steps=10, warmup_steps=5, profile_steps=10), r"train.profile_steps=10: .* needs 0 < profile_steps < train.steps"),
    (dict(compile=True, ddp_bucket_cap_mb=0.5), r"train.ddp_bucket_cap_mb=0.5: with train.compile, use at least 1"),
])
def test_bad_settings_are_one_line(values, error):
    with pytest.raises(ValueError, match=error):
        TrainConfig(**values)


def test_static_graph_refuses_gradient_accumulation():
    """DDP's static graph breaks under no_sync() (pytorch/pytorch#143580): a clear error, before training."""
    run = run_config(Path("unused"), train=dict(ddp_static_graph=True, micro_batch_size=2))
    two = DistInfo(rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"ddp_static_graph=true with gradient accumulation \(2 micro-batches"):
        batch_layout(run, two)
    assert batch_layout(run, DistInfo()) == (2, 4)  # one process: no DDP, no static graph
    one_micro_batch = run_config(Path("unused"), train=dict(ddp_static_graph=True))
    assert batch_layout(one_micro_batch, two) == (4, 1)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone: DDP and FSDP2 wrap for real, with a 1-process all-reduce."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=2)  # `enabled`, so that parallelize wraps
    dist.destroy_process_group()



@pytest.mark.parametrize("omp_num_threads, threads", [("1", 1), ("3", 1), (None, 4)])
def test_init_distributed_keeps_a_thread_count_that_omp_num_threads_sets(one_process_group, monkeypatch,
                                                                           omp_num_threads, threads):
    """On CPU the processes share the cores (8 here, over 2 local processes) unless OMP_NUM_THREADS is set: the
    user's value stood at start and was overwritten (the tests' OMP_NUM_THREADS=1 too, on a machine of more cores)."""
    import os

    from egmla.train.distributed import init_distributed

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if omp_num_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_num_threads)
    torch.set_num_threads(1)  # as torch would have set it from OMP_NUM_THREADS at start (conftest: 1 thread)
    try:
        assert init_distributed("cpu").backend == "gloo"
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_ddp_settings_reach_ddp(one_process_group):
    plain = parallelize(Tiny(), TrainConfig(), one_process_group)
    assert isinstance(plain, nn.parallel.DistributedDataParallel)
    assert (plain.gradient_as_bucket_view, plain.static_graph, plain.bucket_bytes_cap) == (False, False, 25 * 2**20)
    cfg = TrainConfig(ddp_gradient_as_bucket_view=True, ddp_static_graph=True, ddp_bucket_cap_mb=0.5)
    tuned = parallelize(Tiny(), cfg, one_process_group)
    assert (tuned.gradient_as_bucket_view, tuned.static_graph, tuned.bucket_bytes_cap) == (True, True, 2**19)
    for model in (plain, tuned):  # same gradients; with the bucket view they are views of the all-reduce buffer
        model(torch.ones(3, 8)).sum().backward()
    for a, b in zip(plain.parameters(), tuned.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match=r"train.ddp_comm_hook='bf16': .* only on CUDA GPUs .* not on gloo"):
        parallelize(Tiny(), TrainConfig(ddp_comm_hook="bf16"), one_process_group)


def test_fsdp_settings_reach_fully_shard(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = parallelize(Tiny(), TrainConfig(parallel="fsdp", fsdp_param_dtype="bf16",
                                            fsdp_reshard_after_forward=False), one_process_group)
    for module in (*model.layers, model):
        state = fully_shard.state(module)
        assert (state._mp_policy.param_dtype, state._mp_policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fully_shard.state(model.layers[0])._fsdp_param_group.post_forward_mesh_info is None  # kept after forward
    out = model(torch.ones(3, 8))
    assert out.dtype == torch.bfloat16  # computed with the bf16 copies of the fp32 weights
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    default = parallelize(Tiny(), TrainConfig(parallel="fsdp"), one_process_group)
    assert fully_shard.state(default.layers[0])._mp_policy.param_dtype is None
    assert fully_shard.state(default.layers[0])._fsdp_param_group.post_forward_mesh_info is not None


def test_profile_steps_write_a_profile(tmp_path, cache_dir):
    """One process, the last 2 of 4 steps profiled: the timeline and the kernel tables in the run directory."""
    run = run_config(cache_dir, train=dict(steps=4, profile_steps=2, eval_every=0, checkpoint_every=0))
    train(run, tmp_path / "run", progress=False, log=lambda *_: None)
    report = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert (report["first_step"], report["last_step"], report["steps"], report["world_size"]) == (3, 4, 2, 1)
    (rank,) = report["ranks"]
    assert rank["steps"] == 2 and rank["gpu"] is None and rank["host_ms"]["forward_backward"] > 0
    assert report["kernels"]["top"]
    assert "| per step, ms | rank 0 |" in (tmp_path / "run" / "profile.md").read_text()


def event(name, start, end, gpu=False, annotation=False):
    device = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           is_user_annotation=annotation)


def test_step_timeline_on_gpu_events():
    """Two steps of 100 µs. Step 1: data 0-10, forward+backward 10-60, optimizer 60-90; kernels 15-55 and an NCCL
    all-reduce 50-70 (overlapped 50-55). Step 2 (100-200): kernels 110-180, all-reduce 170-200 (170-180
    overlapped). Ranges' GPU spans (annotations, or named like a host range) are not kernels."""
    events = [event("egmla.step", 0, 100), event("egmla.step", 100, 200),
              event("egmla.data", 0, 10), event("egmla.forward_backward", 10, 60), event("egmla.optimizer", 60, 90),
              event("egmla.data", 100, 105), event("egmla.forward_backward", 105, 190),
              event("sm90_gemm", 15, 55, gpu=True), event("ncclDevKernel_AllReduce_Sum_f32", 50, 70, gpu=True),
              event("triton_fused", 110, 180, gpu=True), event("ncclDevKernel_AllReduce_Sum_f32", 170, 200, gpu=True),
              event("egmla.step", 0, 200, gpu=True, annotation=True), event("egmla.data", 0, 190, gpu=True)]
    t = profiling.step_timeline(events)
    ms = 1e-3 / 2  # µs per run -> ms per step
    assert t["steps"] == 2 and t["wall_ms"] == pytest.approx(200 * ms)
    assert t["host_ms"]["data"] == pytest.approx(15 * ms) and t["host_ms"]["between"] == 0
    gpu = t["gpu"]
    assert gpu["busy_ms"] == pytest.approx((55 + 90) * ms)  # 15-70 and 110-200
    assert gpu["idle_ms"] == pytest.approx((15 + 40) * ms)  # 0-15, 70-110
    assert gpu["communication_ms"] == pytest.approx((20 + 30) * ms)
    assert gpu["communication_exposed_ms"] == pytest.approx((15 + 20) * ms)  # 55-70, 180-200
    idle = gpu["idle_ms_while_host_in"]
    assert idle["data"] == pytest.approx((10 + 5) * ms)  # 0-10, 100-105
    assert idle["forward_backward"] == pytest.approx((5 + 5) * ms)  # 10-15, 105-110
    assert idle["optimizer"] == pytest.approx(20 * ms)  # 70-90
    assert idle["other"] == pytest.approx(10 * ms)  # 90-100: in step 1, outside any labelled phase
    assert sum(idle.values()) == pytest.approx(gpu["idle_ms"])
    table = profiling.timeline_markdown([t])
    assert "| **communication not overlapped by compute** | 0.02 |" in table


def test_interval_arithmetic():
    a = profiling.merged([(5, 8), (0, 2), (1, 3), (9, 9)])
    assert a == [(0, 3), (5, 8)] and profiling.length(a) == 6
    assert profiling.intersection(a, [(2, 6)]) == [(2, 3), (5, 6)]
    assert profiling.difference(a, [(1, 2), (6, 10)]) == [(0, 1), (2, 3), (5, 6)]
    assert profiling.step_timeline([]) == {"steps": 0}
