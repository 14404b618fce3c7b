"""Batched generation over a preallocated compressed KV cache.

    prefill   prompts of different lengths, right-padded to [batch, longest] and fed in chunks of
              at most `prefill_token_budget` tokens per call (bounding activation memory), with
              n_new = each row's true tokens in the chunk: each cache then holds exactly its prompt
    decode    one token per live sequence per step, each appended at its own length; a sequence that
              ends (EOS, stop string, max_new_tokens, context) leaves the batch: its cache row is
              dropped, so attention work follows the live sequences only

The cache layout is the variant's own (K/V for MHA/GQA, c_t + k^R_t for MLA/EG-MLA, plus token ids
for EG-MLA), allocated once for the batch at the length the batch can reach. Any decode path the
model supports can be chosen; they give the same tokens (tests check it against full recompute).
Per step the engine itself syncs with the host once (the new ids, needed for EOS, stop strings and
streaming). On CUDA, SDPA's cuDNN backend is left out while generating: it builds an execution plan
for every new key length (milliseconds of host time each), which a decode loop meets at every step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from egmla.attention import KVCache, check_decode_path
from egmla.infer.offload import GateTableOffload
from egmla.infer.sampling import SamplingParams, select_next
from egmla.infer.text import IncrementalDetokenizer, StopStringMatcher


# Every SDPA backend but cuDNN (see the module docstring); PyTorch picks the fastest that applies.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Generation:
    """One sequence's result. `index` is its position in the prompts passed to generate()."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids (with the EOS id if it ended so)
    text: str | None = None  # generated text (None without a tokenizer), cut before a stop string
    finish_reason: str | None = None  # "eos" | "stop" | "length"


@dataclass
class TokenEvent:
    """Passed to the streaming callback for every generated token."""

    index: int  # which sequence
    token_id: int
    text: str  # text completed by this token ("" while a character or a possible stop string is pending)
    finish_reason: str | None  # set on the sequence's last token


@dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float  # prompts in, first token of every sequence out
    decode_seconds: float  # every later token
    step_seconds: list[float]  # per decode step, host sync to host sync
    cache_bytes: int  # the preallocated cache

    @property
    def decode_tokens_per_second(self) -> float:
        decode_tokens = self.generated_tokens - self.batch_size
        return decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class _Sequence:
    """Per-sequence generation state."""

    def __init__(self, index: int, prompt_ids: list[int], tokenizer, stop_strings: list[str]):
        self.result = Generation(index, prompt_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stops = StopStringMatcher(stop_strings)
        self.decoded_chars = 0  # characters the detokenizer has produced so far

    def append(self, token_id: int, eos_token_id: int | None, max_new_tokens: int, cache_len: int) -> TokenEvent:
        result = self.result
        result.token_ids.append(token_id)
        text, stopped = self._text_of(token_id)
        if stopped:
            result.finish_reason = "stop"
        elif token_id == eos_token_id:
            result.finish_reason = "eos"
        elif (len(result.token_ids) >= max_new_tokens
              or len(result.prompt_ids) + len(result.token_ids) - 1 >= cache_len):  # no room to feed it
            result.finish_reason = "length"
        if result.finish_reason is not None and self.detokenizer is not None:
            text += self._finish_text(stopped)
        return TokenEvent(result.index, token_id, text, result.finish_reason)

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


class GenerationEngine:
    """Generate from a `Transformer` with its KV cache.

    decode_path: any of `egmla.attention.decode_paths(model.config)` (default: the model's current one).
    cache_dtype: dtype of the cache tensors (default: the model's).
    offload_gate_tables: keep EG-MLA gate tables in host memory (see egmla.infer.offload).
    prefill_token_budget: prompt tokens (summed over the batch) per prefill call."""

    def __init__(self, model, tokenizer=None, decode_path: str | None = None, cache_dtype=None,
                 offload_gate_tables: bool = False, prefill_token_budget: int = 8192):
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget={prefill_token_budget}: must be >= 1")
        self.prefill_token_budget = prefill_token_budget
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        if decode_path is not None:
            model.set_decode_path(check_decode_path(self.config, decode_path))
        self.decode_path = model.decode_path
        self.cache_dtype = cache_dtype
        self.offload = GateTableOffload(model) if offload_gate_tables else None
        self.last_stats: GenerationStats | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ---- input -----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], index: int = 0) -> list[int]:
        """Prompt token ids, checked: non-empty, within the context and the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}] is text but the engine has no tokenizer: pass token ids "
                                 f"or GenerationEngine(model, tokenizer=...)")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError(f"prompts[{index}] is empty: give at least one token of prompt")
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
                 stop_strings: Sequence[str] = (),
                 on_token: Callable[[TokenEvent], None] | None = None) -> list[Generation]:
        """Generate for every prompt (text or token ids) as one batch; results in prompt order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to see text: pass GenerationEngine(model, tokenizer=...)")
        prompt_ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        sequences = [_Sequence(i, ids, self.tokenizer, list(stop_strings)) for i, ids in enumerate(prompt_ids)]
        # The longest any sequence can get: its prompt plus all new tokens but the last (never fed back).
        cache_len = min(self.config.max_seq_len, max(len(ids) + max_new_tokens - 1 for ids in prompt_ids))
        with torch.inference_mode(), _inputs_unchecked(self.model), sdpa_kernel(DECODE_SDPA_BACKENDS):
            self._run(sequences, cache_len, max_new_tokens, sampling, eos_token_id, on_token)
        return [seq.result for seq in sequences]

    def _run(self, sequences: list[_Sequence], cache_len: int, max_new_tokens: int, sampling: SamplingParams,
             eos_token_id: int | None, on_token) -> None:
        device, batch = self.device, len(sequences)
        if self.offload is not None:
            self.offload.reset()
        cache = self.model.new_cache(batch, cache_len, dtype=self.cache_dtype)
        cache_bytes = cache.nbytes()
        prompt_lengths = [len(seq.result.prompt_ids) for seq in sequences]
        tokens = torch.zeros(batch, max(prompt_lengths), dtype=torch.long)  # right-padded with id 0
        for row, seq in enumerate(sequences):
            tokens[row, : prompt_lengths[row]] = torch.tensor(seq.result.prompt_ids)
        lengths = torch.tensor(prompt_lengths, device=device)
        generator = sampling.make_generator(device)
        _synchronize(device)
        start = time.perf_counter()
        last_logits = self._prefill(tokens.to(device), lengths, cache)
        live = list(range(batch))  # cache row -> index into sequences
        step_seconds: list[float] = []
        prefill_done = previous = None
        while True:
            next_ids = select_next(last_logits, sampling, generator)
            host_ids = next_ids.tolist()  # the step's one host sync
            now = time.perf_counter()
            if prefill_done is None:
                prefill_done = now
            else:
                step_seconds.append(now - previous)
            previous = now
            keep = []
            for row, token_id in enumerate(host_ids):
                event = sequences[live[row]].append(token_id, eos_token_id, max_new_tokens, cache_len)
                if on_token is not None:
                    on_token(event)
                if event.finish_reason is None:
                    keep.append(row)
            if not keep:
                break
            if len(keep) < len(live):
                rows = torch.tensor(keep, device=device)
                keep_cache_rows(cache, rows)
                next_ids = next_ids[rows]
                live = [live[row] for row in keep]
            last_logits = self.model(next_ids[:, None], cache)[:, -1]
        self.last_stats = GenerationStats(
            batch_size=batch, prompt_tokens=sum(prompt_lengths),
            generated_tokens=sum(len(seq.result.token_ids) for seq in sequences),
            prefill_seconds=prefill_done - start, decode_seconds=previous - prefill_done,
            step_seconds=step_seconds, cache_bytes=cache_bytes)


    def _prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed right-padded prompts [batch, longest] in chunks; logits [batch, vocab] at each last prompt token.

        A row whose prompt ended in an earlier chunk gets n_new = 0: its padding is written past its
        length (overwritten later, never attended to) and its length stays."""
        batch, longest = tokens.shape
        width = max(1, self.prefill_token_budget // batch)
        last_index, rows = lengths - 1, torch.arange(batch, device=tokens.device)
        last_logits = None
        for start in range(0, longest, width):
            piece = tokens[:, start:start + width]
            logits = self.model(piece, cache, n_new=(lengths - start).clamp(0, piece.shape[1]))
            in_piece = (last_index >= start) & (last_index < start + piece.shape[1])
            picked = logits[rows, (last_index - start).clamp(0, piece.shape[1] - 1)]
            last_logits = picked if last_logits is None else torch.where(in_piece[:, None], picked, last_logits)
        return last_logits


def keep_cache_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep only the cache rows `rows` (sorted, int64 on the cache's device), moved to the front, in place.

    The preallocated storage is reused (the cache becomes a view of its first len(rows) rows), so
    dropping finished sequences never allocates a second cache."""
    kept = rows.numel()

    def compact(buffer: torch.Tensor) -> torch.Tensor:
        buffer[:kept] = buffer.index_select(0, rows)
        return buffer[:kept]

    for layer in cache.layers:
        for name, buffer in layer.buffers.items():
            layer.buffers[name] = compact(buffer)
    cache.lengths = compact(cache.lengths)
    if cache.token_ids is not None:
        cache.token_ids = compact(cache.token_ids)
    if getattr(cache, "token_groups", None) is not None:  # decode path 'grouped' (egmla/attention/grouped.py)
        cache.token_groups.keep_rows(rows)
    cache.batch_size = kept


@contextlib.contextmanager
def _inputs_unchecked(model):
    """The engine checks prompt ids once and samples ids < vocab_size, so the model's per-call
    token-range check (a host sync) is switched off while generating."""
    saved, model.check_inputs = model.check_inputs, False
    try:
        yield
    finally:
        model.check_inputs = saved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
