"""Host time of one decode step's CUDA-graph launch (paper-base, batch 128): GPU idle vs queued behind the last,
PDL on vs off, against a graph of as many small PyTorch kernels; and the graph's node count."""
import ctypes, statistics, time, sys
import torch
from egmla.config import preset
from egmla.variants import select
from egmla.bench.generate import _random_model
from egmla.infer import GenerationEngine
from egmla.kernels import pdl_setting

def nodes(graph):
    try:
        rt = ctypes.CDLL("libcudart.so.13") if True else None
    except OSError:
        import glob; rt = ctypes.CDLL(sorted(glob.glob("/opt/torch/.venv/lib/python3.12/site-packages/nvidia/**/libcudart.so*", recursive=True))[0])
    n = ctypes.c_size_t(0)
    err = rt.cudaGraphGetNodes(ctypes.c_void_p(graph.raw_cuda_graph()), None, ctypes.byref(n))
    return n.value if err == 0 else f"err{err}"

def timing(graph, label):
    idle, ahead = [], []
    for _ in range(40):
        torch.cuda.synchronize(); t = time.perf_counter(); graph.replay(); idle.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20): graph.replay()
        ahead.append((time.perf_counter() - t) / 20)
        torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(); [graph.replay() for _ in range(20)]; e1.record(); torch.cuda.synchronize()
    try: n = nodes(graph)
    except Exception as error: n = repr(error)[:60]
    print(f"{label:44s} nodes {n!s:>5}  host µs: idle {1e6*statistics.median(idle):7.1f}  queued {1e6*statistics.median(ahead):7.1f}   GPU µs/step {e0.elapsed_time(e1)*50:7.1f}", flush=True)

base = preset("paper-base", max_seq_len=1024)
prompts = [[int(x) for x in torch.randint(1, 30000, (64,))] for _ in range(128)]
for name in sys.argv[1].split(","):
    for pdl in (True, False):
        with pdl_setting(pdl):
            [variant] = select(name)
            model = _random_model(variant.config(base), torch.device("cuda"), torch.bfloat16)
            engine = GenerationEngine(model)
            engine.generate(prompts, max_new_tokens=4)
            for key, step in engine._steps.items():
                if step.graph is not None and step.batch == 128:
                    timing(step.graph, f"{name} {key} pdl={pdl}")
            engine.release(); del engine, model; torch.cuda.empty_cache()
# a graph of small PyTorch kernels, as many as a step's
for count in (16, 64, 160):
    x = torch.zeros(1024, device="cuda"); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(count): x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(count): x.add_(1)
    timing(g, f"{count} x add_ (PyTorch kernels)")
