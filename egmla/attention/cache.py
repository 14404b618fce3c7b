"""KV cache containers and byte accounting.

Each attention class declares what it caches per token and layer (`cache_spec`); `KVCache`
preallocates exactly those tensors for a batch, plus the token ids (one int32 per position, shared by all
layers) when a variant needs them (EG-MLA rebuilds its gates from ids), plus the token groups of EG-MLA's
decode path 'grouped' and the bias controls' 'absorbed', plus a per-sequence counter where a layer keeps norm
statistics. `lengths[b]` is how many positions of sequence b are filled; appends land at `lengths[b] + i`, so
sequences of different lengths share one batch.

The cache owns its rows: every buffer it holds is either per position ([batch, max_len, ...]) or per
sequence ([batch]), and `select_rows`, `compact`, `copy_rows`, `rows`, `reshaped`, `grow` and `copy_prefix`
walk all of them through one method, `_map`, so a new buffer is covered there by registering it once.
`truncate`, `reset`, `reset_rows` and `keep_prefix` touch only the per-sequence state (lengths, counters, token
groups); `take_rows` copies the layers' buffers and the token ids by hand and leaves the token groups to the
caller.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

# fn(tensor, per_position) -> tensor: how `_map` transforms one buffer
TensorMap = Callable[[torch.Tensor, bool], torch.Tensor]

# An fp8 cache (dtype=torch.float8_e4m3fn): the tensors a layer keeps in the cache's dtype (a spec dtype of None) are
# stored in 1 byte each, saturated at +-448 (e4m3fn has no infinity) and rounded to nearest; readers widen them to the
# model's dtype as they read. The storage is uint8 (every row operation below has uint8 kernels, not all have fp8
# ones), typed as fp8 by `LayerCache.tensor` and `read`. Explicitly typed tensors (EG-MLA's fp32 statistics) stay so.
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# The cached tensors that hold RoPE-rotated keys: the latent variants' k_rope, MHA's and GQA's k.
ROPE_TENSORS = frozenset({"k_rope", "k"})


@dataclass(frozen=True)
class Fp8KeepRope:
    """The cache format `fp8-keep-rope`, given as a cache's dtype: every tensor of the model's dtype in fp8 except the
    RoPE keys (ROPE_TENSORS), kept in `rope` (the model's dtype), as DeepSeek-V3.2's fp8 cache keeps its RoPE part in
    bf16. The RoPE keys' rounding is nearly all of an fp8 cache's cost in KL (docs/bench/fp8_tensors_cpu); EG-MLA
    kv64 then stores 64 + 2 x 64 = 192 bytes per token and layer, against 128 in fp8 and 256 in bf16."""

    rope: torch.dtype

    def __str__(self) -> str:
        return FP8_KEEP_ROPE


FP8_KEEP_ROPE = "fp8-keep-rope"  # as users spell it (--cache-dtype, cache_dtype=)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` holds it: for fp8 clamped to +-448, then rounded (the append kernels' rule,
    egmla/kernels/fp8.py); otherwise cast."""
    if dtype == FP8:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x.to(dtype)


@dataclass(frozen=True)
class CacheSpec:
    """What one layer caches per token: name -> (trailing shape, dtype or None for the model dtype)."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    needs_token_ids: bool = False
    needs_token_groups: bool = False  # positions grouped by token id (EG-MLA 'grouped', the bias controls' 'absorbed')


class LayerCache:
    """One layer's cache tensors, each [batch, max_len, *shape], in `dtype` unless the spec names another. dtype FP8:
    stored as described above; `read` and `tensor` return them as fp8. dtype Fp8KeepRope: the same but the RoPE keys
    in its `rope` dtype. fp8_tensors (a cache in the model's dtype): only these tensors in fp8, the rest in `dtype` (a
    measurement of which tensor's rounding costs what, `egmla bench fp8-loss --fp8-tensors`)."""

    def __init__(self, spec: CacheSpec, batch_size: int, max_len: int, dtype, device,
                 fp8_tensors: frozenset[str] = frozenset()):
        keep_rope = isinstance(dtype, Fp8KeepRope)
        self.fp8 = frozenset(name for name, (_, buf_dtype) in spec.tensors.items()
                             if buf_dtype is None and (dtype == FP8 or name in fp8_tensors
                                                       or (keep_rope and name not in ROPE_TENSORS)))
        wide = dtype.rope if keep_rope else dtype
        self.buffers = {
            name: torch.zeros(batch_size, max_len, *shape, device=device,
                              dtype=torch.uint8 if name in self.fp8 else buf_dtype or wide)
            for name, (shape, buf_dtype) in spec.tensors.items()
        }

    def tensor(self, name: str) -> torch.Tensor:
        """The whole buffer [batch, max_len, ...] as its dtype (fp8 where stored so), for kernels that write or read it."""
        buffer = self.buffers[name]
        return buffer.view(FP8) if name in self.fp8 else buffer

    def write(self, positions: torch.Tensor, rows: torch.Tensor | None = None, **values: torch.Tensor) -> None:
        """Store values [batch, seq, ...] at positions [batch, seq]; rows: the [batch, 1] arange of the sequences
        (the model builds it once per forward, AttnContext.batch_rows), else built here."""
        if rows is None:
            rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        for name, value in values.items():
            buffer = self.buffers[name]
            buffer[rows, positions] = (quantize(value, FP8).view(torch.uint8) if name in self.fp8
                                       else value.to(buffer.dtype))

    def read(self, name: str, length: int) -> torch.Tensor:
        """Positions [0, length) of every sequence, a view, as stored (fp8 in an fp8 cache: widen with `.to`)."""
        return self.tensor(name)[:, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def _map(self, fn: TensorMap) -> None:
        self.buffers = {name: fn(buffer, True) for name, buffer in self.buffers.items()}


@dataclass
class GroupsHostState:
    """What the host knows of a TokenGroups without a sync (shared by every row view of one cache)."""

    unregistered: bool = False  # set when tokens were appended on a path that does not keep the groups up
    # An upper bound on n_distinct.max(): raised to it by a prefill (kept if larger), +1 per decode step. Graph-
    # captured decode sizes the grouped kernels' buffers from it instead of reading n_distinct back.
    distinct_bound: int = 0
    # A larger bound the generation engine sets before capturing a CUDA graph, so that one graph serves
    # every step of a generation (the distinct ids grow while the graph replays, unseen by the host).
    plan_distinct: int = 0


class TokenGroups:
    """Per sequence: the distinct token ids in order of first appearance, and each position's slot
    (EG-MLA decode path 'grouped', docs/grouped-decode.md, and the bias controls' 'absorbed').

    `distinct_ids[b, :n_distinct[b]]` are sequence b's distinct ids; `slots[b, t]` is the index of
    position t's id among them, for t < lengths[b] (the positions registered so far); `counts[b, s]` is
    how many positions slot s has and `ranks[b, t]` is position t's index among them, so positions can
    be laid out grouped by id without sorting (offset of the slot + rank). Appends only add:
    a decode step compares the new id with the distinct ids (no host sync), a prefill dedups its
    chunk per sequence. Kept in the KVCache next to the token ids, shared by every layer.

    Only the first n_new[b] tokens of an append are registered: right-padding of a ragged prefill is
    not part of the sequence (it is overwritten later), so it never creates a group.
    """

    # [batch, max_len] int32: slots and ranks by position, distinct_ids and counts by slot (at most max_len slots)
    PER_POSITION = ("slots", "distinct_ids", "counts", "ranks")
    PER_SEQUENCE = ("n_distinct", "lengths")  # [batch] int64

    def __init__(self, batch_size: int, max_len: int, device=None):
        for name in self.PER_POSITION:
            setattr(self, name, torch.zeros(batch_size, max_len, dtype=torch.int32, device=device))
        for name in self.PER_SEQUENCE:
            setattr(self, name, torch.zeros(batch_size, dtype=torch.long, device=device))
        self.host = GroupsHostState()  # shared with row views (KVCache.rows)
        self.version = 0  # bumped on every change, so per-step plans derived from it can be memoised
        self._plan = None  # (key, GroupedPlan): the kernels' layout, shared by all layers of a step

    def plan(self, block_t: int, vocab_size: int | None = None, bounds: tuple[int, int] | None = None):
        """The Triton kernels' per-step layout (egmla.kernels.grouped_decode.make_plan), built once per step.
        `bounds` = (positions, distinct ids) fixes the layout's sizes without a host sync (graph capture)."""
        key = (self.version, block_t, bounds)
        if self._plan is None or self._plan[0] != key:
            from egmla.kernels.grouped_decode import make_plan

            self._plan = (key, make_plan(self, block_t, vocab_size, bounds))
        return self._plan[1]

    def graph_distinct_bound(self, max_len: int, new_tokens: int) -> int:
        """The distinct-id bound a CUDA graph of the grouped (or bias-control absorbed) step is sized for, so
        that one graph serves `new_tokens` more steps: the host's bound plus the new tokens, rounded up to 256
        (fewer distinct graphs), at most max_len. GenerationEngine sets host.plan_distinct to it."""
        needed = min(max_len, self.host.distinct_bound + new_tokens + 1)
        return min(max_len, -(-needed // 256) * 256)

    def reset(self) -> None:
        self.counts.zero_()
        self.n_distinct.zero_()
        self.lengths.zero_()
        self.host.unregistered, self.host.distinct_bound, self.host.plan_distinct = False, 0, 0
        self.version += 1

    def nbytes(self) -> int:
        per_position = [getattr(self, name) for name in self.PER_POSITION]  # like KVCache: no per-sequence scalars
        return sum(t.numel() * t.element_size() for t in per_position)

    def _map(self, fn: TensorMap) -> None:
        for name in self.PER_POSITION:
            setattr(self, name, fn(getattr(self, name), True))
        for name in self.PER_SEQUENCE:
            setattr(self, name, fn(getattr(self, name), False))
        self.version += 1

    def rebuild(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> None:
        """Register from scratch the first lengths[b] ids of token_ids [batch, >= max(lengths)] (after a crop)."""
        self.reset()
        width = int(lengths.max()) if lengths.numel() else 0
        if width:
            positions = torch.arange(width, device=lengths.device).expand(len(lengths), width)
            self.append(token_ids[:, :width], positions, lengths)

    def append(self, tokens: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor | None = None) -> None:
        """Register tokens [batch, seq] written at positions [batch, seq]; only the first n_new[b] count."""
        batch, seq = tokens.shape
        if n_new is None:
            n_new = torch.full((batch,), seq, dtype=torch.long, device=tokens.device)
        n_new = n_new.to(self.lengths.device, torch.long)
        if seq == 1:
            self._append_one(tokens[:, 0], positions[:, 0], n_new)  # lengths too
            self.host.distinct_bound = min(self.host.distinct_bound + 1, self.slots.shape[1])
        else:
            self._append_many(tokens, positions, n_new)
            self.lengths += n_new.clamp(max=seq)
        self.version += 1

    def register_prompts(self, start: int, tokens: torch.Tensor, n_new: torch.Tensor) -> None:
        """Register the prompts tokens [rows, width] (host tensors; the first n_new[b] of row b count) of empty rows
        [start, start + rows), deduplicated on the host (`append` there) and copied without waiting for the device:
        the registration of a prefill that a CUDA graph replayed (egmla/infer/prefill_step.py), where the device's
        dedup would sync the host with the step queued ahead."""
        rows, width = tokens.shape
        host = TokenGroups(rows, width)
        host.append(tokens, torch.arange(width).expand(rows, width), n_new)
        device = self.lengths.device

        def moved(tensor: torch.Tensor) -> torch.Tensor:  # from pinned memory: a pageable copy waits for the stream
            return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

        stop = start + rows
        for name in self.PER_POSITION:
            getattr(self, name)[start:stop, :width] = moved(getattr(host, name))
        for name in self.PER_SEQUENCE:
            getattr(self, name)[start:stop] = moved(getattr(host, name))
        self.host.distinct_bound = max(self.host.distinct_bound, host.host.distinct_bound)
        self.version += 1

    def _append_one(self, ids: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor) -> None:
        """One token per sequence (rows with n_new > 0), lengths included, without a host sync: one Triton launch
        where the forward-only kernels run (egmla/kernels/token_groups.py), else its PyTorch reference."""
        from egmla.kernels import no_grad_kernel_can_run

        args = (self.distinct_ids, self.n_distinct, self.slots, self.counts, self.ranks, self.lengths, ids, positions,
                n_new)
        if no_grad_kernel_can_run(ids):
            from egmla.kernels.token_groups import append_one

            append_one(*args)
        else:
            from egmla.kernels.token_groups_ref import append_one_ref

            append_one_ref(*args)

    def _append_many(self, tokens: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor) -> None:
        """A prefill chunk, vectorised over the batch (no loop over sequences): every (sequence, id) pair of the
        known ids and the new tokens is one key; the keys are deduplicated at once and each new id's slot is
        its rank by first appearance within its sequence (known ids come first, so they keep their slots)."""
        batch, seq = tokens.shape
        device, width = tokens.device, self.distinct_ids.shape[1]
        take_new = torch.arange(seq, device=device)[None, :] < n_new.clamp(max=seq)[:, None]  # [batch, seq]
        take_known = torch.arange(width, device=device)[None, :] < self.n_distinct[:, None]  # [batch, width]
        if not bool(take_new.any()):
            return
        row_of = torch.arange(batch, device=device)[:, None]
        new_rows, new_ids = row_of.expand(batch, seq)[take_new], tokens[take_new].long()
        known_rows, known_ids = row_of.expand(batch, width)[take_known], self.distinct_ids[take_known].long()
        span = int(torch.cat([new_ids, known_ids]).max()) + 1  # keys row * span + id, in int64
        keys = torch.cat([known_rows * span + known_ids, new_rows * span + new_ids])
        appearance = torch.cat([torch.arange(width, device=device).expand(batch, width)[take_known],  # = the slot
                                width + torch.arange(seq, device=device).expand(batch, seq)[take_new]])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full_like(uniq, width + seq).scatter_reduce_(0, inverse, appearance, "amin")
        uniq_rows = uniq // span
        by_first = (uniq_rows * (width + seq) + first).argsort()  # per sequence, in order of first appearance
        sorted_rows = uniq_rows[by_first]
        slot_of = torch.empty_like(uniq)
        slot_of[by_first] = torch.arange(len(uniq), device=device) - torch.searchsorted(sorted_rows, sorted_rows)
        self.distinct_ids[uniq_rows, slot_of] = (uniq % span).to(torch.int32)
        self.n_distinct.copy_(torch.bincount(uniq_rows, minlength=batch))
        self.host.distinct_bound = max(self.host.distinct_bound, int(self.n_distinct.max()))
        slots = slot_of[inverse[len(known_ids):]]  # of the new tokens, in (row, position) order
        new_positions = positions[take_new]
        self.slots[new_rows, new_positions] = slots.to(torch.int32)
        # rank among the slot's positions: those before this chunk, then order of appearance in it
        new_keys = keys[len(known_ids):]
        by_key = torch.argsort(new_keys, stable=True)
        sorted_keys = new_keys[by_key]
        index = torch.arange(len(new_keys), device=device)
        run_start = torch.where(torch.cat([sorted_keys.new_ones(1, dtype=torch.bool),
                                           sorted_keys[1:] != sorted_keys[:-1]]), index, 0).cummax(0).values
        in_chunk = torch.empty_like(index)
        in_chunk[by_key] = index - run_start
        self.ranks[new_rows, new_positions] = (self.counts[new_rows, slots] + in_chunk).to(torch.int32)
        self.counts.index_put_((new_rows, slots), torch.ones_like(slots, dtype=torch.int32), accumulate=True)


class KVCache:
    """The whole model's cache: per-layer tensors, per-sequence lengths and (if needed) token ids and groups."""

    def __init__(self, specs: list[CacheSpec], batch_size: int, max_len: int,
                 dtype=torch.float32, device=None, fp8_tensors=()):
        self.batch_size, self.max_len = batch_size, max_len
        self.dtype = dtype  # of the layers' tensors a spec does not type; FP8: an fp8 cache, Fp8KeepRope (above)
        fp8_tensors = frozenset(fp8_tensors)
        roundable = {name for spec in specs for name, (_, buf_dtype) in spec.tensors.items() if buf_dtype is None}
        if not fp8_tensors <= roundable:
            raise ValueError(f"fp8_tensors={sorted(fp8_tensors)}: this cache keeps {', '.join(sorted(roundable))} in "
                             f"the model's dtype; name some of those")
        self.layers = [LayerCache(spec, batch_size, max_len, dtype, device, fp8_tensors) for spec in specs]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # One int32 per position, shared by all layers: the gates are recomputed from it.
        needs_ids = any(spec.needs_token_ids for spec in specs)
        self.token_ids = (torch.zeros(batch_size, max_len, dtype=torch.int32, device=device)
                          if needs_ids else None)
        needs_groups = any(spec.needs_token_groups for spec in specs)
        self.token_groups = TokenGroups(batch_size, max_len, device) if needs_groups else None
        # One int32 per sequence where a layer keeps norm statistics: zero between launches; the one-launch append
        # counts a sequence's finished heads in it (egmla/kernels/latent_append.py). Layers run in turn: one suffices.
        needs_counters = any("ln_stats" in spec.tensors for spec in specs)
        self.stats_arrivals = (torch.zeros(batch_size, dtype=torch.int32, device=device)
                               if needs_counters else None)

    # ---- appending -------------------------------------------------------------------------
    def positions_for(self, seq_len: int, static: bool = False) -> tuple[torch.Tensor, int]:
        """Positions [batch, seq_len] where the next `seq_len` tokens of each sequence go, and the
        number of cached positions to attend over afterwards.

        static=False: that number is the longest sequence's (one host sync), checked against max_len.
        static=True: it is max_len, with no host sync (a CUDA-graph-capturable step); positions are
        clamped into the cache, so a row that appends nothing (n_new = 0) at a full length stays inside: it
        writes over its last position, which is never read again (the row has ended, and a reused prefix stops
        one short of a prompt; tests/infer/test_scheduler.py pins both).
        """
        positions = self.lengths[:, None] + torch.arange(seq_len, device=self.lengths.device)
        if static:
            return positions.clamp(max=self.max_len - 1), self.max_len
        end = int(positions[:, -1].max()) + 1
        if end > self.max_len:
            raise ValueError(
                f"sequence length {end} exceeds the cache's max_len={self.max_len}: allocate a larger "
                f"cache (new_cache(max_len=...), at most the model's max_seq_len) or shorten the input")
        return positions, end

    def advance(self, n_new: torch.Tensor) -> None:
        self.lengths += n_new.to(self.lengths.device)

    # ---- rows and length: every buffer, through _map ---------------------------------------------
    def _map(self, fn: TensorMap) -> None:
        """Replace every buffer t by fn(t, per_position): the one place that knows them all."""
        for layer in self.layers:
            layer._map(fn)
        self.lengths = fn(self.lengths, False)
        if self.token_ids is not None:
            self.token_ids = fn(self.token_ids, True)
        if self.token_groups is not None:
            self.token_groups._map(fn)
        if self.stats_arrivals is not None:
            self.stats_arrivals = fn(self.stats_arrivals, False)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Make sequences `rows` (any order, repeats allowed) the new batch: beam search, batch expansion.
        Allocates new storage of len(rows) rows."""
        rows = rows.to(self.lengths.device, torch.long)
        self._map(lambda t, _: t.index_select(0, rows))
        self.batch_size = rows.numel()

    def compact(self, rows: torch.Tensor) -> None:
        """Keep only sequences `rows` (int64), moved to the front in place; the cache becomes a view of its
        first len(rows) rows, so dropping finished sequences never allocates a second cache."""
        rows = rows.to(self.lengths.device, torch.long)
        kept = rows.numel()

        def front(buffer: torch.Tensor, _) -> torch.Tensor:
            buffer[:kept] = buffer.index_select(0, rows)
            return buffer[:kept]

        self._map(front)
        self.batch_size = kept

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Row target[i] becomes a copy of row source[i], in place (e.g. to fill a large batch from a few
        prefilled sequences without prefilling each)."""
        source, target = source.to(self.lengths.device, torch.long), target.to(self.lengths.device, torch.long)

        def copy_into(buffer: torch.Tensor, _) -> torch.Tensor:
            buffer[target] = buffer.index_select(0, source)
            return buffer

        self._map(copy_into)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache of sequences [start, stop) that shares this one's storage (appends to it land here)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows({start}, {stop}): need 0 <= start < stop <= batch_size={self.batch_size}")
        return self._view(lambda t, _: t[start:stop], stop - start, self.max_len)

    def reshaped(self, rows: int, width: int) -> "KVCache":
        """A cache of `rows` sequences of `width` positions over this one's storage, its positions read as one run
        (rows x width <= batch_size x max_len; rows <= batch_size): scratch for prefills of any shape, sharing one
        allocation (egmla/infer/prefill_step.py)."""
        if not (1 <= rows <= self.batch_size and 1 <= width and rows * width <= self.batch_size * self.max_len):
            raise ValueError(f"reshaped({rows}, {width}): need 1 <= rows <= batch_size={self.batch_size} and "
                             f"rows x width <= {self.batch_size} x {self.max_len} positions")

        def regroup(buffer: torch.Tensor, per_position: bool) -> torch.Tensor:
            if not per_position:
                return buffer[:rows]
            return buffer.flatten(0, 1)[: rows * width].view(rows, width, *buffer.shape[2:])

        return self._view(regroup, rows, width)

    def _view(self, fn: TensorMap, batch_size: int, max_len: int) -> "KVCache":
        view = copy.copy(self)
        view.layers = [copy.copy(layer) for layer in self.layers]
        if self.token_groups is not None:
            view.token_groups = copy.copy(self.token_groups)
            view.token_groups._plan = None
        view._map(fn)
        view.batch_size, view.max_len = batch_size, max_len
        return view

    def take_rows(self, source: "KVCache", start: int, count: int, width: int) -> None:
        """Rows [start, start + count) become source's rows [0, count): positions [0, width) of every layer's buffers
        and of the token ids, and source's lengths (prompts prefilled in a scratch cache, egmla/infer/prefill_step.py).
        The token groups are not copied: register the prompts (`TokenGroups.register_prompts`)."""
        stop = start + count
        if not (0 <= start and stop <= self.batch_size and count <= source.batch_size
                and width <= min(self.max_len, source.max_len)):
            raise ValueError(f"take_rows: rows [{start}, {stop}) x {width} positions do not fit this cache "
                             f"({self.batch_size} x {self.max_len}) or the source ({source.batch_size} x "
                             f"{source.max_len})")
        for mine, theirs in zip(self.layers, source.layers, strict=True):
            for name, buffer in mine.buffers.items():
                buffer[start:stop, :width] = theirs.buffers[name][:count, :width]
        if self.token_ids is not None:
            self.token_ids[start:stop, :width] = source.token_ids[:count, :width]
        self.lengths[start:stop] = source.lengths[:count]

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions per sequence (new storage; what is cached is kept)."""
        if max_len <= self.max_len:
            return

        def longer(buffer: torch.Tensor, per_position: bool) -> torch.Tensor:
            if not per_position:
                return buffer
            grown = buffer.new_zeros(buffer.shape[0], max_len, *buffer.shape[2:])
            grown[:, : buffer.shape[1]] = buffer
            return grown

        self._map(longer)
        self.max_len = max_len

    def truncate(self, lengths: torch.Tensor) -> None:
        """Shorten each sequence to lengths[b] (never longer than it is): drop the positions after it."""
        self.lengths.copy_(torch.minimum(self.lengths, lengths.to(self.lengths.device)))
        if self.token_groups is not None:
            if self.token_ids is None:
                raise ValueError("token groups need the cache's token ids to be rebuilt after a truncation")
            self.token_groups.rebuild(self.token_ids, self.lengths)

    def reset(self) -> None:
        """Empty every sequence (the storage is kept)."""
        self.lengths.zero_()
        if self.stats_arrivals is not None:  # 0 after every append launch; zeroed anyway so a reset cache is clean
            self.stats_arrivals.zero_()
        if self.token_groups is not None:
            self.token_groups.reset()

    def reset_rows(self, start: int, stop: int) -> None:
        """Empty sequences [start, stop) only, the others untouched (a server giving a finished request's row to a
        new one). The token groups' host-side bounds are kept: they bound every row, these included."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"reset_rows({start}, {stop}): need 0 <= start < stop <= batch_size={self.batch_size}")
        # the per-sequence tensors it touches, sliced directly (a `rows` view slices every buffer: ~60-90 us)
        self.lengths[start:stop].zero_()
        if self.stats_arrivals is not None:
            self.stats_arrivals[start:stop].zero_()
        if self.token_groups is not None:
            for name in ("counts", "n_distinct", "lengths"):
                getattr(self.token_groups, name)[start:stop].zero_()
            self.token_groups.version += 1

    def reset_rows_at(self, rows: torch.Tensor) -> None:
        """`reset_rows` of each row in `rows` (an int64 tensor on the cache's device, each in [0, batch_size), no
        repeats): one launch per per-sequence tensor however many rows, where a row at a time costs a launch each
        (a server admitting many requests into scattered free rows)."""
        self.lengths.index_fill_(0, rows, 0)
        if self.stats_arrivals is not None:
            self.stats_arrivals.index_fill_(0, rows, 0)
        if self.token_groups is not None:
            for name in ("counts", "n_distinct", "lengths"):
                getattr(self.token_groups, name).index_fill_(0, rows, 0)
            self.token_groups.version += 1

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Row `target` becomes the first `length` positions of row `source`, only those copied (a server starting a
        request from another's cached prompt prefix), then cut there as `keep_prefix` does."""
        def copy_into(buffer: torch.Tensor, per_position: bool) -> torch.Tensor:
            if per_position:
                buffer[target, :length] = buffer[source, :length]
            return buffer

        self._map(copy_into)
        self.keep_prefix(target, length)

    def keep_prefix(self, row: int, length: int) -> None:
        """Shorten sequence `row` to its first `length` positions, the others untouched (a server reusing a cached
        prompt prefix). Its token groups are registered again from its token ids; the host-side bounds are kept."""
        view = self.rows(row, row + 1)
        view.lengths.fill_(length)
        if view.token_groups is not None:
            if view.token_ids is None:
                raise ValueError("token groups need the cache's token ids to be rebuilt after a truncation")
            host = view.token_groups.host
            saved = (host.unregistered, host.distinct_bound, host.plan_distinct)
            view.token_groups.rebuild(view.token_ids, view.lengths)  # resets the shared host state: restored below
            host.unregistered, host.plan_distinct = saved[0], saved[2]
            host.distinct_bound = max(saved[1], host.distinct_bound)
            if self.token_groups is not None:
                self.token_groups.version += 1

    # ---- sizes -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        ids = self.token_ids.numel() * self.token_ids.element_size() if self.token_ids is not None else 0
        groups = self.token_groups.nbytes() if self.token_groups is not None else 0
        return sum(layer.nbytes() for layer in self.layers) + ids + groups  # per position; not lengths, counters

    def bytes_per_token(self) -> float:
        """Bytes actually allocated per cached position (per sequence), measured from the tensors."""
        return self.nbytes() / (self.batch_size * self.max_len)
