"""Profile the Gluon grouped kernel at B=32, T=4096 (600-id vocabulary) against the three launches."""
import sys
import torch, triton
sys.path.insert(0, ".")
from tests.kernels.test_grouped_decode import make_case
from egmla.kernels.grouped_decode import grouped_decode, make_plan
from egmla.kernels.grouped_gluon import grouped_decode_gluon

torch.manual_seed(0)
case, groups = make_case(32, 12, 64, 64, 64, 64, [4096] * 32, 32768, torch.bfloat16, "cuda", high=int(sys.argv[1]) if len(sys.argv) > 1 else 600)
plan = make_plan(groups)
print("distinct", groups.n_distinct.float().mean().item())
ref = grouped_decode(plan=plan, **case).float()
for name, f in (("v2b", lambda: grouped_decode_gluon(plan=plan, **case)), ("v2b 8w r128", lambda: grouped_decode_gluon(plan=plan, warps=(2, 4), max_registers=128, **case))):
    o = f().float()
    print(name, "rel err vs three", ((o - ref).norm() / ref.norm()).item())
fns = {"three": lambda: grouped_decode(plan=plan, **case)}
for pps, warps, regs in ((2, (2, 2), None), (2, (2, 4), 128), (2, (4, 2), 128)):
    for skip in (0, 1):
        fns[f"gluon {pps}/SM {warps} r{regs} skip{skip}"] = (lambda pps=pps, skip=skip, warps=warps, regs=regs: grouped_decode_gluon(plan=plan, programs_per_sm=pps, warps=warps, max_registers=regs, items_only=bool(skip), **case))
if "--ncu" in sys.argv:
    grouped_decode_gluon(plan=plan, **case)
    torch.cuda.synchronize()
    sys.exit(0)
for name, fn in fns.items():
    fn()
    torch.cuda.synchronize()
    print(f"{name:24s} {triton.testing.do_bench(fn, warmup=20, rep=100) * 1000:8.1f} us")
