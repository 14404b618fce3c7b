"""lm-evaluation-harness model `egmla`: score and generate with a run directory, on egmla's own model.

    python -m egmla.hf.lm_eval_model --model egmla --model_args run=DIR --tasks piqa,arc_easy

(the same arguments as `lm_eval`; this entry point registers `egmla` first and, unless --include_path is
given, adds egmla's local tasks egmla_mc and egmla_ppl). From Python:
`import egmla.hf.lm_eval_model` then `lm_eval.simple_evaluate(model="egmla", model_args="run=DIR", ...)`.

model_args: run (required; `pretrained` is taken as its other name, the key lm-eval names its output folder after),
checkpoint, device (cuda if available, else cpu), dtype (float32 | bfloat16 | float16),
batch_size (8; "auto" = 8), max_length (model's max_seq_len), decode_path (generation), max_gen_toks (256),
cache_dtype (fp8: generate_until's cache in fp8; fp8-keep-rope: the same but the RoPE keys in the model's dtype;
scoring runs whole forwards and keeps no cache).
lm_eval's --device and --batch_size arrive as device and batch_size; max_batch_size is accepted and unused.

    loglikelihood          context and continuation tokenised together, split where the context ends
                           (lm-eval's TemplateLM rule); one causal forward per batch, right-padded
    loglikelihood_rolling  disjoint windows of max_length tokens (lm-eval's rolling windows), the first
                           conditioned on <|endoftext|>, summed per document
    generate_until         egmla's GenerationEngine (ragged batches over the compressed cache), stop
                           strings and EOS handled there; greedy or sampling and an empty stop string as
                           lm-eval's HF model reads them (lm_eval_temperature, generate_until)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours; see get_model)

TASKS_DIR = Path(__file__).with_name("tasks")  # egmla_mc, egmla_ppl: pass to TaskManager(include_path=...)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("egmla")
class EgmlaLM(TemplateLM):
    def __init__(self, run: str | None = None, checkpoint: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int | str = 8, max_length: int | None = None,
                 decode_path: str | None = None, max_gen_toks: int = 256, max_batch_size: int | None = None,
                 pretrained: str | None = None, cache_dtype: str | None = None):
        super().__init__()
        from egmla.attention import checked_cache_dtype
        from egmla.hf.tokenizer import special_token_ids
        from egmla.runs import load_model, load_tokenizer

        if run and pretrained and str(run) != str(pretrained):
            raise ValueError(f"model_args run={run!r} and pretrained={pretrained!r} name two models: give one (pretrained "
                             f"is run's other name)")
        run = run or pretrained
        if not run:
            raise ValueError("model_args run=DIR is required: the run directory written by `egmla train`")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"egmla lm-eval: device={device!r} but CUDA is not available; using cpu", file=sys.stderr)
            device = "cpu"  # lm_eval's command line passes --device cuda by default
        self.model, _ = load_model(run, device=device, dtype=DTYPES[dtype], checkpoint=checkpoint)
        if decode_path:
            self.model.set_decode_path(decode_path)
        self.cache_dtype = checked_cache_dtype(cache_dtype)  # generate_until's cache; scoring has none
        self.tokenizer = load_tokenizer(run)
        self._eot = special_token_ids(self.tokenizer)["eos_token_id"]
        if self._eot is None:
            raise ValueError(f"run={run!r}: the tokenizer has no end-of-text token to condition on")
        self._device = torch.device(device)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else self.model.config.max_seq_len
        if not 1 <= self.max_length <= self.model.config.max_seq_len:
            raise ValueError(f"max_length={self.max_length}: must lie in [1, max_seq_len="
                             f"{self.model.config.max_seq_len}]")
        self.max_gen_toks = int(max_gen_toks)

    # ---- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "egmla-bpe"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (sum of log p(continuation | context), whether greedy decoding would produce it)."""
        windows = []
        for key, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise ValueError(f"empty continuation for request {key!r}: nothing to score")
            if not context_ids:  # the first token has no logits to be scored by
                raise ValueError(f"empty context for request {key!r}: give at least one token (lm-eval passes the "
                                 f"end-of-text id for an empty context)")
            if len(continuation_ids) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_ids)} tokens exceeds max_length="
                                 f"{self.max_length}: raise max_length or shorten it")
            # Input is everything but the last token, truncated on the left to max_length.
            inputs = (context_ids + continuation_ids)[-(self.max_length + 1):][:-1]
            windows.append((inputs, continuation_ids))
        results: list[tuple[float, bool] | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: (-len(windows[i][0]), i))  # longest first: less padding
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="egmla loglikelihood", disable=disable_tqdm):
            width = len(windows[batch[0]][0])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)  # right padding never affects real positions
            for row, index in enumerate(batch):
                inputs = windows[index][0]
                tokens[row, : len(inputs)] = torch.tensor(inputs)
            logits = self.model(tokens.to(self.device))
            for row, index in enumerate(batch):
                inputs, target = windows[index]
                # one row's scored positions in fp32 at a time, on the device: the batch's whole [batch, width, vocab]
                # in fp32 and its host copy were ~9 GB each at batch 32 x 2,048 positions x 32,768 ids
                scored = F.log_softmax(logits[row, len(inputs) - len(target): len(inputs)].float(), dim=-1)
                target_t = torch.tensor(target, device=scored.device)
                total = float(scored.gather(1, target_t[:, None]).sum())
                results[index] = (total, bool((scored.argmax(dim=-1) == target_t).all()))
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        per_doc, flat = [], []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            per_doc.append(len(windows))
            flat += [(None, context, continuation) for context, continuation in windows]
        scores = self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)
        results, start = [], 0
        for request, count in zip(requests, per_doc):
            total = sum(score for score, _ in scores[start: start + count])
            start += count
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    # ---- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from egmla.infer import GenerationEngine, SamplingParams

        engine = GenerationEngine(self.model, self.tokenizer, cache_dtype=self.cache_dtype)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings share batches
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        progress = tqdm(total=len(requests), desc="egmla generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None)  # a lone "" is a stop string too, as lm-eval reads it
            until = [] if until is None else [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            sampling = SamplingParams(temperature=lm_eval_temperature(kwargs), top_k=int(kwargs.get("top_k") or 0),
                                      top_p=float(kwargs.get("top_p") or 1.0), seed=int(kwargs.get("seed", 0)))
            if max_new >= self.max_length:  # else the context would be cut to one token, the answer made without it
                raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for the context within "
                                 f"max_length={self.max_length} (the context keeps its last max_length - max_gen_toks "
                                 f"tokens): lower max_gen_toks (the task's generation_kwargs, or model_args "
                                 f"max_gen_toks) or raise max_length (at most max_seq_len="
                                 f"{self.model.config.max_seq_len})")
            room = self.max_length - max_new  # keep the context's end, as lm-eval's HF model does
            if "" in until:
                # lm-eval's HF model stops on "" after the first token (its stop check, `stop in text`, holds for "")
                # and skips "" when it cuts the text at the stop strings: the same one-token answers here
                until = [stop for stop in until if stop]
                max_new = min(max_new, 1)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start: start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-room:] for i in batch]
                outputs = engine.generate(prompts, max_new_tokens=max_new, sampling=sampling,
                                          eos_token_id=self.eot_token_id, stop_strings=until)
                for index, output in zip(batch, outputs):
                    ids = [t for t in output.token_ids if t != self.eot_token_id]
                    text = output.text if output.finish_reason == "stop" else self.tok_decode(ids)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results


def lm_eval_temperature(gen_kwargs: dict) -> float:
    """The sampling temperature (0 = greedy) of a request's generation_kwargs, by lm-eval's rules
    (lm_eval.models.utils.normalize_gen_kwargs): do_sample=False is greedy whatever the temperature; do_sample unset
    samples when a temperature above 0 is given; do_sample=True samples at the temperature given, or at 1.0 where
    none is: transformers' GenerationConfig default and vLLM's (lm-eval's vllm model sends no temperature; its HF
    model sends 0.0, which transformers refuses when sampling)."""
    do_sample, temperature = gen_kwargs.get("do_sample"), gen_kwargs.get("temperature")
    if do_sample is None:
        do_sample = float(temperature or 0.0) > 0
    if not do_sample:
        return 0.0
    return 1.0 if temperature is None else float(temperature)


def main(argv: list[str] | None = None) -> None:
    """`lm_eval`'s command line with `egmla` registered (python -m egmla.hf.lm_eval_model ...)."""
    import egmla.hf  # noqa: F401  (registers EgmlaForCausalLM too, for --model hf on exported folders)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if "--include_path" not in sys.argv and len(sys.argv) > 1:
        sys.argv += ["--include_path", str(TASKS_DIR)]  # our local tasks, next to lm-eval's own
    cli_evaluate()


if __name__ == "__main__":
    main()
