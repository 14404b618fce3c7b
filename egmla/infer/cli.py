"""`egmla generate`: generate text from a run directory, streaming, batched, any decode path."""
import argparse
import json
import sys

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/latest",
                        help="run directory written by `egmla train`, or a folder exported by `egmla export --to hf`")
    parser.add_argument("--checkpoint", help="a checkpoints/step_* folder of the run (default: latest good one)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt; repeat for a batch of prompts")
    parser.add_argument("--prompt-file", action="append", default=[], metavar="F",
                        help="a file whose whole text is one prompt (repeatable)")
    parser.add_argument("--batch", metavar="FILE",
                        help="a file with one prompt per non-empty line, all generated as one batch")
    parser.add_argument("--num-samples", type=int, default=1, help="generate this many samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=100,
                        help="tokens to generate per sequence at most; a sequence also stops at the model's "
                             "context (max_seq_len), with a notice on stderr")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="sample within the smallest set of tokens holding this probability; 1 = all")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed: the same seed and the same prompts, in the same order, give the same "
                             "text; the batch shares one random stream, so adding or removing a prompt changes "
                             "the samples of the others")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a sequence when it produces this text (cut from the output; repeatable)")
    parser.add_argument("--eos-token", help="end-of-text token (default: found in the tokenizer, e.g. <|endoftext|>)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--decode-path", default="auto",
                        help="cached-attention path: naive, absorbed (MLA), gate-table (EG-MLA), kernel, grouped, or any "
                             "other the model supports; auto = the Triton kernel on CUDA (EG-MLA: the grouped decode once "
                             "batch x context >= 16,384 positions; the same-table controls, which have no kernel: "
                             "their Triton absorbed decode), the variant's first elsewhere")
    parser.add_argument("--eager", action="store_true",
                        help="run every decode step and prefill eagerly (default on CUDA: replay each batch size's "
                             "step, and each shape bucket's prefill of fresh prompts, from a CUDA graph)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="read each step's tokens back before queueing the next step (default: queue it first, so "
                             "streaming and stop checks run on the host while the device runs the step; same tokens)")
    parser.add_argument("--offload-gate-tables", action="store_true",
                        help="EG-MLA: keep gate tables in host memory, copy the rows in use to the device")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and cache dtype; auto = bf16 on CUDA, fp32 on CPU")
    add_cache_dtype_option(parser)
    parser.add_argument("--json", action="store_true", help="print results as JSON at the end instead of streaming")
    parser.add_argument("--logprobs", type=int, metavar="N",
                        help="also print each generated token's log-probability and the N most likely tokens at its "
                             "step (0 = the token's alone), under the model's own distribution (before temperature, "
                             "top-k and top-p): a listing per sequence after the text, or the fields logprobs and "
                             "top_logprobs of --json")


def labelled_prompts(args) -> list[tuple[str, str]]:
    """(where it came from, text) of every prompt, each --num-samples times: the label names the option (and the
    file's line) in error messages."""
    prompts = [(f"--prompt {_short(p)}", p) for p in args.prompt]
    for path in args.prompt_file:
        text = _read_text("--prompt-file", path)
        prompts.append((f"--prompt-file {path!r}", text.removesuffix("\n").removesuffix("\r")))
    if args.batch:
        # lines end at \n (or \r\n) only: str.splitlines() also splits at form feeds, U+2028, U+0085, ...
        lines = _read_text("--batch", args.batch).split("\n")
        prompts += [(f"--batch {args.batch!r} line {number}", line.removesuffix("\r"))
                    for number, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file F or --batch FILE (one prompt per non-empty "
                         "line)")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples {args.num_samples}: must be >= 1")
    return [p for p in prompts for _ in range(args.num_samples)]


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_text(option: str, path: str) -> str:
    from pathlib import Path

    if Path(path).is_dir():
        raise ValueError(f"{option} {path!r}: a folder; give a text file")
    if not Path(path).is_file():
        raise ValueError(f"{option} {path!r}: no such file")
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the prompt
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path!r}: not UTF-8 text ({err.reason} at byte {err.start}); convert it, e.g. "
                         f"iconv -f latin1 -t utf-8") from None


def check_settings(args) -> None:
    """What can be refused before the model loads (and before a single prompt is echoed)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.logprobs is not None and args.logprobs < 0:
        raise ValueError(f"--logprobs {args.logprobs}: must be >= 0 (the most likely tokens listed per step; 0 = the "
                         f"generated token's log-probability alone)")
    for stop in args.stop:
        if not stop:
            raise ValueError("--stop '': an empty stop string would stop at once; remove it")


def check_prompts(prompts: list[tuple[str, str]], tokenizer, max_seq_len: int) -> None:
    """Every prompt non-empty and within the model's context, named by where it came from."""
    for label, text in dict.fromkeys(prompts):
        n_tokens = len(tokenizer.encode(text).ids)
        if n_tokens == 0:
            raise ValueError(f"{label}: the prompt is empty; give at least one character of prompt")
        if n_tokens > max_seq_len:
            raise ValueError(f"{label}: the prompt has {n_tokens} tokens, more than the model's context "
                             f"max_seq_len={max_seq_len}; shorten it")


def find_eos(tokenizer, meta: dict, requested: str | None) -> int | None:
    """The end-of-text id: --eos-token, else the run's data.eos_token, else a usual special token."""
    if requested is not None and not requested:
        raise ValueError("--eos-token '': empty; give a token of the tokenizer (e.g. <|endoftext|>) or --ignore-eos")
    names = [requested] if requested else [meta.get("data", {}).get("eos_token"), *EOS_CANDIDATES]
    for name in filter(None, names):
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    if requested:
        raise ValueError(f"--eos-token {requested!r}: not in the run's tokenizer")
    return None


CACHE_DTYPES = ("auto", "fp8", "fp8-keep-rope")


def add_cache_dtype_option(parser) -> None:
    parser.add_argument("--cache-dtype", default="auto", choices=CACHE_DTYPES,
                        help="the KV cache's dtype: auto = the model's (--dtype); fp8 = float8_e4m3fn, half of bf16's "
                             "bytes, each cached value saturated at +-448 and rounded once when written (the Triton "
                             "decode kernels read it as stored); fp8-keep-rope = the same but the RoPE keys (MLA's "
                             "k_rope, MHA's K) in --dtype, as DeepSeek-V3.2 keeps them: they carry most of fp8's "
                             "error (docs/inference.md#an-fp8-kv-cache---cache-dtype-fp8)")


def cache_dtype_of(name: str, flag: str = "--cache-dtype"):
    """--cache-dtype's value as GenerationEngine's cache_dtype: None (the model's), torch.float8_e4m3fn or
    "fp8-keep-rope"; `flag` names the option in the error."""
    import torch

    if name not in CACHE_DTYPES:
        raise ValueError(f"{flag} {name!r}: choose one of {', '.join(CACHE_DTYPES)}")
    return {"fp8": torch.float8_e4m3fn, "fp8-keep-rope": "fp8-keep-rope"}.get(name)


def resolve_device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device; use cpu, cuda, cuda:1, ... or auto") from None
    if parsed.type not in ("cpu", "cuda"):  # meta, mps, ...: else every checkpoint is reported "unusable"
        raise ValueError(f"--device {device!r}: egmla runs on cpu or cuda; use cpu, cuda, cuda:1, ... or auto")
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {device!r}: no CUDA device here (torch.cuda.is_available() is False); use "
                             f"--device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device!r}: there are {count} CUDA devices (cuda:0..cuda:{count - 1})")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return torch.device(device), {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def main(args) -> int:
    try:
        return generate(args)
    except BrokenPipeError:  # `egmla generate ... | head`: the reader has gone; stop quietly, as coreutils do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
        return 141  # 128 + SIGPIPE, what a shell reports for a command a closed pipe stopped


def generate(args) -> int:
    from egmla.infer.engine import GenerationEngine
    from egmla.infer.sampling import SamplingParams
    from egmla.runs import load_model, load_tokenizer

    labelled = labelled_prompts(args)
    prompts = [text for _, text in labelled]
    check_settings(args)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, meta = load_model(args.run, device=device, dtype=dtype, checkpoint=args.checkpoint)
    tokenizer = load_tokenizer(args.run)
    check_prompts(labelled, tokenizer, model.config.max_seq_len)
    vocab = model.config.vocab_size
    if args.logprobs is not None and args.logprobs > vocab:  # the engine refuses it too, but after the prompt is echoed
        raise ValueError(f"--logprobs {args.logprobs}: more than the vocabulary's {vocab} tokens; give 0 to {vocab}")
    engine = GenerationEngine(model, tokenizer, decode_path=args.decode_path, cache_dtype=cache_dtype_of(args.cache_dtype),
                              offload_gate_tables=args.offload_gate_tables, cuda_graphs=False if args.eager else None,
                              overlap_host=not args.no_overlap)
    eos = None if args.ignore_eos else find_eos(tokenizer, meta, args.eos_token)
    if args.json:
        on_token = None
    elif len(prompts) == 1:  # stream the one sequence as it is produced
        print(prompts[0], end="", flush=True)
        on_token = _stream_single
    else:  # print each sequence when it finishes
        on_token = _BatchPrinter(prompts)
    results = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                              eos_token_id=eos, stop_strings=args.stop, on_token=on_token, logprobs=args.logprobs)
    stats = engine.last_stats
    if args.json:
        print(json.dumps([json_result(r, prompts[r.index], tokenizer.decode) for r in results], indent=2))
    else:
        if len(prompts) == 1:
            print()
        if args.logprobs is not None:
            for result in results:
                print("\n".join(logprob_lines(result, tokenizer.decode)), flush=True)
    summary = (f"[{model.config.variant_name()}, decode path {engine.decode_path}{', CUDA graphs' if stats.cuda_graphs else ''}, "
               f"{device}, batch {stats.batch_size}: "
               f"{stats.generated_tokens} tokens, prefill {stats.prefill_seconds * 1e3:.0f} ms, "
               f"decode {stats.decode_tokens_per_second:.1f} tokens/s, cache {stats.cache_bytes / 1e6:.2f} MB"
               + (f" ({args.cache_dtype})" if args.cache_dtype != "auto" else ""))
    if engine.offload is not None:
        summary += f", gate tables offloaded: {engine.offload.bytes_saved() / 1e6:.1f} MB off the device"
    print(summary + "]", file=sys.stderr)
    for note in truncation_notes(results, args.max_new_tokens, model.config.max_seq_len):
        print(note, file=sys.stderr)
    return 0


def json_result(result, prompt: str, decode) -> dict:
    """One sequence of --json; with --logprobs its tokens' log-probabilities and each step's most likely tokens."""
    from egmla.infer.responses import json_logprob  # -inf as JSON can hold it

    out = {"prompt": prompt, "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason}
    if result.logprobs is not None:
        out["logprobs"] = [json_logprob(value) for value in result.logprobs]
        out["top_logprobs"] = [[{"id": token, "text": decode([token]), "logprob": json_logprob(value)}
                                for token, value in top.items()] for top in result.top_logprobs]
    return out


def logprob_lines(result, decode) -> list[str]:
    """--logprobs without --json: a header, then one line per generated token: its position, log-probability and
    text (each token decoded alone), and the step's most likely tokens."""
    lines = [f"--- [{result.index}] log-probabilities of {len(result.logprobs)} tokens, sum {sum(result.logprobs):.4f}"]
    for position, (token, value, top) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs)):
        line = f"{position:4d} {value:9.4f}  {decode([token])!r:<12}"
        if top:
            line += "  top: " + ", ".join(f"{decode([other])!r} {logprob:.4f}" for other, logprob in top.items())
        lines.append(line)
    return lines


def truncation_notes(results, max_new_tokens: int, max_seq_len: int) -> list[str]:
    """One line per sequence that stopped at the model's context before --max-new-tokens."""
    return [f"note: sequence {r.index} stopped at the model's context (max_seq_len={max_seq_len}) after "
            f"{len(r.token_ids)} of --max-new-tokens {max_new_tokens} new tokens"
            for r in results if r.finish_reason == "length" and len(r.token_ids) < max_new_tokens]


def _stream_single(event) -> None:
    print(event.text, end="", flush=True)


class _BatchPrinter:
    def __init__(self, prompts: list[str]):
        self.prompts, self.texts = prompts, {}

    def __call__(self, event) -> None:
        self.texts[event.index] = self.texts.get(event.index, "") + event.text
        if event.finish_reason is not None:
            print(f"--- [{event.index}] ({event.finish_reason})\n{self.prompts[event.index]}"
                  f"{self.texts.pop(event.index)}", flush=True)
