"""`egmla bench launches`: what a capturable one-token decode step (the engine's CUDA-graph step) launches, counted
on the CPU, split into what each layer adds and what the step adds once.

A decode step at small batch is bound by its launches (~2-3.5 us each in a replayed graph on an H200), so the
count is worth guarding even where it cannot be timed. The step runs with the GPU routes forced (the forward-only
Triton kernels in Triton's interpreter, the merged products) and a folding kv rank (kv_lora_rank 32 < d_n, as
paper-base kv64 folds); ATen ops are seen by a dispatch mode (views and allocations left out; RMSNorm is seen as its
6 decomposed ops, one fused kernel on a GPU, so read differences, not totals) plus Triton launches. The per-layer
count is a 2-layer step minus a 1-layer one. tests/kernels/test_launches.py holds every variant's count: a change
that adds a launch per layer fails there until the table is changed on purpose.

    TRITON_INTERPRET=1 egmla bench launches mha:kernel mla-kv64:kernel egmla-kv64:grouped egmla-kv64-bias-v:absorbed
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses

# ATen ops that launch nothing on a GPU (views, allocations, metadata)
NOT_LAUNCHES = {"view", "select", "slice", "unsqueeze", "as_strided", "empty", "t", "transpose", "expand",
                "_unsafe_view", "permute", "squeeze", "alias", "detach", "empty_strided", "lift_fresh",
                "_reshape_alias", "split", "unbind", "unflatten", "narrow", "split_with_sizes", "new_empty", "_to_copy",
                "clone", "empty_like", "_local_scalar_dense", "is_nonzero", "item", "sym_size", "sym_stride",
                "sym_numel", "sym_storage_offset", "dim", "size", "stride"}
# modules whose forward-only GPU routes are forced on for the count
ROUTED_MODULES = ("egmla.kernels", "egmla.model", "egmla.attention.mla", "egmla.attention.mha")


@contextlib.contextmanager
def gpu_routes():
    """The forward-only kernel routes taken as on a GPU without gradients (their kernels run in the interpreter)."""
    import importlib

    import torch

    modules = [importlib.import_module(name) for name in ROUTED_MODULES]
    saved = [module.no_grad_kernel_can_run for module in modules]
    for module in modules:
        module.no_grad_kernel_can_run = lambda x: not torch.is_grad_enabled()
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.no_grad_kernel_can_run = original


def step_launches(variant: str, path: str, layers: int) -> collections.Counter:
    """Launches of one capturable one-token step of the tiny preset of `variant` with `layers` layers on `path`:
    {ATen op or 'T:' + Triton kernel: count}."""
    import torch
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    from egmla.model import Transformer
    from egmla.variants import variant_config

    counts: collections.Counter = collections.Counter()
    inside_triton = [0]

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NOT_LAUNCHES and not inside_triton[0]:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    launch = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        counts["T:" + self.fn.__name__] += 1
        inside_triton[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            inside_triton[0] -= 1

    config = dataclasses.replace(variant_config(variant, "tiny"), kv_lora_rank=32, n_layers=layers)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    model.set_decode_path(path)
    for layer in model.layers:
        for backend in ("absorbed_backend", "grouped_backend"):
            if hasattr(layer.attn, backend):
                setattr(layer.attn, backend, "kernel")
    batch, prompt = 2, 24
    tokens = torch.randint(0, config.vocab_size, (batch, prompt))
    cache = model.new_cache(batch, max_len=prompt + 4)
    n_new = torch.ones(batch, dtype=torch.long)
    interpreter.GridExecutor.__call__ = counted
    try:
        with gpu_routes(), torch.no_grad():
            model(tokens, cache)
            step = tokens[:, -1:]
            model(step, cache, n_new=n_new, capturable=True)  # warm: what a first step builds once
            counts.clear()
            with Ops():
                model(step, cache, n_new=n_new, capturable=True)
    finally:
        interpreter.GridExecutor.__call__ = launch
    return counts


def per_layer(variant: str, path: str) -> tuple[int, int, collections.Counter]:
    """(launches each layer adds, launches the step adds once, a 1-layer step's launches by name)."""
    one, two = step_launches(variant, path, 1), step_launches(variant, path, 2)
    layer = sum(two.values()) - sum(one.values())
    return layer, sum(one.values()) - layer, one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="+", metavar="VARIANT:PATH",
                        help="variants (egmla bench generate --variants names, e.g. mla-kv64) and decode paths")
    parser.add_argument("--layers", type=int, default=12, help="layers of the step whose total is printed (paper-base: 12)")
    parser.add_argument("--detail", action="store_true", help="also list a 1-layer step's launches by name")


def main(args) -> int:
    from egmla.kernels import interpreting, triton_available

    if not triton_available():
        raise ValueError("egmla bench launches runs the step's kernels in Triton's interpreter: install Triton "
                         "(pip install -e '.[triton]')")
    if not interpreting():
        raise ValueError("egmla bench launches counts on the CPU through Triton's interpreter: run it with "
                         "TRITON_INTERPRET=1 set")
    for spec in args.configs:
        variant, sep, path = spec.partition(":")
        if not sep or not variant or not path:
            raise ValueError(f"{spec!r}: expected VARIANT:PATH, e.g. mla-kv64:kernel")
        layer, once, detail = per_layer(variant, path)
        print(f"{variant} {path}: per layer {layer}, per step outside layers {once}, "
              f"{args.layers} layers {layer * args.layers + once}")
        if args.detail:
            print("   1 layer:", sorted(detail.items(), key=lambda item: -item[1]))
    return 0
