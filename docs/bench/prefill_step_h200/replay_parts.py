import time, torch
from egmla.config import preset
from egmla.variants import variant_config
from egmla.model import Transformer
from egmla.infer import GenerationEngine
torch.manual_seed(0)
config = variant_config("mla-kv64", preset("paper-base", max_seq_len=1024))
with torch.device("cuda"):
    model = Transformer(config).to(torch.bfloat16)
engine = GenerationEngine(model)
engine.generate([[1, 2, 3]], max_new_tokens=2)
with torch.inference_mode():
    cache = engine._cache_for(128, 1024)
    for rows in (16, 24, 32):
        tokens = torch.randint(0, config.vocab_size, (rows, 500)); n_new = torch.full((rows,), 500)
        step = engine.prefill_step(rows, 500, 1024)
        step.prefill(cache, 0, tokens, n_new, False)
        for _ in range(2):
            torch.cuda.synchronize(); marks = [time.perf_counter()]
            padded = torch.zeros(3, step.rows, step.width, dtype=torch.long); padded[0, :rows, :500] = tokens
            pinned = padded.pin_memory(); marks.append(time.perf_counter())
            staged = pinned.to("cuda", non_blocking=True); step.tokens.copy_(staged[0]); marks.append(time.perf_counter())
            step.graph.replay(); marks.append(time.perf_counter())
            cache.take_rows(step.cache, 0, rows, 500); marks.append(time.perf_counter())
            torch.cuda.synchronize(); marks.append(time.perf_counter())
            print(rows, "ms: pin %.2f, copy %.2f, replay %.2f, take_rows %.2f, then GPU %.2f" % tuple(1e3 * (b - a) for a, b in zip(marks, marks[1:])), flush=True)
    for rows in (16, 32):
        tokens = torch.randint(0, config.vocab_size, (rows, 500)); n_new = torch.full((rows,), 500)
        step = engine.prefill_step(rows, 500, 1024)
        for _ in range(3):
            torch.cuda.synchronize(); t = time.perf_counter()
            step.prefill(cache, 0, tokens, n_new, False); h = time.perf_counter()
            torch.cuda.synchronize()
            print(rows, "step.prefill host %.2f wall %.2f ms" % (1e3 * (h - t), 1e3 * (time.perf_counter() - t)), flush=True)
