"""Launches of a capturable one-token decode step (the engine's CUDA-graph step), split into what each layer adds
and what the step adds once, counted on the CPU (2026-12-04, sixth session): ATen ops seen by a dispatch mode (views
and allocations left out; RMSNorm is seen as its 6 decomposed ops, one fused kernel on a GPU, so read differences,
not totals) plus Triton launches, with the GPU routes forced as in count.py and a folding kv rank (kv_lora_rank 32 <
d_n, as paper-base kv64 folds). The per-layer count is a 2-layer step minus a 1-layer one. Usage, from the
repository root (PYTHONPATH=DIR for another tree):

    TRITON_INTERPRET=1 python docs/bench/launch_counts/per_layer.py mla-kv64:kernel egmla-kv64:grouped ...

counts.txt has its output before and after the token-groups append kernel."""
import sys, torch, dataclasses, traceback, collections
from torch.utils._python_dispatch import TorchDispatchMode
from egmla.variants import variant_config
from egmla.model import Transformer
import egmla.kernels, egmla.model, egmla.attention.mla, egmla.attention.mha
for module in (egmla.kernels, egmla.model, egmla.attention.mla, egmla.attention.mha):
    module.no_grad_kernel_can_run = lambda x: not torch.is_grad_enabled()
import triton.runtime.interpreter as I
SKIP = {"view","select","slice","unsqueeze","as_strided","empty","t","transpose","expand","_unsafe_view","permute","squeeze","alias","detach","empty_strided","lift_fresh","_reshape_alias","split","unbind","unflatten","narrow","split_with_sizes","new_empty","_to_copy","clone","empty_like","_local_scalar_dense","is_nonzero","item","sym_size","sym_stride","sym_numel","sym_storage_offset","dim","size","stride"}
state = {"in_triton": 0}
counts = collections.Counter()
orig = I.GridExecutor.__call__
def call(self, *a, **k):
    counts["T:" + self.fn.__name__] += 1
    state["in_triton"] += 1
    try: return orig(self, *a, **k)
    finally: state["in_triton"] -= 1
I.GridExecutor.__call__ = call
class M(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in SKIP and not state["in_triton"]:
            counts[name] += 1
        return func(*args, **(kwargs or {}))
def run(variant, path, layers):
    config = dataclasses.replace(variant_config(variant, "tiny"), kv_lora_rank=32, n_layers=layers)
    torch.manual_seed(0)
    model = Transformer(config).eval(); model.set_decode_path(path)
    for layer in model.layers:
        for attr in ("absorbed_backend", "grouped_backend"):
            if hasattr(layer.attn, attr): setattr(layer.attn, attr, "kernel")
    B, P = 2, 24
    tokens = torch.randint(0, config.vocab_size, (B, P)); cache = model.new_cache(B, max_len=P + 4)
    n_new = torch.ones(B, dtype=torch.long)
    with torch.no_grad():
        model(tokens, cache); nxt = tokens[:, -1:]; model(nxt, cache, n_new=n_new, capturable=True)
        counts.clear()
        with M():
            model(nxt, cache, n_new=n_new, capturable=True)
    return sum(counts.values()), dict(counts)
for spec in sys.argv[1:]:
    v, p = spec.split(":")
    one, c1 = run(v, p, 1); two, c2 = run(v, p, 2)
    per_layer = two - one
    print(f"{v} {p}: per layer {per_layer}, per step outside layers {one - per_layer}")
    print("   1 layer:", sorted(c1.items(), key=lambda x: -x[1]))
