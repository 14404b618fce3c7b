"""Kernel-launching operations per decode step, counted on the CPU (a proxy for a GPU step's launches, 2026-12-04):
a tiny model's one-token step under torch.profiler, Triton's interpreter on, counting the outermost ATen ops that
launch a kernel on a GPU (views and allocations left out) and the Triton launches, with the ops inside the
interpreter's own launches left out. Usage, from the repository root (PYTHONPATH=DIR for another tree):

    TRITON_INTERPRET=1 python docs/bench/launch_counts/count.py VARIANT PATH     # e.g. mla-kv64 kernel
    TRITON_INTERPRET=1 python docs/bench/launch_counts/count.py VARIANT PATH --gpu-routes

--gpu-routes: the step takes the routes a GPU step takes without autograd (RoPE, add + RMSNorm, SwiGLU's activation
and the cache append in Triton, the addmm residual, the merged products), forced as the CPU tests force them.
A diagnostic, not a benchmark: nothing imports it (`egmla bench launches` splits a capturable step per layer);
counts.txt beside it has its output before and after
2026-12-04's launch diet, and with --gpu-routes before and after the merged products. On a GPU the profile of
`egmla bench generate --profile` counts the real kernels.
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity, record_function
from collections import Counter
from egmla.variants import variant_config
from egmla.model import Transformer
import egmla.attention.table_bias as E
import egmla.kernels.bias_decode as BD
name, path = sys.argv[1], sys.argv[2]
if "--gpu-routes" in sys.argv[3:]:
    import egmla.kernels, egmla.model, egmla.attention.mla
    for module in (egmla.kernels, egmla.model, egmla.attention.mla):
        module.no_grad_kernel_can_run = lambda x: not torch.is_grad_enabled()
# mark interpreter launches so their internal ops can be excluded
import triton.runtime.interpreter as I
def wrap(cls, meth):
    f = getattr(cls, meth)
    def g(self, *a, **k):
        with record_function("TRITON_LAUNCH"):
            return f(self, *a, **k)
    setattr(cls, meth, g)
wrap(I.GridExecutor, "__call__")
for fn in ("bias_absorbed_kernel",):
    f = getattr(E.TableBiasMLA, fn)
    def g(self, *a, _f=f, **k):
        with record_function("BIAS_LAYER"):
            return _f(self, *a, **k)
    setattr(E.TableBiasMLA, fn, g)
config = variant_config(name, "tiny")
torch.manual_seed(0)
model = Transformer(config).eval(); model.set_decode_path(path)
for layer in model.layers:
    for attr in ("absorbed_backend", "grouped_backend"):
        if hasattr(layer.attn, attr): setattr(layer.attn, attr, "kernel")
B, P = 2, 24
tokens = torch.randint(0, config.vocab_size, (B, P)); cache = model.new_cache(B, max_len=P + 4)
with torch.no_grad():
    model(tokens, cache); nxt = tokens[:, -1:]; model(nxt, cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(nxt, cache)
VIEWS = {"aten::view", "aten::select", "aten::slice", "aten::unsqueeze", "aten::as_strided", "aten::empty", "aten::t",
         "aten::transpose", "aten::expand", "aten::reshape", "aten::_unsafe_view", "aten::permute", "aten::squeeze",
         "aten::alias", "aten::detach", "aten::empty_strided", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
         "aten::_reshape_alias", "aten::contiguous", "aten::flatten", "aten::split", "aten::unbind", "aten::unflatten",
         "aten::chunk", "aten::narrow", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
         "aten::empty_like", "aten::to", "aten::_to_copy", "aten::clone", "aten::matmul", "aten::einsum", "aten::linear",
         "aten::split_with_sizes", "aten::new_empty"}
def ancestors(e):
    out = []
    p = e.cpu_parent
    while p is not None:
        out.append(p.name); p = p.cpu_parent
    return out
inside, outside = Counter(), Counter()
for e in prof.events():
    if not e.name.startswith("aten::") or e.name in VIEWS: continue
    anc = ancestors(e)
    if "TRITON_LAUNCH" in anc: continue
    if any(a.startswith("aten::") and a not in VIEWS for a in anc): continue  # count the outermost kernel op only
    (inside if "BIAS_LAYER" in anc else outside)[e.name] += 1
launches = Counter(e.name for e in prof.events() if e.name == "TRITON_LAUNCH")
print(name, "layers", config.n_layers, "triton launches", sum(launches.values()))
print("inside the bias layer call:", sum(inside.values()), inside.most_common())
print("outside:", sum(outside.values()), outside.most_common())
