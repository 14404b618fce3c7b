import time, torch
from egmla.config import preset
from egmla.variants import variant_config
from egmla.model import Transformer
from egmla.infer import GenerationEngine
for name in ("mla-kv64", "egmla-kv64"):
    torch.manual_seed(0)
    config = variant_config(name, preset("paper-base", max_seq_len=1024))
    with torch.device("cuda"):
        model = Transformer(config).to(torch.bfloat16)
    engine = GenerationEngine(model)
    engine.generate([[1, 2, 3]], max_new_tokens=2)  # compiles the kernels
    with torch.inference_mode():
        cache = engine._cache_for(128, 1024)
        for rows, width in ((1, 300), (16, 500), (32, 500), (4, 1000)):
            tokens = torch.randint(0, config.vocab_size, (rows, width))
            n_new = torch.full((rows,), width)
            times = []
            for _ in range(3):
                torch.cuda.synchronize(); t = time.perf_counter()
                step = engine.prefill_step(rows, width, 1024)
                step.prefill(cache, 0, tokens, n_new, engine.reads_token_groups())
                host = time.perf_counter() - t
                torch.cuda.synchronize()
                times.append((round(host * 1e3, 2), round((time.perf_counter() - t) * 1e3, 2)))
            print(name, engine.decode_path, (rows, width), "bucket", (step.rows, step.width), "ms (host, wall): first (capture)", times[0], "then", times[1:], flush=True)
