"""Batched generation over a preallocated compressed KV cache.

    prefill   each distinct prompt once (a repeated one's cache row is copied), in groups of rows whose
              prompts, right-padded to the group's longest, fit `prefill_token_budget` tokens together
              (bounding activation memory), one forward each (a prompt longer than the budget alone, in
              chunks of it), with n_new = each row's true tokens: each cache row then holds exactly its
              prompt. A group of fresh prompts small enough for a bucket goes through a fixed-shape
              `PrefillStep` (egmla/infer/prefill_step.py; a CUDA graph per bucket on CUDA)
    decode    one token per live sequence per step, each appended at its own length, through one
              `DecodeStep` per batch bucket (egmla/infer/decode_step.py): fixed shapes and no host sync,
              captured once in a CUDA graph on CUDA. A sequence that ends (EOS, stop string,
              max_new_tokens, context) stops appending; once the live sequences fit a smaller bucket,
              their cache rows are moved to the front and the smaller step takes over, so attention
              work follows the live sequences

The cache layout is the variant's own (K/V for MHA/GQA, c_t + k^R_t for MLA/EG-MLA, plus token ids
for EG-MLA), allocated for the batch at the length the batch can reach and kept for the next call of
the same shape, or of a shorter one where the steps are graphs that read only each sequence's own positions
(the CUDA graphs read its storage). Any decode path the model supports can be chosen;
they give the same tokens (tests check it against full recompute). Per step the engine syncs with the
host once (the new ids, needed for EOS, stop strings and streaming). On CUDA, SDPA's cuDNN backend is left out while generating: it builds an execution plan
for every new key length (milliseconds of host time each), which a decode loop meets at every step.
"""
from __future__ import annotations

import contextlib
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from egmla.attention import (KVCache, TableBiasMLA, allocate_cache, attention_class, cache_format,
                             check_decode_path, checked_cache_dtype, cuda_decode_path, decode_path_table, decode_paths,
                             fastest_decode_path)
from egmla.infer.decode_step import DEFAULT_BUCKETS, MAX_GRAPH_BATCH, DecodeStep, bucket_for
from egmla.infer.offload import GateTableOffload
from egmla.infer.prefill_step import MIN_WIDTH, PREFILL_GRAPH_TOKENS, PrefillStep, prefill_bucket
from egmla.infer.sampling import (SamplingParams, checked_logprobs, padded_rows, select_next, to_host_async,
                                  token_logprobs)
from egmla.infer.text import IncrementalDetokenizer, StopStringMatcher


# Every SDPA backend but cuDNN (see the module docstring); PyTorch picks the fastest that applies.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Offloaded gate tables: room kept on the device for the rows of new ids a call's decode steps may bring, beyond its
# prompts' ids, as a fraction of the vocabulary (1/16 of a 32K vocabulary: 2,048 rows, ~100 MB at paper-base); past
# it the room grows, and the steps' graphs are captured again (GenerationEngine.reset_offload_rows).
OFFLOAD_ROOM_DIVISOR = 16


@dataclass
class Generation:
    """One sequence's result. `index` is its position in the prompts passed to generate()."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids (with the EOS id if it ended so)
    text: str | None = None  # generated text (None without a tokenizer), cut before a stop string
    finish_reason: str | None = None  # "eos" | "stop" | "length" (and the Scheduler's "cancelled")
    # where asked (`generate(logprobs=k)`, the serving scheduler's `logprobs`): each generated token's log-probability
    # under the model's own distribution (before temperature, top-k, top-p), and the k most likely tokens at its step
    # {token id: log-probability}, most likely first ({} for k = 0)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None  # where asked: the same for the prompt (None for its first)
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class TokenEvent:
    """Passed to the streaming callback for every generated token."""

    index: int  # which sequence
    token_id: int
    text: str  # text completed by this token ("" while a character or a possible stop string is pending)
    finish_reason: str | None  # set on the sequence's last token
    logprob: float | None = None  # where asked: the token's log-probability, and the step's most likely tokens
    top_logprobs: dict[int, float] | None = None


@dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float  # prompts in, first token of every sequence out
    decode_seconds: float  # every later token
    step_seconds: list[float]  # per decode step, host sync to host sync
    cache_bytes: int  # the preallocated cache
    cuda_graphs: bool = False  # every decode step replayed from a CUDA graph (not above MAX_GRAPH_BATCH, or none)
    decode_path: str = ""  # the path the steps ran (decode_path="auto" chooses it per call)

    @property
    def decode_tokens_per_second(self) -> float:
        decode_tokens = self.generated_tokens - self.batch_size
        return decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class SequenceState:
    """One sequence's generation state: its result so far, its incremental detokenizer and its stop strings
    (the engine's and the scheduler's per-sequence bookkeeping on the host; `add` takes each new token).

    text_per_token=False (a request that reads only its result and has no stop strings): no text per token; the
    result's text is decoded once, at the end. The same text: the pieces of the incremental decode join to it."""

    def __init__(self, index: int, prompt_ids: list[int], tokenizer, stop_strings: list[str],
                 text_per_token: bool = True):
        self.result = Generation(index, prompt_ids)
        self.tokenizer = tokenizer
        lazy = tokenizer is not None and not text_per_token and not stop_strings
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None and not lazy else None
        self.stops = StopStringMatcher(stop_strings)
        self.decoded_chars = 0  # characters the detokenizer has produced so far

    def append(self, token_id: int, eos_token_id: int | None, max_new_tokens: int, cache_len: int) -> TokenEvent:
        text = self.add(token_id, eos_token_id, max_new_tokens, cache_len)
        return TokenEvent(self.result.index, token_id, text, self.result.finish_reason)

    def add(self, token_id: int, eos_token_id: int | None, max_new_tokens: int, cache_len: int) -> str:
        """Append one generated token: the text it completes, result.finish_reason set if it ends the sequence."""
        result = self.result
        token_ids = result.token_ids
        token_ids.append(token_id)
        # (every row's token, every step: the common case, no detokenizer, makes no call)
        if token_id == eos_token_id:
            # the eos token ends the text without adding its own (as vLLM and OpenAI leave a stop token's text out:
            # <|endoftext|> decodes to nothing anyway, an ordinary token named by --eos-token would not)
            text, stopped = "", False
            result.finish_reason = "eos"
        else:
            text, stopped = ("", False) if self.detokenizer is None else self._text_of(token_id)
            if stopped:
                result.finish_reason = "stop"
            elif (len(token_ids) >= max_new_tokens
                  or len(result.prompt_ids) + len(token_ids) - 1 >= cache_len):  # no room to feed it
                result.finish_reason = "length"
        if result.finish_reason is not None and self.tokenizer is not None:
            text += self._finish_text(stopped) if self.detokenizer is not None else self._decode_all()
        return text

    def text_so_far(self) -> str | None:
        """The text of the tokens so far (a request cut short, e.g. cancelled: no stop string or eos was met, so it
        is every token's text, an unfinished last character included, streamed or not); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(self.result.token_ids)

    def _decode_all(self) -> str:
        """The result's text in one decode (no text per token was made); nothing to return per token."""
        ids = self.result.token_ids
        self.result.text = self.tokenizer.decode(ids[:-1] if self.result.finish_reason == "eos" else ids)
        return ""

    def _text_of(self, token_id: int) -> tuple[str, bool]:
        if self.detokenizer is None:
            return "", False
        delta = self.detokenizer.push(token_id)
        self.decoded_chars += len(delta)
        return self.stops.add(delta)

    def _finish_text(self, stopped: bool) -> str:
        """Release the held-back text (and any incomplete character at the very end)."""
        out = ""
        if not stopped:
            tail = self.detokenizer.text()[self.decoded_chars:]
            out, stopped = self.stops.add(tail)
            if stopped:
                self.result.finish_reason = "stop"
        out += self.stops.flush()
        self.result.text = self.stops.text
        return out


def device_free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take on `device`: the driver's free memory plus what PyTorch's allocator holds
    unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def reads_own_positions(config, decode_path: str) -> bool:
    """Whether the path's one-token steps on CUDA read only each sequence's own positions (the Triton kernels take
    its length; so does the same-table controls' 'absorbed', Triton too, unlike MLA's PyTorch 'absorbed'): then a
    cache longer than a call needs costs its steps nothing."""
    return decode_path_table(config)[decode_path].reads_own_positions


class GenerationEngine:
    """Generate from a `Transformer` with its KV cache.

    decode_path: any of `egmla.attention.decode_paths(model.config)`, or None for the model's current path;
        "auto" (default) takes the fastest on
        the model's device, chosen again for each `generate` call from its batch and cache length
        (`fastest_decode_path`: the Triton kernel on CUDA, EG-MLA's grouped decode from 16,384 positions per
        step, with offloaded gate tables too), and the model's current path elsewhere.
    cache_dtype: dtype of the cache tensors (default: the model's); torch.float8_e4m3fn (or "fp8"): an fp8 cache for
        every variant, half the bytes of bf16 (EG-MLA's norm statistics stay fp32),
        rounded once when written (egmla/attention/cache.py; the Triton kernels read it as stored, the PyTorch paths
        widen it first); "fp8-keep-rope": the same but the RoPE keys in the model's dtype (Fp8KeepRope).
    offload_gate_tables: keep EG-MLA gate tables in host memory (see egmla.infer.offload); on CUDA the rows of new
        ids are found and copied on the device, inside the steps' graphs.
    prefill_token_budget: prompt tokens per prefill call, right-padded (its rows x their longest prompt); it bounds the
        prefill's activation memory. 32,768 by default: on an H200 (paper-base, 2,048-token prompts, batch 32 and
        128) 8,192 took 1.15-2.3x as long (more, smaller calls), 131,072 no less than 32,768
        (docs/bench/generate_h200_prefill.md, `egmla bench prefill`).
    cuda_graphs: replay decode steps from CUDA graphs (default: on CUDA). batch_buckets: the batch sizes steps are
        built for (default: DEFAULT_BUCKETS with graphs, the exact batch without); a batch pads up to the next one.
    reuse_longer_cache: with CUDA graphs and a path whose steps read only each sequence's positions, a call
        shorter than the kept cache runs on it and replays its graphs (else each new length allocates a cache
        and captures its graphs: on an H200 a median 72-86 ms per call against 44-45 ms reused, 8 prompts of
        576-960 tokens + 16 new, docs/bench/generate_h200_calls.md).
    share_cache_across_paths: under "auto", give an EG-MLA cache the grouped layout whatever the path (the kernel
        path's plus 16 B of token groups per position), so that a call that changes path keeps the cache and the
        graphs captured for either path (else a change drops them; on an H200 a later call took 153 / 52 ms at batch
        32 / 4 against 207 / 100 ms, calls alternating between the two, docs/bench/generate_h200_switch.md). Kept
        steps are dropped whenever a path's precomputed tensors (gate tables, folded absorption) were rebuilt, as
        they are at the start of a call when a weight changed since (egmla/attention/precomputed.py).
    merged_products: on a GPU, run each layer's K/V-latent and query input products as one GEMM and SwiGLU's gate
        and up as one (0.82-0.97x the step on an H200, docs/bench/ab_h200_merged_products/) over concatenated
        copies of those weights (~106 MB for MLA kv64 at paper-base in bf16; `egmla plan` counts them); False keeps
        the separate products and no copies (`Transformer.set_merged_products`).
    overlap_host: queue each decode step before reading back the tokens it takes (they are already on the device),
        so that streaming, detokenizing and the stop checks of a step run on the host while the GPU runs the next,
        instead of the GPU waiting for them; the same tokens. A sequence that ends on an eos or a stop string has
        then appended one token more to its own cache row, never read (one wasted step where every sequence ends
        that way at once); a sequence ending by length never does. False: read, then queue (the old order).
    prefill_graphs: prefill fresh prompts (each from position 0 of an empty row; up to PREFILL_GRAPH_TOKENS tokens
        right-padded per call) through a fixed-shape step into a scratch cache whose rows are then copied, replayed
        from a CUDA graph per (rows, width) bucket where cuda_graphs (egmla/infer/prefill_step.py): an eager prefill
        costs 10-30 ms of host time on an H100 however few tokens it carries. Default: cuda_graphs; True without
        graphs runs the same step eagerly (the tests' check of the path on a CPU)."""

    def __init__(self, model, tokenizer=None, decode_path: str | None = "auto", cache_dtype=None,
                 offload_gate_tables: bool = False, prefill_token_budget: int = 32768,
                 cuda_graphs: bool | None = None, batch_buckets: Sequence[int] | None = None,
                 reuse_longer_cache: bool = True, share_cache_across_paths: bool = True, merged_products: bool = True,
                 overlap_host: bool = True, prefill_graphs: bool | None = None):
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget={prefill_token_budget}: must be >= 1")
        self.prefill_token_budget, self.reuse_longer_cache = prefill_token_budget, reuse_longer_cache
        self.share_cache_across_paths, self.overlap_host = share_cache_across_paths, overlap_host
        self.model, self.tokenizer = model.eval(), tokenizer
        model.set_merged_products(merged_products)  # False: no weight copies, 3-18% slower steps on a GPU
        self.config = model.config
        self.auto_path = decode_path == "auto" and model.tok_embeddings.weight.is_cuda
        if decode_path == "auto":
            decode_path = fastest_decode_path(self.config, self.device) if self.auto_path else model.decode_path
            decode_path = model.usable_decode_path(decode_path)  # wrapped weights (peft): the path calling modules
        # (re)build what the path precomputes from the weights (gate tables, folded absorption)
        model.set_decode_path(check_decode_path(self.config, decode_path or model.decode_path))
        self.decode_path = model.decode_path
        self.cache_dtype = checked_cache_dtype(cache_dtype)
        self.offload = GateTableOffload(model) if offload_gate_tables else None
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, not {self.device}")
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        buckets = batch_buckets if batch_buckets is not None else (DEFAULT_BUCKETS if self.cuda_graphs else ())
        if any(b < 1 for b in buckets):
            raise ValueError(f"batch_buckets={tuple(buckets)}: every bucket must be >= 1")
        self.batch_buckets = tuple(sorted(set(buckets)))
        self.last_stats: GenerationStats | None = None
        self.last_step: DecodeStep | None = None
        self._cache: KVCache | None = None  # kept between calls of the same shape, with its steps
        self._steps: dict[tuple, DecodeStep] = {}
        self._step_tokens: torch.Tensor | None = None  # `step_tokens`, made with the kept cache (`_cache_for`)
        self._steps_read = precomputed_tensors(model, self.cuda_graphs)  # what the kept steps' graphs read by address
        self.prefill_graphs = self.cuda_graphs if prefill_graphs is None else prefill_graphs
        self._prefill_steps: dict[tuple, PrefillStep] = {}
        self._prefill_scratch: KVCache | None = None  # what every prefill step writes into, like the kept cache
        self._prefill_pool = None  # the prefill graphs' shared memory pool
        self._cache_layout: str | None = None  # the decode path the kept cache was allocated for

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def release(self) -> None:
        """Free the cache and the captured graphs kept for the next call."""
        self._cache, self._steps, self.last_step, self._step_tokens = None, {}, None, None
        self._prefill_steps, self._prefill_scratch, self._prefill_pool = {}, None, None

    def drop_steps(self) -> None:
        """Forget the captured graphs (a precomputed tensor they read by address was rebuilt); the caches stay."""
        self._steps, self.last_step, self._prefill_steps = {}, None, {}
        self._prefill_pool = None  # a pool whose graphs are all gone cannot take a new capture (an allocator assert)

    # ---- input -----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], index: int = 0, max_len: int | None = None) -> list[int]:
        """Prompt token ids, checked: non-empty, within the context and the vocabulary. max_len: the positions a
        caller's rows hold (a server's --max-len), where fewer than the model's context: the error names that limit,
        the one that binds, not max_seq_len."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}] is text but the engine has no tokenizer: pass token ids "
                                 f"or GenerationEngine(model, tokenizer=...)")
            ids = self.tokenizer.encode(prompt).ids
        elif isinstance(prompt, numbers.Integral):  # generate([1, 2, 3]): one prompt of ids passed as the list
            raise ValueError(f"prompts[{index}]={prompt!r} is a token id, not a prompt: prompts is a list of prompts, "
                             f"each a string or a list of token ids; for one prompt of ids pass [[1, 2, 3]], not "
                             f"[1, 2, 3]")
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError(f"prompts[{index}] is empty: give at least one token of prompt")
        if max_len is not None and len(ids) > max_len and max_len < self.config.max_seq_len:
            raise ValueError(f"prompts[{index}] has {len(ids)} tokens, more than the max_len={max_len} positions per "
                             f"row: shorten it (or serve with a larger max_len, at most max_seq_len="
                             f"{self.config.max_seq_len})")
        if len(ids) > self.config.max_seq_len:
            raise ValueError(f"prompts[{index}] has {len(ids)} tokens, more than the model's context "
                             f"max_seq_len={self.config.max_seq_len}: shorten the prompt")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"prompts[{index}] has token ids outside [0, vocab_size={self.config.vocab_size}): "
                             f"min {min(ids)}, max {max(ids)}; check the tokenizer matches the model")
        return ids

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 64,
                 sampling: SamplingParams = SamplingParams(), eos_token_id: int | None = None,
                 stop_strings: Sequence[str] = (), on_token: Callable[[TokenEvent], None] | None = None,
                 logprobs: int | None = None) -> list[Generation]:
        """Generate for every prompt (text or token ids) as one batch; results in prompt order.

        logprobs: None (default): no log-probabilities, and no work for them. An int k in [0, vocab_size]: each
            result's `logprobs` holds every generated token's log-probability and `top_logprobs` the k most likely
            tokens of its step {id: log-probability} (empty for 0); the streamed events carry them too. As the
            Scheduler's: the model's own distribution (fp32 log_softmax of the logits), before temperature, top-k and
            top-p shape the sampling, so a sampled token's value is not the probability it was drawn with."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to see text: pass GenerationEngine(model, tokenizer=...)")
        logprobs = checked_logprobs(logprobs, self.config.vocab_size, f"the vocabulary's {self.config.vocab_size} tokens")
        prompt_ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        # text per token only for a caller that reads it (on_token) or stop strings that watch it
        sequences = [SequenceState(i, ids, self.tokenizer, list(stop_strings), text_per_token=on_token is not None)
                     for i, ids in enumerate(prompt_ids)]
        if logprobs is not None:
            for seq in sequences:
                seq.result.logprobs, seq.result.top_logprobs = [], []
        # The longest any sequence can get: its prompt plus all new tokens but the last (never fed back).
        cache_len = min(self.config.max_seq_len, max(len(ids) + max_new_tokens - 1 for ids in prompt_ids))
        with self.generating():
            self._run(sequences, cache_len, max_new_tokens, sampling, eos_token_id, on_token, logprobs)
        return [seq.result for seq in sequences]

    @contextlib.contextmanager
    def generating(self):
        """What the model runs under while generating, here and in the Scheduler (one place, so that a graph the
        scheduler captures ahead of time is the one its steps would capture): the model's device made current (graph
        capture, Triton launches and stream events use the current one), inference mode, the per-call input check off
        (`_inputs_unchecked`), the decode SDPA backends, and an offload's room kept by the caller. `prepare_cache`,
        `decode_step` and the steps run under it."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        managed = self.offload.managed_by_caller() if self.offload is not None else contextlib.nullcontext()
        with on_device, torch.inference_mode(), _inputs_unchecked(self.model), sdpa_kernel(DECODE_SDPA_BACKENDS), \
                managed:
            yield

    def _run(self, sequences: list[SequenceState], cache_len: int, max_new_tokens: int, sampling: SamplingParams,
             eos_token_id: int | None, on_token, logprobs: int | None = None) -> None:
        device, batch = self.device, len(sequences)
        cache = self.prepare_cache(batch, cache_len)
        if self.offload is not None:  # room for the prompts' ids (and padding's id 0) and the steps' new ids
            prompt_ids = len(set().union(*(seq.result.prompt_ids for seq in sequences)) | {0})
            rows = cache.batch_size  # each step feeds at most a bucket of tokens
            self.reset_offload_rows(rows, known_ids=prompt_ids, new_ids=rows * max(max_new_tokens - 1, 0))
        prompt_lengths = [len(seq.result.prompt_ids) for seq in sequences]
        generator = sampling.make_generator(device)
        _synchronize(device)
        start = time.perf_counter()
        last_logits = self._prefill([seq.result.prompt_ids for seq in sequences], cache)
        rows = list(range(batch))  # cache row -> index into sequences, None once that sequence has finished
        step_seconds: list[float] = []
        prefill_done = previous = step = step_appending = None
        graphed: set[bool] = set()  # use_graph of each step run
        while True:
            next_ids = select_next(last_logits[: len(rows)], sampling, generator)
            # computed now, before the next step runs: a CUDA graph's replay rewrites its logits in place
            read_scores = None if logprobs is None else _logprobs_to_host(last_logits[: len(rows)], next_ids, logprobs)
            # Run the next step ahead of reading its tokens back where it can be (`overlap_host`): the host then
            # streams, detokenizes and checks stops while the GPU runs it, instead of the GPU waiting on the host.
            ahead = self._ahead_appending(step, rows, sequences, max_new_tokens, cache_len)
            if ahead is not None and self._offload_moved(step.batch):  # room for the ids of a step that runs
                step = ahead = None  # the gate-row cache grew: its graph read the old rows (a new step runs below)
            read_ids = to_host_async(next_ids)  # the copy back is queued before the step, so it does not wait for it
            if ahead is not None:
                step.tokens[: len(rows), 0].copy_(next_ids)
                if ahead != step_appending:
                    step.set_n_new(ahead)
                    step_appending = ahead
                last_logits = step.run()
            host_ids = read_ids()  # the step's one host sync
            now = time.perf_counter()
            if prefill_done is None:
                prefill_done = now
            else:
                step_seconds.append(now - previous)
            previous = now
            scores = None if read_scores is None else read_scores()
            for row, token_id in enumerate(host_ids):
                if rows[row] is None:
                    continue
                sequence = sequences[rows[row]]
                event = sequence.append(token_id, eos_token_id, max_new_tokens, cache_len)
                if scores is not None:
                    event.logprob, event.top_logprobs = scores[row]
                    sequence.result.logprobs.append(event.logprob)
                    sequence.result.top_logprobs.append(event.top_logprobs)
                if on_token is not None:
                    on_token(event)
                if event.finish_reason is not None:
                    rows[row] = None
            live = [row for row, index in enumerate(rows) if index is not None]
            if not live:
                break
            if bucket_for(len(live), self.batch_buckets) < bucket_for(len(rows), self.batch_buckets):
                moved = torch.tensor(live, device=device)  # the live rows to the front of the cache
                cache.rows(0, len(rows)).compact(moved)
                next_ids, rows = next_ids[moved], [rows[row] for row in live]
                if ahead is not None:  # the step ran in the old bucket: its live rows' logits, moved likewise
                    last_logits = last_logits[moved]
                step = None
            if ahead is not None:
                continue  # its step ran already (a row that finished there appended a token nobody reads)
            if step is None or step.batch != bucket_for(len(rows), self.batch_buckets):
                step = self.decode_step(cache, bucket_for(len(rows), self.batch_buckets), max_new_tokens)
                step_appending = None
                graphed.add(step.use_graph)
            if self._offload_moved(step.batch):  # room for this step's ids, just before it runs
                step = self.decode_step(cache, step.batch, max_new_tokens)
                step_appending = None
            step.tokens[: len(rows), 0].copy_(next_ids)
            appending = [int(i is not None) for i in rows] + [0] * (step.batch - len(rows))
            if appending != step_appending:  # changes only when a sequence finishes or the step changes
                step.set_n_new(appending)
                step_appending = appending
            last_logits = step.run()
        if self.offload is not None and self.offload.on_device:
            self.offload.check()  # no id went past the rows kept for them
        self.last_step = step  # the decode step of the last bucket (benchmarks profile it)
        self.last_stats = GenerationStats(
            batch_size=batch, prompt_tokens=sum(prompt_lengths),
            generated_tokens=sum(len(seq.result.token_ids) for seq in sequences),
            prefill_seconds=prefill_done - start, decode_seconds=previous - prefill_done,
            step_seconds=step_seconds, cache_bytes=cache.nbytes(), cuda_graphs=graphed == {True},
            decode_path=self.decode_path)

    def reset_offload_rows(self, rows: int, known_ids: int = 0, new_ids: int | None = None) -> None:
        """The start of a batch of `rows` sequences under offloaded gate tables (nothing without): forget the resident
        rows of the last one, and keep room for `known_ids` ids (a call's prompts and padding's id 0) and for
        `new_ids` more where that takes little memory (then no step checks the count), else, and for None (a server,
        which cannot know them), for 1 / OFFLOAD_ROOM_DIVISOR of the vocabulary more (4 per row at least), checked as
        the steps go (`make_room`: a sync only when the count could pass it). Drops the steps where the rows moved."""
        offload = self.offload
        if offload is None:
            return
        offload.reset()
        slack = self._offload_slack(rows)
        moved = offload.reserve(known_ids + (slack if new_ids is None else min(new_ids, slack)))
        if known_ids:  # counted now; a server counts each forward's ids as they come (`make_room` before it)
            moved |= offload.make_room(known_ids)
        if moved:
            self.drop_steps()

    def _offload_slack(self, rows: int) -> int:
        """Rows of room kept beyond the ids known, for `rows` sequences' new ids (OFFLOAD_ROOM_DIVISOR)."""
        return max(self.offload.vocab_size // OFFLOAD_ROOM_DIVISOR, 4 * rows)

    def _offload_moved(self, batch: int) -> bool:
        """Before a decode step of `batch` rows under an offload: keep room for its ids; True (and the steps
        dropped) where the gate-row cache grew, which the captured steps read by address."""
        if self.offload is None or not self.offload.make_room(batch):
            return False
        self.drop_steps()
        return True

    def _ahead_appending(self, step: DecodeStep | None, rows: list, sequences: list[SequenceState], max_new_tokens: int,
                         cache_len: int) -> list[int] | None:
        """The rows' n_new for running `step` before its input tokens are read back, or None where it must wait for
        them: overlap off, no step yet (the first after the prompts, or a new bucket's), no row that would append,
        or rows ending by length that let the rest move to a smaller bucket first. A row that the token being read
        ends by length appends nothing (it may be at the cache's end); one that it ends by eos or a stop string
        appends once more, into its own row, which is never read again."""
        if not self.overlap_host or step is None:
            return None
        appending = [0] * step.batch
        for row, index in enumerate(rows):
            if index is not None:
                result = sequences[index].result
                length_ends = (len(result.token_ids) + 1 >= max_new_tokens
                               or len(result.prompt_ids) + len(result.token_ids) >= cache_len)
                appending[row] = int(not length_ends)
        continuing = sum(appending)
        if not continuing or bucket_for(continuing, self.batch_buckets) < bucket_for(len(rows), self.batch_buckets):
            return None
        return appending

    def _choose_path(self, batch: int, cache_len: int) -> None:
        """decode_path="auto": the fastest path for this call's batch and cache length, unless that is 'grouped' and
        its cache and working memory would not fit the device (`_grouped_fits`): then the fused kernel, which needs
        no per-id buffers. A change keeps the cache, its graphs and the gate tables where the cache serves the new
        path too (`share_cache_across_paths`), else drops them and rebuilds what the path precomputes."""
        path = self.model.usable_decode_path(fastest_decode_path(self.config, self.device, batch, cache_len))
        if path == "grouped" and not self._grouped_fits(bucket_for(batch, self.batch_buckets), cache_len):
            path = cuda_decode_path(self.config)
            warnings.warn(f"decode_path='auto': the grouped decode's cache and working memory for {batch} sequences "
                          f"of {cache_len} positions do not fit the free device memory; using '{path}' (slower at "
                          f"this size, no per-id buffers). `egmla plan --decode-path auto` sizes batches for it.",
                          RuntimeWarning, stacklevel=5)
        if path != self.model.decode_path:
            if self._cache is not None and not (self.share_cache_across_paths
                                                and _serves(self._cache, self.config, path)):
                self.release()
            # graphs kept for the other path read the gate tables: keep them (the weights have not changed); an
            # offload serves the same tables' rows to either path (its host copies are what it serves)
            self.model.set_decode_path(path, keep_precomputed=self._cache is not None or self.offload is not None)
        self.decode_path = path

    def _grouped_fits(self, rows: int, cache_len: int) -> bool:
        """Whether a grouped cache of `rows` x `cache_len` positions and a decode step's working memory at the most
        distinct ids there can be (`egmla.infer.plan.decode_workspace_bytes`) fit the device's free memory, the
        engine's kept cache counted as free (a new path drops it first)."""
        from egmla.accounting import measured_cache_bytes_per_token
        from egmla.infer.plan import decode_workspace_bytes

        model_dtype = self.model.tok_embeddings.weight.dtype
        dtype = cache_format(self.cache_dtype, model_dtype)
        item = model_dtype.itemsize  # the step's buffers are in the model's dtype, over an fp8 cache too (as `plan`)
        per_token, _ = measured_cache_bytes_per_token(self.config, dtype, "grouped")
        need = rows * (per_token * cache_len + decode_workspace_bytes(self.config, "grouped", cache_len, item))
        kept = self._cache.nbytes() if self._cache is not None else 0
        return need <= device_free_bytes(self.device) + kept

    # ---- the cache and the steps over it ----------------------------------------------------
    def prepare_cache(self, batch: int, cache_len: int) -> KVCache:
        """The start of a batch of `batch` sequences of up to `cache_len` positions (a `generate` call; a Scheduler
        opening its rows): under decode_path="auto" the path chosen for them, the kept steps dropped where what
        their graphs read was rebuilt since (`_drop_stale_steps`), and an empty cache of at least the batch's bucket
        of rows: the kept one where it fits (`_cache_for`). Its decode steps (`decode_step`) read their input tokens
        from `step_tokens`."""
        if self.auto_path:
            self._choose_path(batch, cache_len)
        self._drop_stale_steps()
        return self._cache_for(bucket_for(batch, self.batch_buckets), cache_len)

    @property
    def step_tokens(self) -> torch.Tensor | None:
        """[rows of the kept cache, 1]: the input tokens of every decode step over it, rows [0, batch) of this one
        buffer for each bucket (a caller that keeps each row's next token here feeds a step without copying them);
        None before `prepare_cache`."""
        return self._step_tokens

    @property
    def kept_cache_len(self) -> int | None:
        """Positions per row of the cache kept for the next call (what the last call ran on: at least its prompts and
        new tokens, longer where a shorter call reused a longer cache); None before the first call or after
        `release`."""
        return self._cache.max_len if self._cache is not None else None

    def _drop_stale_steps(self) -> None:
        """Drop the kept steps if a tensor their graphs read by address (`precomputed_tensors`: gate tables, folded
        absorption, merged weights) has been rebuilt since they were made, as it is when a weight changed in place;
        the tensors are built again here if so."""
        read = precomputed_tensors(self.model, self.cuda_graphs)
        if any(a is not b for a, b in zip(self._steps_read, read)):
            self.drop_steps()
        self._steps_read = read

    def _cache_for(self, rows: int, cache_len: int) -> KVCache:
        """An empty cache of at least `rows` sequences and `cache_len` positions: the one of the last call when it
        fits (its graphs stay valid), else a new one of exactly `cache_len` (dropping the old and its graphs
        first). A longer kept cache fits where the decode steps are graphs of a path that reads only each
        sequence's own positions (`reads_own_positions`): a shorter call then replays the graphs already captured
        instead of capturing its own; elsewhere the attention would pay for the unused positions, so the length
        must match."""
        cache = self._cache
        dtype = cache_format(self.cache_dtype, self.model.tok_embeddings.weight.dtype)
        longer_fits = self.reuse_longer_cache and self.cuda_graphs and reads_own_positions(self.config, self.decode_path)
        length_fits = cache is not None and (cache.max_len == cache_len or (longer_fits and cache.max_len > cache_len))
        if (not length_fits or cache.batch_size < rows or _cache_dtype(cache) != dtype
                or not _serves(cache, self.config, self.decode_path)):
            self.release()
            # under "auto", EG-MLA's grouped layout: it serves the kernel path too, so a change of path keeps it
            shared = self.share_cache_across_paths and self.auto_path and "grouped" in decode_paths(self.config)
            layout = "grouped" if shared else self.decode_path
            cache = self._cache = allocate_cache(self.config, rows, cache_len, dtype=dtype, device=self.device,
                                                 decode_path=layout)
            self._cache_layout = layout
            self._step_tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
        cache.reset()
        return cache

    def decode_step(self, cache: KVCache, batch: int, new_tokens_bound: int) -> DecodeStep:
        """The decode step over rows [0, batch) of `cache` (the one `prepare_cache` returned; its steps read their
        input tokens from `step_tokens`), kept for the next call. A graph of a path that reads the token groups
        (EG-MLA's grouped, the bias controls' absorbed) is sized for the distinct ids the sequences can reach during
        this call, each appending at most `new_tokens_bound` more tokens (generate: its max_new_tokens; the
        scheduler: a whole row, max_len): a kept graph sized for at least as many serves it (the smallest such), else
        one of this size is captured."""
        path = self.decode_path
        key: tuple = (path, batch)
        groups = cache.token_groups if self.reads_token_groups() else None
        use_graph = self.cuda_graphs and batch <= MAX_GRAPH_BATCH
        if groups is not None and use_graph:
            needed = groups.graph_distinct_bound(cache.max_len, new_tokens_bound)
            bound = min((k[2] for k in self._steps if len(k) == 3 and k[:2] == key and k[2] >= needed), default=needed)
            groups.host.plan_distinct = bound
            key = (path, batch, bound)
        if key not in self._steps:
            shared = cache is self._cache and batch <= cache.batch_size
            self._steps[key] = DecodeStep(self.model, cache, batch, use_graph,
                                          tokens=self._step_tokens[:batch] if shared else None)
        return self._steps[key]

    def prefill_step(self, rows: int, width: int, max_len: int) -> PrefillStep | None:
        """The prefill step that takes `rows` fresh prompts of at most `width` tokens into the kept cache (of `max_len`
        positions), or None (eager prefill) where prefill_graphs is off or no bucket takes them."""
        bucket = prefill_bucket(rows, width, max_len) if self.prefill_graphs and self._cache is not None else None
        if bucket is None:
            return None
        key = (self.decode_path, *bucket)
        if key not in self._prefill_steps:
            if self._prefill_scratch is None:
                self._prefill_scratch = allocate_cache(self.config, PREFILL_GRAPH_TOKENS // MIN_WIDTH, MIN_WIDTH,
                                                       dtype=_cache_dtype(self._cache), device=self.device,
                                                       decode_path=self._cache_layout)
            if self._prefill_pool is None and self.cuda_graphs:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            self._prefill_steps[key] = PrefillStep(self.model, self._prefill_scratch, *bucket, self.cuda_graphs,
                                                   self._prefill_pool)
        return self._prefill_steps[key]

    def reads_token_groups(self) -> bool:
        """The decode path reads the cache's token groups (EG-MLA's grouped, the bias controls' absorbed)."""
        return self.model.layers[0].attn.paths[self.decode_path].keeps_token_groups

    def _prefill(self, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        """Append prompt i to cache row i; logits [batch, vocab] at each prompt's last token.

        A prompt repeated in the batch (samples of one prompt) is prefilled once and its cache row copied.
        Rows go in groups whose prompts fit the token budget together, each group a whole-prompt forward
        (no K/V rebuilt twice); a prompt longer than the budget goes alone, in chunks of the budget."""
        first: dict[tuple[int, ...], int] = {}
        source = [first.setdefault(tuple(p), len(first)) for p in prompts]  # unique prompt of each row
        unique = [list(p) for p in first]
        logits = self._prefill_unique(unique, cache)
        if len(unique) < len(prompts):
            # The unique prompts sit in rows [0, U), prompt i belongs in row i, and source[i] <= i: fill
            # rows [U, batch) at once, then rows below U from the top down, so no source is overwritten first.
            beyond = torch.arange(len(unique), len(prompts))
            cache.copy_rows(torch.tensor(source)[beyond], beyond)
            for row in reversed([i for i in range(len(unique)) if source[i] != i]):
                cache.copy_rows(torch.tensor([source[row]]), torch.tensor([row]))
            logits = logits[torch.tensor(source, device=logits.device)]
        return logits

    def _prefill_unique(self, prompts: list[list[int]], cache: KVCache) -> torch.Tensor:
        device, budget = self.device, self.prefill_token_budget
        lengths = [len(p) for p in prompts]
        logits = []
        start = 0
        while start < len(prompts):
            stop = start + 1
            while stop < len(prompts) and (stop + 1 - start) * max(lengths[start:stop + 1]) <= budget:
                stop += 1
            width = max(lengths[start:stop])
            tokens = padded_rows(prompts[start:stop], width)  # right-padded with id 0
            chunk = max(1, budget // (stop - start))
            step = self.prefill_step(stop - start, width, cache.max_len) if width <= chunk else None
            if step is not None:  # the rows are empty (the cache was reset): a fixed-shape step, from a CUDA graph
                logits.append(step.prefill(cache, start, tokens, torch.tensor(lengths[start:stop]),
                                           self.reads_token_groups()))
                start = stop
                continue
            tokens, rows = tokens.to(device), cache.rows(start, stop)
            group_lengths = torch.tensor(lengths[start:stop], device=device)
            picked = None  # each row's logits at its last prompt token, from the chunk that holds it
            for column in range(0, width, chunk):
                piece = tokens[:, column:column + chunk]
                last = (group_lengths - 1 - column).clamp(0, piece.shape[1] - 1)
                out = self.model(piece, rows, n_new=(group_lengths - column).clamp(0, piece.shape[1]),
                                 logits_at=last)[:, 0]
                ends_here = (group_lengths - 1 >= column) & (group_lengths - 1 < column + piece.shape[1])
                picked = out if picked is None else torch.where(ends_here[:, None], out, picked)
            logits.append(picked)
            start = stop
        return torch.cat(logits)


def precomputed_tensors(model, cuda_graphs: bool) -> list:
    """The tensors each layer's decode path precomputed from the weights (gate table, folded absorption, the table
    controls' folded decode weights and, for steps replayed from CUDA graphs, the merged products' concatenated
    weights: each built again here if a weight changed in place since), which captured graphs read by address. The
    merged weights are built here, before any capture, so that a graph reads the ones the next call compares."""
    for layer in model.layers:
        if hasattr(layer.attn, "refresh_gate_table"):
            layer.attn.refresh_gate_table()
    read = [t for layer in model.layers
            for t in (getattr(layer.attn, "gate_table", None),
                      layer.attn.folded_weights() if hasattr(layer.attn, "folded") else None,
                      *_absorbed_table_weights(layer.attn))]
    return read + (model.merged_product_weights() if cuda_graphs else [])


def _absorbed_table_weights(attn) -> tuple:
    """The table controls' folded decode weights where their `absorbed` path reads them (else nothing)."""
    if not (isinstance(attn, TableBiasMLA) and attn.decode_path == "absorbed"):
        return ()
    weights = attn.absorbed_weights()
    return weights.query, weights.output


def _serves(cache: KVCache, config, path: str) -> bool:
    """Whether `cache` holds everything decode path `path` reads (it may hold more)."""
    spec = attention_class(config).cache_spec(config, path)
    buffers = cache.layers[0].buffers
    return (all(name in buffers for name in spec.tensors) and (not spec.needs_token_ids or cache.token_ids is not None)
            and (not spec.needs_token_groups or cache.token_groups is not None))


def _cache_dtype(cache: KVCache):  # a torch dtype or Fp8KeepRope
    return cache.dtype


@contextlib.contextmanager
def _inputs_unchecked(model):
    """The engine checks prompt ids once and samples ids < vocab_size, so the model's per-call
    token-range check (a host sync) is switched off while generating."""
    saved, model.check_inputs = model.check_inputs, False
    try:
        yield
    finally:
        model.check_inputs = saved


def _logprobs_to_host(logits: torch.Tensor, ids: torch.Tensor,
                      top: int) -> Callable[[], list[tuple[float, dict[int, float]]]]:
    """Each row's chosen-token log-probability and its `top` most likely tokens {id: log-probability}
    (`token_logprobs`): computed on the device now, read back when the returned function is called
    (`to_host_async`)."""
    reads = [to_host_async(t) for t in token_logprobs(logits, ids, top)]

    def read() -> list[tuple[float, dict[int, float]]]:
        chosen, values, indices = (read_one() for read_one in reads)
        return [(logprob, dict(zip(top_ids, top_values)))
                for logprob, top_values, top_ids in zip(chosen, values, indices)]

    return read


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
