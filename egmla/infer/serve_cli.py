"""`egmla serve`: an OpenAI-compatible HTTP server with continuous batching over a run (egmla/infer/server.py)."""
import argparse

from egmla.infer.cli import add_cache_dtype_option

# the prefill graphs captured at start: fresh prompts of up to this many tokens (--capture-prefill-tokens)
CAPTURE_PREFILL_TOKENS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/latest",
                        help="run directory written by `egmla train`, or a folder exported by `egmla export --to hf`")
    parser.add_argument("--checkpoint", help="a checkpoints/step_* folder of the run (default: latest good one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 = every interface (the server has no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port (printed)")
    parser.add_argument("--model-name",
                        help="the model's name in the API (`model` of requests, GET /v1/models); default: the run "
                             "folder's name")
    parser.add_argument("--max-batch", default="32",
                        help="requests generating at once (cache rows); more wait in a queue. auto (CUDA): as many "
                             "rows of --max-len as fit in --memory-fraction of the free device memory after the "
                             "weights, less a prefill forward's activations, at most 512 (the largest CUDA-graph "
                             "batch); printed at start")
    parser.add_argument("--memory-fraction", type=float, default=0.9,
                        help="--max-batch auto: the share of the free device memory the cache may take")
    parser.add_argument("--max-len", type=int,
                        help="positions per cache row, prompt and completion together (default: the model's "
                             "max_seq_len); a longer prompt is refused, a completion stops there")
    parser.add_argument("--max-waiting", type=int, default=4096,
                        help="requests that may wait beyond the free rows; a call whose choices would exceed it is "
                             "answered 429")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens prefilled per scheduler iteration, over all requests (default: 32,768, "
                             "whole prompts); smaller feeds long prompts over several iterations, so running "
                             "requests keep their pace while they arrive, at the cost of those prompts' first token")
    parser.add_argument("--prefix-cache-min", type=int, default=32,
                        help="prefix caching: a prompt that starts with at least this many tokens another request's "
                             "prompt started with (running, or finished with its row not reused yet) copies that row "
                             "and prefills only the rest; 0 = off")
    parser.add_argument("--admit-batch", type=int, default=None,
                        help="while requests run, admit waiting ones once this many rows are free (or all of them "
                             "fit, or --admit-wait steps passed): one prefill forward refills many rows (default "
                             "max(1, max-batch // 8); 1 = refill each freed row at once)")
    parser.add_argument("--admit-wait", type=int, default=16,
                        help="the most decode steps admission waits for --admit-batch free rows")
    parser.add_argument("--decode-path", default="auto",
                        help="cached-attention path: naive, absorbed (MLA), gate-table (EG-MLA), kernel, grouped, or "
                             "any other the model supports; auto = the fastest on the device for --max-batch x "
                             "--max-len")
    parser.add_argument("--eager", action="store_true",
                        help="run every decode step and prefill eagerly (default on CUDA: replay each batch size's "
                             "step, and each shape bucket's prefill of fresh prompts, from a CUDA graph)")
    parser.add_argument("--offload-gate-tables", action="store_true",
                        help="EG-MLA: keep the gate tables in host memory, and on the device only the rows of the ids "
                             "the cache holds (found and copied on the device, inside the CUDA graphs; the ids no "
                             "cache row holds any more are evicted when the rows run short). --max-batch auto keeps "
                             "room for those rows at their bound, every cached position's id distinct (for long "
                             "rows the tables' own size); a fixed --max-batch can use what real text's shared ids "
                             "leave")
    parser.add_argument("--capture-prefill-tokens", type=_prompt_tokens, default=CAPTURE_PREFILL_TOKENS, metavar="N",
                        help="at start, capture the CUDA graph of every prefill bucket (rows up to --max-batch x "
                             "padded width) that fresh prompts of up to N tokens can meet, so that none waits for "
                             "one: a bucket first met while serving is captured then, 80-140 ms (H200) inside that "
                             "request's time to first token, holding up every running request as long. Default "
                             f"{CAPTURE_PREFILL_TOKENS}, short prompts (whose prefills a graph speeds up most): 90 "
                             "buckets at --max-batch 32, 4.5 s at start on an H100 (50 ms each); 512: 110. The graphs share one memory pool "
                             "(the largest one's activations), each keeping its logits (rows x vocab: 64 MB in all at "
                             "paper-base, --max-batch 32). 0 = none (each captured when first met), N >= --max-len: "
                             "all; nothing with --eager or on a CPU. Prints how many and how long")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda if available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and cache dtype; auto = bf16 on CUDA, fp32 on CPU")
    add_cache_dtype_option(parser)
    parser.add_argument("--eos-token",
                        help="end-of-text token where completions stop unless a request asks ignore_eos (default: "
                             "found in the tokenizer, e.g. <|endoftext|>)")
    parser.add_argument("--chat-template", metavar="FILE_OR_STRING",
                        help="the Jinja template that makes a /v1/chat/completions request's messages a prompt "
                             "(transformers' apply_chat_template convention: messages, add_generation_prompt, "
                             "bos_token, eos_token): a file, or the template itself. Default: an exported folder's "
                             "chat_template.jinja or tokenizer_config.json chat_template; without one, chat requests "
                             "are answered 400 (egmla's models are base LMs) and completions work as ever")
    parser.add_argument("--seed", type=int,
                        help="seed of the random stream shared by sampled requests without a seed of their own "
                             "(default: random); a request's own seed makes its text reproducible")


def _prompt_tokens(text: str) -> int:
    """--capture-prefill-tokens' value: a whole number >= 0 (argparse reports the error with the option's name)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of prompt tokens >= 0 (0 = capture no "
                                         f"prefill graph at start)")
    return value


def main(args) -> int:
    from pathlib import Path

    from egmla.infer.chat import check_template_option, load_chat_template
    from egmla.infer.cli import cache_dtype_of, find_eos, resolve_device_dtype
    from egmla.infer.engine import GenerationEngine
    from egmla.infer.scheduler import Scheduler
    from egmla.infer.server import make_server, serve
    from egmla.runs import load_model, load_tokenizer

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must lie in [0, 65535] (0 = any free port)")
    if not 0 < args.memory_fraction <= 1:  # checked whatever --max-batch is: a number there ignores it
        raise ValueError(f"--memory-fraction {args.memory_fraction}: must lie in (0, 1], e.g. 0.9")
    if args.chat_template is not None:  # a bad one is refused before the weights load, not after
        check_template_option(args.chat_template)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, meta = load_model(args.run, device=device, dtype=dtype, checkpoint=args.checkpoint)
    tokenizer = load_tokenizer(args.run)
    engine = GenerationEngine(model, tokenizer, decode_path=args.decode_path, cuda_graphs=False if args.eager else None,
                              offload_gate_tables=args.offload_gate_tables, cache_dtype=cache_dtype_of(args.cache_dtype))
    max_batch = _max_batch(args, engine)
    scheduler = Scheduler(engine, max_batch=max_batch, max_len=args.max_len, max_waiting=args.max_waiting,
                          seed=args.seed, prefill_chunk=args.prefill_chunk, prefix_cache_min=args.prefix_cache_min,
                          admit_batch=args.admit_batch, admit_wait=args.admit_wait)
    eos_token_id = find_eos(tokenizer, meta, args.eos_token)
    chat_template = load_chat_template(args.chat_template, args.run, tokenizer, eos_token_id)
    model_name = args.model_name or Path(args.run).resolve().name  # runs/latest: the folder it points to
    try:
        server = make_server(scheduler, model_name, args.host, args.port, eos_token_id,
                             capture_prefill_tokens=args.capture_prefill_tokens, chat_template=chat_template)
    except OSError as error:
        raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there ({error.strerror}); choose "
                         f"another --port (0 = any free one)") from error
    serve(server)
    return 0


def graph_logits_rows(engine, rows: int, max_len: int, prefill_chunk: int, capture_prefill_tokens: int) -> int:
    """Rows of logits that the CUDA graphs a server of `rows` rows captures at its start keep ([rows, vocab] each):
    every decode bucket's up to the one that holds `rows`, and every prefill step's for prompts of up to
    `capture_prefill_tokens` tokens. (A prefill bucket met later, by a longer prompt, adds its own when captured.)"""
    from egmla.infer.decode_step import bucket_for
    from egmla.infer.prefill_step import prefill_buckets

    top = bucket_for(rows, engine.batch_buckets)
    decode = sum(b for b in engine.batch_buckets if b <= top) if engine.cuda_graphs else 0
    prefill = (sum(r for r, _ in prefill_buckets(rows, max_len, prefill_chunk, capture_prefill_tokens))
               if engine.prefill_graphs and capture_prefill_tokens else 0)
    return decode + prefill


def _max_batch(args, engine) -> int:
    """--max-batch as a number, or under 'auto' the rows that fit the device's free memory (egmla.infer.plan)."""
    if args.max_batch != "auto":
        try:
            return int(args.max_batch)
        except ValueError:
            raise ValueError(f"--max-batch {args.max_batch!r}: give a whole number of rows, or auto") from None
    import torch

    from egmla.infer.decode_step import MAX_GRAPH_BATCH
    from egmla.infer.plan import GB, serving_max_batch

    if engine.device.type != "cuda":
        raise ValueError(f"--max-batch auto sizes the cache from free CUDA memory; the device is {engine.device}: "
                         f"give a number of rows")
    config = engine.config
    max_len = args.max_len or config.max_seq_len
    free, _ = torch.cuda.mem_get_info(engine.device)
    chunk = args.prefill_chunk or engine.prefill_token_budget
    plan = serving_max_batch(config, max_len, free, engine.model.tok_embeddings.weight.dtype, engine.decode_path,
                             chunk, args.memory_fraction, limit=MAX_GRAPH_BATCH, prefill_steps=engine.prefill_graphs,
                             cache_dtype=engine.cache_dtype,
                             graph_logits_rows=lambda rows: graph_logits_rows(engine, rows, max_len, chunk,
                                                                              args.capture_prefill_tokens),
                             gate_row_bytes=engine.offload.bytes_per_id() if engine.offload is not None else 0)
    print(f"egmla serve: --max-batch auto = {plan['max_batch']} rows of {max_len} positions "
          f"({plan['bytes_per_row'] / GB * 1e3:.1f} MB each, {plan['cache_layout']} layout; {plan['fits']} would fit "
          f"in {args.memory_fraction:.0%} of {free / GB:.1f} GB free, less {plan['activation_bytes'] / GB:.2f} GB "
          f"for prefill activations and {plan['graph_logits_bytes'] / GB:.2f} GB for the CUDA graphs' logits"
          + (f", {plan['gate_row_cache_bytes'] / GB:.2f} GB kept for the offloaded gate tables' rows at their bound"
             if plan["gate_row_cache_bytes"] else "") + ")",
          flush=True)
    return plan["max_batch"]
