"""Next-token selection: greedy, or sampling with temperature, top-k and top-p (nucleus).

All of it runs on the logits' device without host syncs; a seeded `torch.Generator` makes the draws
reproducible (same seed, same model, same batch => same samples). Beside it, the small copies between host and
device that the decode loops make without waiting for the stream (`to_device_async`, `host_to_device`,
`to_host_async`), and `long_tensor`, the host's fast way from Python ints to a tensor.
"""
from __future__ import annotations

import array
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): the logits over a float32-subnormal or zero
# temperature are infinite, their probabilities NaN, and the draw of a whole decode step raised, failing every
# request running with this one.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax), as is any below GREEDY_BELOW (stored as 0.0); top_k 0 and top_p 1.0 switch
    those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:  # inf divides every logit to 0: uniform draws, not a setting
            raise ValueError(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k):  # a float or bool would be taken here and raise only at the draw (topk)
            raise ValueError(f"top_k={self.top_k!r}: must be an int >= 0 (0 = no top-k filter)")
        if self.seed is not None and not _is_int(self.seed):  # likewise at the draw (manual_seed)
            raise ValueError(f"seed={self.seed!r}: must be an int, or None for a stream seeded at random")
        object.__setattr__(self, "top_k", int(self.top_k))  # frozen; a numpy int becomes a Python one
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
            if not -2**63 <= self.seed < 2**64:  # else manual_seed raises at admission, failing the requests beside it
                raise ValueError(f"seed={self.seed}: must lie in [-2**63, 2**64) (torch.Generator's seeds)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must lie in (0, 1] (1 = no nucleus filter)")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)  # frozen: equal to the greedy settings, draws none

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed if generator.device.type != "cpu" else _cpu_seed(self.seed))
        return generator


def _cpu_seed(seed: int) -> int:
    """torch's CPU generator keeps 32 bits of a seed (seed and seed + 2**32 drew alike): a seed past them is mixed
    down to 32 bits (splitmix64's finaliser), one in [0, 2**32) kept as it is."""
    if 0 <= seed < 2**32:
        return seed
    mask = 2**64 - 1
    mixed = seed & mask
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & mask
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & mask
    return (mixed ^ (mixed >> 31)) >> 32


def checked_logprobs(logprobs, most: int, most_said: str) -> int | None:
    """A `logprobs` argument (the engine's, the scheduler's): None, or an int in [0, most]. A bool is refused (OpenAI's
    chat `logprobs` is one, and True would silently mean 1), and a float here, not at the step's topk, where it would
    fail every request running beside it. most_said: how `most` reads in the error."""
    if logprobs is None:
        return None
    fix = f"give the number of most likely tokens to list per step, 0 to {most} (0: the chosen token's alone), or None"
    if isinstance(logprobs, bool):
        raise ValueError(f"logprobs={logprobs}: a bool, not a count; {fix}")
    if not _is_int(logprobs):
        raise ValueError(f"logprobs={logprobs!r}: not an int; {fix}")
    if logprobs < 0:
        raise ValueError(f"logprobs={logprobs}: negative; {fix}")
    if logprobs > most:
        raise ValueError(f"logprobs={logprobs}: more than {most_said}; {fix}")
    return int(logprobs)


def _is_int(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_device_async(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without waiting: a copy from pageable memory waits for
    the stream, i.e. for the decode step queued ahead, which would undo the overlap of host and device (the caching
    host allocator keeps the pinned buffer until the copy has run)."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def long_tensor(values) -> torch.Tensor:
    """A sequence of ints as an int64 host tensor, through an `array.array`'s buffer: ~10x faster than
    `torch.tensor(list)` (~200 µs for a prompt of 1,024 ids on a CPU core), which the scheduler's thread
    paid per row of every prefill."""
    if not len(values):
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def padded_rows(rows: Sequence, width: int) -> torch.Tensor:
    """Sequences of ints as one right-padded int64 host tensor [len(rows), width], zeros past each row's end: one
    buffer filled by slice copies (a memcpy per row where the row is an `array('q')`), not a tensor per row written
    into a zero tensor. For 32 prompts of 512-1,024 ids kept as arrays (the scheduler's prefill inputs) that took
    0.04-0.05 ms against 0.72-0.84 ms of host time on a CPU core (docs/bench/prefill_inputs_cpu)."""
    count = len(rows)
    if not count or not width:
        return torch.zeros(count, width, dtype=torch.long)
    flat = array.array("q", bytes(8 * count * width))
    for i, ids in enumerate(rows):
        if len(ids) > width:
            raise ValueError(f"row {i}: {len(ids)} ids do not fit a width of {width}")
        flat[i * width: i * width + len(ids)] = ids if isinstance(ids, array.array) and ids.typecode == "q" \
            else array.array("q", ids)
    return torch.frombuffer(flat, dtype=torch.long).view(count, width)


def host_to_device(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the stream (`to_device_async`)."""
    return to_device_async(long_tensor(values) if dtype == torch.long else torch.tensor(values, dtype=dtype), device)


def to_host_async(values: torch.Tensor) -> Callable[[], list]:
    """A function returning `values` as a list: on CUDA, from a copy into pinned memory queued now and waited for when
    it is called (work queued in between does not delay it); elsewhere, read now."""
    if not values.is_cuda:
        read_now = values.tolist()
        return lambda: read_now
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)  # queued on values' device's current stream: the event goes there too
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(values.device))

    def read() -> list:
        copied.synchronize()
        return host.tolist()

    return read


@functools.lru_cache(maxsize=64)
def _settings_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-row settings (temperatures, top-k positions, top-p bounds, masks) on the device, kept: a batch samples with
    the same settings step after step, so that each step does not copy them again (read-only; never written)."""
    return host_to_device(list(values), dtype, device)


def _settings(values: list, dtype: torch.dtype, device) -> torch.Tensor:
    return _settings_tensor(tuple(values), dtype, torch.device(device))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [batch, vocab] with everything outside the top-k and outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability sums to >= top_p; the most
    likely token is always kept."""
    return filter_rows(logits, [top_k] * logits.shape[0], [top_p] * logits.shape[0])


def filter_rows(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """`filter_logits` with settings of each row's own (top_k[i], top_p[i]; 0 and 1.0 = that filter off): one
    top-k and one sort over the batch whatever the mix of settings, each row filtered exactly as alone."""
    vocab = logits.shape[-1]
    cut = [k if 0 < k < vocab else 0 for k in top_k]
    if any(cut):
        values = torch.topk(logits, max(cut), dim=-1).values
        # a row's k-th largest value; -inf (no cut) where its top-k is off
        kth = values.gather(-1, _settings([max(k, 1) - 1 for k in cut], torch.long, logits.device)[:, None])
        if not all(cut):
            kth = kth.masked_fill(_settings([k == 0 for k in cut], torch.bool, logits.device)[:, None],
                                  float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)  # in fp32 whatever the logits': bf16 rounds top_p 0.95 to 0.949
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= _settings(top_p, probs.dtype, logits.device)[:, None]
        drop_sorted[..., 0] = False
        if not all(p < 1.0 for p in top_p):  # a row whose nucleus is off keeps everything (rounding could reach 1)
            drop_sorted &= _settings([p < 1.0 for p in top_p], torch.bool, logits.device)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [rows, vocab] to draw from, each row under its own (non-greedy) settings: the logits in fp32
    over the row's temperature, then its top-k and top-p filters, then softmax."""
    temperature = _settings([p.temperature for p in params], torch.float32, logits.device)
    scaled = logits.float() / temperature[:, None]
    return filter_rows(scaled, [p.top_k for p in params], [p.top_p for p in params]).softmax(dim=-1)


def select_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [batch] (int64) from last-position logits [batch, vocab]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, [params] * logits.shape[0])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                shared: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [rows] where every row has its own settings (params[i]) and random stream (generators[i], or
    None for `shared`): greedy rows by argmax, the others filtered in one pass (`sampling_probs`), the rows without a
    stream of their own drawn together, and each row with one drawn alone, so that it gets what `select_next` gives
    its logits alone with that generator (a server's seeded requests: the same text whatever else runs). A batch of
    mixed settings costs one filter and one draw per seeded row, not a whole sampling per setting."""
    ids = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return ids
    index = host_to_device(sampled, torch.long, logits.device)
    every = len(sampled) == len(params)
    probs = sampling_probs(logits if every else logits[index], [params[i] for i in sampled])
    drawn = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
    together = [j for j, i in enumerate(sampled) if generators[i] is None]
    if together:
        rows = host_to_device(together, torch.long, logits.device)
        drawn[rows] = torch.multinomial(probs[rows], 1, generator=shared).squeeze(-1)
    for j, i in enumerate(sampled):
        if generators[i] is not None:
            drawn[j] = torch.multinomial(probs[j: j + 1], 1, generator=generators[i])[0, 0]
    if every:
        return drawn
    ids[index] = drawn
    return ids


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor,
                   top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution at each row: fp32 log_softmax of the raw logits [rows, vocab],
    before temperature, top-k and top-p shape the sampling (vLLM's default, what `Scheduler.submit(logprobs=)` serves).
    Returns the chosen ids' [rows] and the `top` most likely tokens' [rows, top] (values, ids), on the device, without
    a host sync."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, ids[:, None])[:, 0]
    values, indices = logprobs.topk(top, dim=-1)
    return chosen, values, indices
