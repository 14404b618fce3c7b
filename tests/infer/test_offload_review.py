"""Review of the gate-table offload's device mode (rows claimed and copied by the Triton kernels, room kept by the
engine and the scheduler): adversarial cases on the CPU, in Triton's interpreter. Every check compares with the same
model's tables on the device, and checks that every id at a cached position is served its own host rows."""
import random

import pytest
import torch

from egmla.infer import GenerationEngine
from egmla.infer.scheduler import Scheduler
from egmla.kernels import kernel_unavailable_reason
from tests.infer.helpers import assert_steps_match_full_forward, tiny_model
from tests.infer.test_offload import device_offload

pytestmark = pytest.mark.skipif(kernel_unavailable_reason("cpu") is not None,
                                reason="claims the rows by the Triton kernels on CPU tensors: needs Triton and "
                                       "TRITON_INTERPRET=1 (set by make test and .ci/run)")


def served_right(offload, ids: torch.Tensor) -> bool:
    ids = ids.flatten().long()
    return all(torch.equal(offload.rows(key, ids), table[ids]) for key, table in offload.host_tables.items())


def watch_forwards(model, offload) -> list:
    """After every forward: its tokens, and the id at every position of every row of the cache it got (below the
    row's length), are served their own host rows. Returns the list the failures go to."""
    failures = []

    def check(module, args, kwargs, out):
        tokens = args[0] if args else kwargs["tokens"]
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        held = [tokens.flatten()]
        if cache is not None and cache.token_ids is not None:
            held += [cache.token_ids[row, :length] for row, length in enumerate(cache.lengths.tolist())]
        if not served_right(offload, torch.cat([h.long() for h in held])):
            failures.append(tuple(tokens.shape))

    model.register_forward_hook(check, with_kwargs=True)
    return failures


# ---- the claim kernels ---------------------------------------------------------------------------------------------
def test_claim_reads_the_ids_of_a_strided_view():
    """claim_gate_rows takes ids of any shape: a column of a [batch, seq] tensor (what a teacher-forced decode feeds)
    is a strided view that `reshape(-1)` keeps strided, and the kernels read ids[pid] as if contiguous: they claimed
    the wrong ids (the first row's next tokens), leaving the column's own ids without rows."""
    from egmla.kernels.gate_rows import GateRowTables, claim_gate_rows

    host = [torch.randn(300, 8)]
    rows = [torch.full((16, 8), float("nan"))]
    resident, slot_of_id = torch.zeros(300, dtype=torch.int32), torch.zeros(300, dtype=torch.long)
    n_resident = torch.zeros(1, dtype=torch.int32)
    grid = torch.arange(100, 124).reshape(4, 6)
    column = grid[:, 2:3]  # ids 102, 108, 114, 120
    assert not column.reshape(-1).is_contiguous()
    claim_gate_rows(column, resident, slot_of_id, n_resident, 16, GateRowTables.build(host, rows))
    assert resident.nonzero().flatten().tolist() == [102, 108, 114, 120] and int(n_resident) == 4
    assert torch.equal(rows[0][slot_of_id[column.flatten()]], host[0][column.flatten()])


def test_teacher_forced_decode_through_column_slices_gives_the_tables_on_the_device_logits():
    """The model called directly (each forward counts its ids) with each step's tokens a column of the [batch, seq]
    ids: the logits of the tables on the device. They differed (other ids' rows served)."""
    model = tiny_model("eg-mla", seed=5)
    model.set_decode_path("gate-table")
    tokens = torch.randint(0, 300, (3, 6), generator=torch.Generator().manual_seed(1))

    def teacher_forced():
        with torch.no_grad():
            cache = model.new_cache(3, 8)
            out = [model(tokens[:, :2], cache)]
            out += [model(tokens[:, t:t + 1], cache) for t in range(2, 6)]
        return torch.cat(out, dim=1)

    expected = teacher_forced()
    offload = device_offload(model)
    assert torch.equal(teacher_forced(), expected)
    assert offload.check() == len(set(tokens.flatten().tolist()))


# ---- the engine ----------------------------------------------------------------------------------------------------
def test_the_model_called_directly_after_the_engine_counts_its_ids(monkeypatch, step_log_probs):
    """After a generate() call the offload stayed 'managed' for good: a direct forward no longer counted its new ids,
    so the ids past the engine's room got no rows and were served other ids' (wrong logits, no error: nothing checks
    it). Then the engine's next call gets its own tokens again (a growth by the direct call drops its steps); both
    calls' distributions at every step are those of one full forward of a copy whose tables stay on the device."""
    on_device = tiny_model("eg-mla", seed=5)
    model = tiny_model("eg-mla", seed=5)
    engine = GenerationEngine(model, decode_path="gate-table", batch_buckets=(1, 2, 4))
    many_ids = torch.arange(100, 160).reshape(2, 30)
    with torch.no_grad():
        expected_logits = model(many_ids)
    expected = [[r.token_ids for r in engine.generate([[1, 2, 3], [4, 5]], 4)] for _ in range(2)]
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True, batch_buckets=(1, 2, 4))
    offload = device_offload(model, engine)
    step_log_probs.clear()
    results = engine.generate([[1, 2, 3], [4, 5]], 4)
    assert [r.token_ids for r in results] == expected[0]
    assert_steps_match_full_forward(on_device, [[1, 2, 3], [4, 5]], results, step_log_probs, "first call")
    with torch.no_grad():
        assert torch.equal(model(many_ids), expected_logits)
    assert offload.check() <= offload.capacity
    drops = []  # the direct call grew the rows, which the engine's kept steps (graphs on CUDA) read: they must go
    monkeypatch.setattr(engine, "drop_steps", lambda: drops.append(1) or GenerationEngine.drop_steps(engine))
    step_log_probs.clear()
    results = engine.generate([[1, 2, 3], [4, 5]], 4)
    assert [r.token_ids for r in results] == expected[1]
    assert_steps_match_full_forward(on_device, [[1, 2, 3], [4, 5]], results, step_log_probs, "after the direct call")
    assert drops


@pytest.mark.parametrize("overlap", [True, False])
def test_a_call_whose_room_fits_every_fed_id_neither_grows_nor_drops_its_steps_at_the_end(overlap, step_log_probs):
    """A call whose room holds its prompts' ids and every token its steps can feed ('then no step checks the count'):
    the engine kept room for one step more than ran (the last iteration, which reads the last tokens and runs no step),
    so where every fed id was new the row cache doubled and the steps (graphs on CUDA) were dropped after the last
    one ran, leaving engine.last_step None (`egmla bench generate --profile`: 'no decode step ran'). The call's
    distributions at every step are those of one full forward of a copy whose tables stay on the device."""
    model = tiny_model("eg-mla", seed=6)  # a seed whose greedy tokens feed only new ids (asserted below)
    prompt, new_tokens = [0, 15, 46, 76, 284], 3
    tokens = GenerationEngine(model, decode_path="gate-table").generate([prompt], new_tokens)[0].token_ids
    fed = tokens[:-1]
    assert len(set(fed)) == len(fed) and not set(fed) & set(prompt)  # every fed id new: the room is used up
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True, overlap_host=overlap)
    offload = device_offload(model, engine)
    drops, checks = [], []
    drop_steps, check = engine.drop_steps, offload.check
    engine.drop_steps = lambda: drops.append(offload.capacity) or drop_steps()
    offload.check = lambda: checks.append(1) or check()
    step_log_probs.clear()
    results = engine.generate([prompt], new_tokens)
    assert results[0].token_ids == tokens
    assert_steps_match_full_forward(tiny_model("eg-mla", seed=6), [prompt], results, step_log_probs, overlap)
    room = len(set(prompt)) + len(fed)
    assert offload.capacity == room and check() == room
    assert drops[-1] == room and drops.count(room) == 1  # the call's start grew the rows from 4; nothing after
    assert len(checks) == 1  # the end-of-call check only: no sync mid-call
    assert engine.last_step is not None


PROMPTS = [[0, 5, 0, 17], [120, 8], [0, 5, 0, 17], [260, 261, 262, 263, 264, 265], [7]]  # repeats, id 0, lengths


@pytest.mark.parametrize("settings", [dict(batch_buckets=(1, 2, 4), overlap_host=True, prefill_graphs=True),
                                      dict(batch_buckets=(1, 2, 4), overlap_host=False, prefill_token_budget=3),
                                      dict(overlap_host=True, prefill_token_budget=3),
                                      dict(overlap_host=False, prefill_graphs=True)])
def test_engine_calls_with_rows_claimed_on_the_device_get_the_tables_on_the_device_tokens(monkeypatch, settings,
                                                                                         step_log_probs):
    """Repeated prompts (one prefill copied), id 0 in prompts and as padding, rows ending early on an eos (buckets
    shrinking, compaction), the fixed-shape prefill step or chunked prefill, overlap on and off, a room of 4 ids per
    row that grows mid-call, later calls smaller and larger: the greedy tokens of the tables on the device, at every
    step of every call the distributions of one full forward of a copy whose tables stay on the device (to fp32),
    and after every forward every cached id served its own rows."""
    from egmla.infer import engine as engine_module

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)
    on_device = tiny_model("eg-mla", seed=7)

    def generate(offload: bool, eos=None):
        model = tiny_model("eg-mla", seed=7)
        engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=offload, **settings)
        failures = watch_forwards(model, device_offload(model, engine)) if offload else []
        outcomes = []
        for call, (prompts, new_tokens) in enumerate([(PROMPTS, 10), (PROMPTS[1:3], 6), (PROMPTS, 9), ([[3]], 12)]):
            step_log_probs.clear()
            results = engine.generate(prompts, new_tokens, eos_token_id=eos)
            if offload:
                assert_steps_match_full_forward(on_device, prompts, results, step_log_probs, call)
            outcomes.append([(r.token_ids, r.finish_reason) for r in results])
        return outcomes, failures, engine

    plain, _, _ = generate(offload=False)
    eos = plain[0][0][0][2]  # some rows end on it, early
    expected, _, _ = generate(offload=False, eos=eos)
    assert {reason for call in expected for _, reason in call} == {"eos", "length"}
    got, failures, engine = generate(offload=True, eos=eos)
    assert got == expected and not failures
    assert 4 < engine.offload.capacity < 300 and engine.offload.check() <= engine.offload.capacity


# ---- the scheduler -------------------------------------------------------------------------------------------------
def random_requests(seed: int) -> list[dict]:
    """Requests arriving over ~25 steps: prompts sharing prefixes (prefix caching), some with id 0, samples of one
    prompt (n > 1), cancellations, scoring requests (max_new_tokens=0, prompt log-probabilities), logprobs."""
    rng = random.Random(seed)
    bases = [[rng.randrange(300) for _ in range(8)] for _ in range(3)]
    requests = []
    for _ in range(14):
        kind = rng.random()
        prompt = rng.choice(bases)[:rng.randint(3, 8)] + [rng.randrange(300) for _ in range(rng.randint(0, 4))]
        prompt = [0] + prompt if rng.random() < 0.2 else prompt
        request = dict(at=rng.randint(0, 25), prompt=prompt, new=rng.randint(1, 9), n=1, cancel=None, logprobs=None)
        if kind < 0.15:
            request.update(new=0, logprobs=2)
        elif kind < 0.3:
            request.update(n=rng.randint(2, 3))
        elif kind < 0.4:
            request.update(cancel=request["at"] + rng.randint(0, 5))
        elif kind < 0.5:
            request.update(logprobs=1)
        requests.append(request)
    return requests


def serve(requests: list[dict], offload: bool, eos: int, buckets, overlap: bool, chunk, prefix_min: int,
          prefill_graphs: bool):
    model = tiny_model("eg-mla", seed=3)
    engine = GenerationEngine(model, decode_path="gate-table", batch_buckets=buckets, offload_gate_tables=offload,
                              prefill_graphs=prefill_graphs)
    rows = device_offload(model, engine) if offload else None
    failures = watch_forwards(model, rows) if offload else []
    scheduler = Scheduler(engine, max_batch=3, overlap_host=overlap, prefill_chunk=chunk, prefix_cache_min=prefix_min,
                          max_waiting=100)
    handles, steps = {}, 0
    while steps < 300:
        for i, request in enumerate(requests):
            if request["at"] == steps:
                scoring = request["new"] == 0
                handles[i] = scheduler.submit_all([dict(prompt=request["prompt"], max_new_tokens=request["new"],
                                                        eos_token_id=None if scoring else eos,
                                                        logprobs=request["logprobs"], prompt_logprobs=scoring)]
                                                  * request["n"])
            if request["cancel"] == steps:
                for handle in handles[i]:
                    handle.cancel()
        busy = scheduler.step()
        steps += 1
        if offload:  # every id at a position of a cache row is served its own rows
            cache = scheduler._cache
            held = torch.cat([cache.token_ids[row, :n] for row, n in enumerate(cache.lengths.tolist())])
            if not served_right(rows, held):
                failures.append(steps)
        if len(handles) == len(requests) and not busy:
            break
    results = {i: [(h.result().token_ids, h.result().finish_reason, h.result().logprobs, h.result().prompt_logprobs)
                   for h in hs] for i, hs in handles.items()}
    return results, failures, rows, scheduler.stats


def test_random_schedules_served_with_rows_claimed_on_the_device_get_the_tables_on_the_device_results(monkeypatch):
    """Random schedules under a room of 4 ids per row (evictions while rows are mid-prefill, prefix rows kept, rows
    compacted), prefix caching, chunked prefill, cancellations, samples of one prompt, scoring requests, logprobs, with
    the fixed-shape prefill step or not, overlap on and off: the very results of the tables on the device, and every
    cached id served its own rows after every forward and every step."""
    from egmla.infer import engine as engine_module

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)
    evictions = hits = compactions = 0
    for seed, (buckets, overlap, chunk, prefix_min, prefill_graphs) in enumerate(
            [((1, 2, 4), True, 3, 2, True), (None, False, None, 2, False), ((1, 2, 4), False, 5, 0, True)]):
        requests = random_requests(seed)
        settings = (random.Random(seed).randrange(300), buckets, overlap, chunk, prefix_min, prefill_graphs)
        expected, _, _, _ = serve(requests, False, *settings)
        got, failures, offload, stats = serve(requests, True, *settings)
        assert got == expected and not failures, seed
        assert offload.check() <= offload.capacity < 300
        evictions, hits, compactions = (evictions + offload.evictions, hits + stats.prefix_hits,
                                        compactions + stats.compactions)
    assert evictions >= 3 and hits and compactions
