"""Gate tables in host memory give the very same logits and tokens as gate tables on the device."""
import dataclasses
import importlib

import pytest
import torch

from egmla.attention import decode_path_table
from egmla.attention.egmla import EmbeddingGatedMLA
from egmla.infer import GenerationEngine
from egmla.infer.offload import GateTableOffload, OffloadedRows, offloadable
from egmla.kernels import kernel_unavailable_reason
from tests.infer.helpers import assert_steps_match_full_forward, relative_error, tiny_model

# the bias controls' 'absorbed' Triton kernels on CPU tensors: Triton's interpreter, chosen before the kernels load
needs_interpreter = pytest.mark.skipif(kernel_unavailable_reason("cpu") is not None,
                                       reason="runs the Triton kernels on the CPU: needs Triton and TRITON_INTERPRET=1 "
                                              "(set by make test and .ci/run)")

PROMPTS = [[5, 17, 42, 99, 3], [120, 8], [33, 34, 35, 36, 37, 38, 39]]


def cached_logits(model, device="cpu"):
    """Prefill a ragged batch, then three decode steps; all logits concatenated."""
    tokens = torch.zeros(3, 7, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in PROMPTS], device=device)
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        out = [model(tokens.to(device), cache, n_new=lengths)]
        for step in range(3):
            out.append(model(torch.tensor([[200 + step], [7], [250 - step]], device=device), cache))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant,path", [("eg-mla", "naive"), ("eg-mla", "gate-table"),
                                          ("eg-mla-latent", "naive"), ("eg-mla-latent", "absorbed"),
                                          ("eg-mla-bias", "absorbed")])
def test_offloaded_logits_equal_on_device_logits(variant, path):
    model = tiny_model(variant)
    model.set_decode_path(path)
    expected = cached_logits(model)
    with torch.no_grad():
        full_expected = model(torch.tensor(PROMPTS[2:]))
    offload = GateTableOffload(model, initial_rows=4)  # small, so the row cache must grow
    assert all(isinstance(layer.attn.gate_embed, OffloadedRows) for layer in model.layers)
    assert torch.equal(cached_logits(model), expected)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor(PROMPTS[2:])), full_expected)  # no-cache forward too
    assert offload.n_resident == len({0, 200, 201, 202, 7, 250, 249, 248}.union(*PROMPTS))
    assert offload.capacity >= offload.n_resident
    builds_table = path == "gate-table" or variant == "eg-mla-bias"  # the bias control's prefill reads G_l
    per_layer = 300 * 32 + (300 * 128 if builds_table else 0)  # E_l [V, d_e] (+ G_l [V, 2·4·16])
    assert offload.host_bytes() == 2 * per_layer * 4
    assert offload.bytes_per_id() == 2 * per_layer // 300 * 4  # what `egmla serve --max-batch auto` reserves per id


def test_engine_with_offload_generates_the_same_and_reports_savings(step_log_probs):
    """Offloaded gate tables: the greedy tokens of the tables on the device and, at every step, the distributions of
    one full forward of a copy whose tables stay on the device, to fp32; the bytes saved are reported."""
    model, on_device = tiny_model("eg-mla", seed=3), tiny_model("eg-mla", seed=3)
    expected = [r.token_ids for r in GenerationEngine(model, decode_path="gate-table").generate(PROMPTS, 8)]
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True)
    step_log_probs.clear()
    results = engine.generate(PROMPTS, 8)
    assert [r.token_ids for r in results] == expected
    assert_steps_match_full_forward(on_device, PROMPTS, results, step_log_probs, "offload")
    saved = engine.offload.bytes_saved()
    assert saved == engine.offload.host_bytes() - engine.offload.device_bytes() and saved > 0


def test_offload_refuses_models_without_gates():
    with pytest.raises(ValueError, match="no gate tables"):
        GateTableOffload(tiny_model("mla"))


def test_offload_refuses_a_path_that_does_not_read_gate_rows_by_id(monkeypatch):
    """Which paths an offload serves is each path's `gate_rows_by_id` (every gated path today); a path that reads
    the whole table is refused before anything moves, and the error names the paths it serves."""
    model = tiny_model("eg-mla")
    assert all(offloadable(model.config, name) for name in decode_path_table(model.config))
    whole_table = dataclasses.replace(EmbeddingGatedMLA.UP_PATHS["gate-table"], gate_rows_by_id=False)
    monkeypatch.setitem(EmbeddingGatedMLA.UP_PATHS, "gate-table", whole_table)
    model.set_decode_path("gate-table")
    tables = [layer.attn.gate_embed.weight for layer in model.layers]
    with pytest.raises(ValueError, match="decode_path='gate-table': that path reads the whole gate table on the "
                                         "device; use one of naive, kernel, grouped"):
        GateTableOffload(model)
    assert all(layer.attn.gate_embed.weight is table for layer, table in zip(model.layers, tables))


def test_offload_with_the_fixed_shape_prefill_step_generates_the_same_tokens(step_log_probs):
    """The prefill step (a graph on CUDA, the same step eagerly here) with offloaded tables: refused until the rows
    were found on the device; it reads them as any other forward: the tokens of the tables on the device and, at every
    step (the prefill's included), the full forward's distributions, to fp32."""
    model, on_device = tiny_model("eg-mla", seed=3), tiny_model("eg-mla", seed=3)
    expected = [r.token_ids for r in GenerationEngine(model, decode_path="gate-table").generate(PROMPTS, 6)]
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True, prefill_graphs=True)
    step_log_probs.clear()
    results = engine.generate(PROMPTS, 6)
    assert [r.token_ids for r in results] == expected
    assert engine._prefill_steps  # the prefill went through the step
    assert_steps_match_full_forward(on_device, PROMPTS, results, step_log_probs, "offload, prefill step")


def stepped_logits(model, prompts, prompt_lengths, steps):
    """A ragged prefill of prompts [batch, len], then one decode step per row of steps [n_steps, batch] (ids the
    prompts lack, so the offload's slot map grows mid-generation); all logits concatenated."""
    with torch.no_grad():
        cache = model.new_cache(prompts.shape[0], prompts.shape[1] + steps.shape[0])
        out = [model(prompts, cache, n_new=prompt_lengths)]
        out += [model(step[:, None], cache) for step in steps]
    return torch.cat(out, dim=1)


def count_calls(monkeypatch, module_name: str, name: str) -> list:
    """Record each call of module.name (still calling it): proof that a Triton path ran."""
    module = importlib.import_module(module_name)  # imports Triton: only in the tests that need it
    calls, function = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(name) or function(*args, **kwargs))
    return calls


@needs_interpreter
@pytest.mark.parametrize("variant,mass", [("eg-mla-bias", "atomic"), ("eg-mla-bias", "grouped"),
                                          ("eg-mla-bias-v", "atomic")])
def test_bias_controls_absorbed_kernels_read_the_offloaded_rows(monkeypatch, variant, mass):
    """The bias controls' 'absorbed' steps run Triton kernels that gather E_l's rows (per-id scores, the mass's
    embedding sum) and take G_l (the statistics pass): under an offload they get the resident rows and the ids'
    slots, and give the very logits of the tables on the device, as new ids arrive step after step."""
    model = tiny_model(variant, seed=5)
    model.set_decode_path("absorbed")
    for layer in model.layers:  # the Triton kernels on CPU tensors ('auto' takes them on CUDA only)
        layer.attn.absorbed_backend, layer.attn.bias_mass = "kernel", mass
    prompts, steps = torch.randint(0, 100, (3, 7)), torch.randint(100, 300, (4, 3))  # steps: ids the prompts lack
    prompt_lengths = torch.tensor([7, 2, 5])
    expected = stepped_logits(model, prompts, prompt_lengths, steps)
    offload = GateTableOffload(model, initial_rows=4)  # small, so the row cache grows between steps
    embeddings = count_calls(monkeypatch, "egmla.kernels.bias_decode", "mass_embeddings")
    stats = count_calls(monkeypatch, "egmla.kernels.egmla_decode", "layernorm_stats_triton")
    assert torch.equal(stepped_logits(model, prompts, prompt_lengths, steps), expected)
    assert len(embeddings) == len(stats) == 4 * len(model.layers)  # every decode step of every layer in Triton
    assert offload.n_resident == len(set(prompts.flatten().tolist()) | set(steps.flatten().tolist()))
    assert offload.capacity < int(steps.max())  # a kernel reading the rows by id would read past them


@needs_interpreter
def test_engine_with_offload_generates_the_bias_controls_tokens_through_its_kernels(monkeypatch, step_log_probs):
    """`GenerationEngine(..., decode_path='absorbed', offload_gate_tables=True)` for the bias control, its steps in
    Triton: the greedy tokens of the tables on the device (a batch of prompts, new ids as they are generated) and, at
    every step, the distributions of one full forward of a copy whose tables stay on the device, to fp32."""
    def generate(offload: bool):
        model = tiny_model("eg-mla-bias", seed=7)
        engine = GenerationEngine(model, decode_path="absorbed", offload_gate_tables=offload)
        for layer in model.layers:
            layer.attn.absorbed_backend = "kernel"
        step_log_probs.clear()
        return engine.generate(PROMPTS, 6)

    expected = [r.token_ids for r in generate(offload=False)]
    embeddings = count_calls(monkeypatch, "egmla.kernels.bias_decode", "mass_embeddings")
    results = generate(offload=True)
    assert [r.token_ids for r in results] == expected and embeddings
    assert_steps_match_full_forward(tiny_model("eg-mla-bias", seed=7), PROMPTS, results, step_log_probs, "offload")
    assert set().union(*expected) - set().union(*PROMPTS)  # ids the prompts lack


def use_triton_decode(model, path: str) -> None:
    """The EG-MLA decode `path` ('kernel' or 'grouped'), its one-token steps in Triton on CPU tensors too ('auto'
    takes the grouped kernels on CUDA only; 'kernel' takes Triton wherever it runs)."""
    model.set_decode_path(path)
    for layer in model.layers:
        layer.attn.grouped_backend = "kernel"


@needs_interpreter
@pytest.mark.parametrize("path,decode", [("kernel", "egmla_decode"), ("grouped", "grouped_decode")])
def test_kernel_and_grouped_decodes_read_the_offloaded_rows(monkeypatch, path, decode):
    """The fused 'kernel' decode and the 'grouped' decode gather G_l's row of every cached id: under an offload they
    read the resident rows through the slot map (their id_to_row), and give the logits of the tables on the device,
    as new ids arrive step after step and the row cache grows (a ragged batch of 3)."""
    model = tiny_model("eg-mla", seed=5)
    use_triton_decode(model, path)
    prompts, steps = torch.randint(0, 100, (3, 7)), torch.randint(100, 300, (4, 3))  # steps: ids the prompts lack
    prompt_lengths = torch.tensor([7, 2, 5])
    expected = stepped_logits(model, prompts, prompt_lengths, steps)
    offload = GateTableOffload(model, initial_rows=4)  # small, so the row cache grows between steps
    calls = count_calls(monkeypatch, f"egmla.kernels.{decode}", decode)
    got = stepped_logits(model, prompts, prompt_lengths, steps)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
    assert len(calls) == 4 * len(model.layers)  # every decode step of every layer in Triton
    assert offload.n_resident == len(set(prompts.flatten().tolist()) | set(steps.flatten().tolist()))
    assert offload.capacity < int(steps.max())  # a kernel reading the rows by id would read past them


@needs_interpreter
@pytest.mark.parametrize("path", ["kernel", "grouped", "auto"])
def test_engine_with_offload_generates_the_same_tokens_on_the_triton_paths(monkeypatch, step_log_probs, path):
    """`GenerationEngine(..., offload_gate_tables=True)` on 'kernel', 'grouped' and 'auto' (made to choose on the CPU
    as on CUDA, 'grouped' for a batch of 3 and 'kernel' for 2, so that the calls switch paths under the offload):
    the greedy tokens of the tables on the device, new ids arriving as they are generated, and at every step of both
    calls the distributions of one full forward of a copy whose tables stay on the device, to fp32."""
    from egmla.infer import engine as engine_module

    def choose(config, device, batch=None, context=None) -> str:
        return "grouped" if batch and batch >= 3 else "kernel"

    monkeypatch.setattr(engine_module, "fastest_decode_path", choose)
    monkeypatch.setattr(GenerationEngine, "_grouped_fits", lambda self, rows, cache_len: True)

    on_device = tiny_model("eg-mla", seed=7)

    def generate(offload: bool) -> list[list[int]]:
        model = tiny_model("eg-mla", seed=7)
        use_triton_decode(model, "kernel")  # the path 'auto' starts from: its first call switches, with no cache yet
        engine = GenerationEngine(model, decode_path=path, offload_gate_tables=offload)
        for layer in model.layers:
            layer.attn.grouped_backend = "kernel"
        engine.auto_path = path == "auto"  # as on CUDA
        tokens = []
        for prompts, new_tokens in ((PROMPTS, 6), (PROMPTS[:2], 5)):
            step_log_probs.clear()
            results = engine.generate(prompts, new_tokens)
            if offload:
                assert_steps_match_full_forward(on_device, prompts, results, step_log_probs, (path, len(prompts)))
            tokens += [r.token_ids for r in results]
        return tokens

    expected = generate(offload=False)
    decodes = count_calls(monkeypatch, "egmla.kernels.egmla_decode", "egmla_decode")
    grouped = count_calls(monkeypatch, "egmla.kernels.grouped_decode", "grouped_decode")
    assert generate(offload=True) == expected
    assert bool(decodes) == (path != "grouped") and bool(grouped) == (path != "kernel")
    assert set().union(*expected) - set().union(*PROMPTS)  # ids the prompts lack


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["kernel", "grouped"])
def test_offload_on_the_triton_paths_on_cuda_equals_the_tables_on_the_device(path):
    """bf16 on CUDA: the 'kernel' and 'grouped' steps read the offloaded rows through the slot map; logits within
    bf16 rounding of the tables on the device."""
    model = tiny_model("eg-mla", seed=5).to("cuda", torch.bfloat16)
    model.set_decode_path(path)
    prompts = torch.randint(0, 100, (3, 7), device="cuda")
    steps = torch.randint(100, 300, (4, 3), device="cuda")
    prompt_lengths = torch.tensor([7, 2, 5], device="cuda")
    expected = stepped_logits(model, prompts, prompt_lengths, steps).float()
    offload = GateTableOffload(model, initial_rows=4)
    got = stepped_logits(model, prompts, prompt_lengths, steps).float()
    assert got.isfinite().all() and ((got - expected).norm() / expected.norm()).item() < 1e-2
    assert offload.capacity < int(steps.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_auto_with_offload_on_cuda_generates_the_same_tokens():
    """decode_path='auto' with offloaded gate tables on CUDA: the engine chooses its path as without an offload
    and, with the same kernels reading the same rows, generates the same greedy tokens (eager steps both ways)."""
    def generate(offload: bool) -> tuple[list[list[int]], str]:
        model = tiny_model("eg-mla", seed=7).to("cuda", torch.bfloat16)
        engine = GenerationEngine(model, decode_path="auto", offload_gate_tables=offload, cuda_graphs=False)
        tokens = [r.token_ids for r in engine.generate(PROMPTS, 8)]
        return tokens, engine.decode_path

    expected = generate(offload=False)
    assert expected[1] in ("kernel", "grouped")
    assert generate(offload=True) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_of_the_bias_control_on_cuda_equals_its_tables_on_the_device():
    """bf16 on CUDA, where the 'absorbed' steps take the Triton kernels by default (the statistics computed by the
    append's own launch too): logits within bf16 rounding of the tables on the device (the mass adds atomically)."""
    model = tiny_model("eg-mla-bias", seed=5).to("cuda", torch.bfloat16)
    model.set_decode_path("absorbed")
    prompts = torch.randint(0, 100, (3, 7), device="cuda")
    steps = torch.randint(100, 300, (4, 3), device="cuda")
    prompt_lengths = torch.tensor([7, 2, 5], device="cuda")
    expected = stepped_logits(model, prompts, prompt_lengths, steps).float()
    GateTableOffload(model, initial_rows=4)
    got = stepped_logits(model, prompts, prompt_lengths, steps).float()
    assert got.isfinite().all() and ((got - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_cuda_equal_and_off_the_device():
    model = tiny_model("eg-mla").cuda()
    model.set_decode_path("gate-table")
    expected = cached_logits(model, "cuda")
    before = torch.cuda.memory_allocated()
    offload = GateTableOffload(model)
    assert all(t.device.type == "cpu" for t in offload.host_tables.values())
    assert torch.equal(cached_logits(model, "cuda"), expected)
    assert torch.cuda.memory_allocated() < before


def test_restore_puts_tables_back_and_paths_switch_again():
    model = tiny_model("eg-mla")
    model.set_decode_path("gate-table")
    expected = cached_logits(model)
    params_before = model.num_params()
    offload = GateTableOffload(model)
    with pytest.raises(ValueError, match="already offloaded"):
        GateTableOffload(model)
    offload.restore()
    assert model.num_params() == params_before
    assert offload.host_bytes() == offload.device_bytes() == offload.bytes_saved() == 0  # was negative: the slot map
    assert torch.equal(cached_logits(model), expected)
    model.set_decode_path("naive")  # rebuilds nothing from an OffloadedRows: the embedding is real again
    torch.testing.assert_close(cached_logits(model), expected, rtol=1e-5, atol=1e-5)
    engine = GenerationEngine(model, decode_path="gate-table", offload_gate_tables=True)
    assert engine.generate(PROMPTS, 4)[0].token_ids == GenerationEngine(tiny_model("eg-mla")).generate(PROMPTS, 4)[0].token_ids


@pytest.mark.parametrize("variant,path,to", [("eg-mla", "gate-table", "naive"), ("eg-mla", "naive", "gate-table"),
                                             ("eg-mla-latent", "absorbed", "naive")])
def test_switching_paths_under_an_offload_is_refused_before_anything_changes(variant, path, to):
    """A switch that would rebuild the tables (which needs E_l on the device) or drop the offload's stand-ins is
    refused with the fix, and the model keeps its path and its offloaded tables (it failed with an AttributeError on
    'OffloadedRows', some layers already switched; a second engine on an offloaded model did the same)."""
    model = tiny_model(variant)
    model.set_decode_path(path)
    expected = cached_logits(model)
    GateTableOffload(model)
    for switch in (lambda: model.set_decode_path(to), lambda: GenerationEngine(model, decode_path=to)):
        with pytest.raises(ValueError, match=f"set_decode_path\\('{to}'\\): this model's gate tables are offloaded "
                                             "to host memory; call restore\\(\\) on its GateTableOffload first"):
            switch()
        assert model.decode_path == path and all(layer.attn.decode_path == path for layer in model.layers)
        assert torch.equal(cached_logits(model), expected)
    if to == "gate-table":  # offloaded on `naive`, which reads no G_l: keeping the tables cannot serve this path
        with pytest.raises(ValueError, match="the offload holds no gate table G_l for this path"):
            model.set_decode_path(to, keep_precomputed=True)
        assert model.decode_path == path
        return
    model.set_decode_path(to, keep_precomputed=True)  # what GenerationEngine's own switches do: the tables stay
    assert all(isinstance(layer.attn.gate_embed, OffloadedRows) for layer in model.layers)
    torch.testing.assert_close(cached_logits(model), expected, rtol=1e-5, atol=1e-5)


# ---- rows found and copied on the device (the CUDA way; here the kernels in Triton's interpreter) ----------------
def device_offload(model, engine=None, initial_rows: int = 4) -> GateTableOffload:
    """An offload that claims rows by the Triton kernels, as on CUDA (in place of the engine's, if given)."""
    if engine is not None:
        engine.offload.restore()
    offload = GateTableOffload(model, initial_rows=initial_rows, on_device=True)
    if engine is not None:
        engine.offload = offload
    return offload


@needs_interpreter
@pytest.mark.parametrize("variant,path", [("eg-mla", "naive"), ("eg-mla", "gate-table"), ("eg-mla-bias", "absorbed")])
def test_rows_claimed_on_the_device_give_the_same_logits(variant, path):
    """Called directly (no engine keeps room), each forward counts its new ids and grows the rows: the logits of the
    tables on the device, bit for bit, as new ids arrive step after step."""
    model = tiny_model(variant, seed=5)
    model.set_decode_path(path)
    prompts, steps = torch.randint(0, 100, (3, 7)), torch.randint(100, 300, (4, 3))
    prompt_lengths = torch.tensor([7, 2, 5])
    expected = stepped_logits(model, prompts, prompt_lengths, steps)
    offload = device_offload(model)
    assert torch.equal(stepped_logits(model, prompts, prompt_lengths, steps), expected)
    assert offload.check() == len(set(prompts.flatten().tolist()) | set(steps.flatten().tolist()))
    assert 4 < offload.capacity < int(steps.max())  # grew, and a read by id would be past the rows


@needs_interpreter
@pytest.mark.parametrize("path", ["gate-table", "kernel", "grouped"])
def test_engine_keeps_room_for_rows_claimed_on_the_device(monkeypatch, path):
    """GenerationEngine with rows claimed on the device: the tokens of the tables on the device over two calls (the
    second reusing the first's rows and steps); the room kept ahead of the ids grows mid-call when the steps' ids
    could pass it, and the steps (graphs on CUDA) are dropped then, and only then."""
    from egmla.infer import engine as engine_module

    def generate(offload: bool):
        model = tiny_model("eg-mla", seed=7)
        use_triton_decode(model, path) if path != "gate-table" else model.set_decode_path(path)
        engine = GenerationEngine(model, decode_path=path, offload_gate_tables=offload)
        if path != "gate-table":
            for layer in model.layers:
                layer.attn.grouped_backend = "kernel"
        return engine, model

    engine, _ = generate(offload=False)
    expected = [r.token_ids for r in engine.generate(PROMPTS, 12) + engine.generate(PROMPTS[:2], 5)]
    engine, model = generate(offload=True)
    offload = device_offload(model, engine)
    drops = []
    monkeypatch.setattr(engine, "drop_steps", lambda: drops.append(offload.capacity) or
                        GenerationEngine.drop_steps(engine))
    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 1000)  # room for 4 per row more: must grow mid-call
    got = engine.generate(PROMPTS, 12)
    grown = len(drops)
    got += engine.generate(PROMPTS[:2], 5)
    assert [r.token_ids for r in got] == expected
    assert grown >= 2  # the call's start (its prompts' ids) and at least once mid-call
    assert drops == sorted(drops) and offload.capacity == drops[-1]  # each drop came with a growth
    assert offload.check() <= offload.capacity


@needs_interpreter
def test_ids_past_the_room_kept_are_an_error_not_wrong_gates():
    model = tiny_model("eg-mla", seed=5)
    model.set_decode_path("gate-table")
    offload = device_offload(model)
    offload.make_room(2)  # a caller that promised room for 2 ids, then fed 7
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]))
    with pytest.raises(RuntimeError, match="gate-row cache overflow: 7 ids resident in 4 rows"):
        offload.check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("path", ["gate-table", "kernel", "grouped"])
def test_engine_with_offload_replays_cuda_graphs_and_generates_the_same_tokens(monkeypatch, step_log_probs, path):
    """On CUDA an offload no longer turns the graphs off: decode (and prefill) steps are captured with the claim
    launches in them, the room grows mid-call (graphs captured again), and the greedy tokens are those of the tables
    on the device, over two calls, and so is every step's distribution (bf16: against the same graphs' on the tables
    on the device, not a full forward, which bf16 rounding moves by ~1e-2)."""
    from egmla.infer import engine as engine_module

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)  # 4 rows per sequence: grows mid-call
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (9, 3, 14, 6)]

    def generate(offload: bool):
        model = tiny_model("eg-mla", seed=7).to("cuda", torch.bfloat16)
        engine = GenerationEngine(model, decode_path=path, offload_gate_tables=offload)
        tokens, log_probs = [], []  # log_probs: each call's steps (`select_next` reads a replayed graph's logits too)
        for call_prompts, new_tokens in ((prompts, 24), (prompts[:2], 10)):
            step_log_probs.clear()
            tokens += [r.token_ids for r in engine.generate(call_prompts, new_tokens)]
            log_probs.append(list(step_log_probs))
        return tokens, log_probs, engine

    expected, expected_log_probs, _ = generate(offload=False)
    got, got_log_probs, engine = generate(offload=True)
    assert engine.cuda_graphs and engine.last_stats.cuda_graphs
    assert got == expected
    for call, (want, steps) in enumerate(zip(expected_log_probs, got_log_probs)):
        assert len(steps) == len(want), call
        for step, (a, b) in enumerate(zip(steps, want)):  # the offload serves the very rows: the same arithmetic
            assert a.shape == b.shape and torch.isfinite(a).all(), (call, step)
            assert relative_error(a, b) < 1e-4, (call, step, relative_error(a, b))
    assert set().union(*expected) - set().union(*prompts)  # ids the prompts lack
    assert engine.offload.check() <= engine.offload.capacity
