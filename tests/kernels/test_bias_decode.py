"""The bias control's absorbed decode kernel (egmla/kernels/bias_decode.py) against its reference, and the
model's 'absorbed' path through it against the PyTorch equations."""
import pytest
import torch

from egmla.kernels.bias_decode_ref import bias_decode_ref
from tests.kernels.conftest import kernel_device, nan_past, needs_cuda, rel_err, requires_triton

pytestmark = requires_triton


def inputs(dtype, device, batch=3, heads=3, d_c=16, d_r=16, max_len=40, cache_len=48, n_ids=7, seed=0,
           ids="random"):
    """Random decode inputs over a cache longer than max_len (strided views, as the model passes them). ids:
    'random' slots among n_ids, 'one' (one id fills the context), 'distinct' (every position its own id)."""
    torch.manual_seed(seed)
    if ids == "distinct":
        n_ids = cache_len
        slots = torch.arange(cache_len, dtype=torch.int32).expand(batch, -1).contiguous()
    elif ids == "one":
        n_ids, slots = 1, torch.zeros(batch, cache_len, dtype=torch.int32)
    else:
        slots = torch.randint(0, n_ids, (batch, cache_len), dtype=torch.int32)
    cache = dict(latent=torch.randn(batch, cache_len, d_c), k_rope=torch.randn(batch, cache_len, d_r),
                 ln_stats=torch.stack([torch.randn(batch, cache_len), torch.rand(batch, cache_len) + 0.5], -1),
                 slots=slots)
    cache = {name: t[:, :max_len].to(device) for name, t in cache.items()}
    for name in ("latent", "k_rope"):
        cache[name] = cache[name].to(dtype)
    query = dict(q_absorbed=torch.randn(batch, heads, d_c).to(device, dtype),
                 q_pe=torch.randn(batch, heads, d_r).to(device, dtype),
                 q_terms=torch.randn(batch, heads, 2, device=device), per_id=torch.randn(batch, heads, n_ids, device=device))
    lengths = torch.tensor(([max_len, 17, 0] + [max_len // 2] * batch)[:batch], device=device)  # full, ragged, empty
    return dict(q_absorbed=query["q_absorbed"], q_pe=query["q_pe"], q_terms=query["q_terms"], latent=cache["latent"],
                k_rope=cache["k_rope"], ln_stats=cache["ln_stats"], slots=cache["slots"], per_id=query["per_id"],
                lengths=lengths, scale=0.25)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("num_splits,ids", [(1, "random"), (3, "random"), (3, "one"), (3, "distinct")])
def test_kernel_matches_the_reference(dtype, tolerance, num_splits, ids):
    """Ids repeated at random, one id filling the context, every id distinct; full, ragged and empty sequences."""
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16  # bf16 on the GPU (the interpreter gives garbage for bf16)
    args = inputs(dtype, device, ids=ids)
    out = bias_decode(**args, num_splits=num_splits, block_t=16)
    ref = bias_decode_ref(**args)
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert o.isfinite().all(), name
        assert rel_err(o[:2], r[:2]) < tolerance, name
        assert torch.equal(o[2], torch.zeros_like(o[2])), name  # the empty sequence attends to nothing
    assert torch.allclose(out[2][:2].sum(-1), torch.ones(2, 3, device=device), atol=1e-4)  # mass sums to 1


@pytest.mark.parametrize("num_splits,mass", [(1, "atomic"), (9, "atomic"), (9, "grouped")])
def test_padding_is_never_read(num_splits, mass):
    """The cache poisoned past each sequence's length (and past T): NaN latent, RoPE key and statistics, and a slot
    whose score term is NaN; lengths 0, 1, a whole number of tiles (32) and not (37); one split and more splits than
    tiles (9). The numbers are the reference's over the clean cache, and the poisoned slot gets no mass."""
    from egmla.attention.cache import TokenGroups
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    args = inputs(torch.float32, device, batch=4, max_len=40, cache_len=40)
    lengths = args["lengths"] = torch.tensor([0, 1, 32, 37], device=device)
    plan = None
    if mass == "grouped":  # the mass as segment sums over a plan of the same slots
        groups = TokenGroups(4, 40, device)
        groups.append(args["slots"].long(), torch.arange(40, device=device).expand(4, -1))  # the slots as ids
        args["slots"], plan = groups.slots[:, :40], groups.plan(16)  # (slot = order of first appearance)
    ref = bias_decode_ref(**args)
    n_ids = args["per_id"].shape[-1]
    per_id = torch.cat([args["per_id"], torch.full_like(args["per_id"][..., :1], float("nan"))], -1)  # slot n_ids
    padded = dict(args, per_id=per_id, slots=nan_past(args["slots"], lengths, fill=n_ids),
                  **{name: nan_past(args[name], lengths) for name in ("latent", "k_rope", "ln_stats")})
    out = bias_decode(**padded, num_splits=num_splits, block_t=16, plan=plan)
    for name, o, r in zip(("out_latent", "mean"), out, ref):
        assert o.isfinite().all() and not o[0].any(), name
        assert rel_err(o, r) < 1e-5, name
    assert out[2].isfinite().all() and not out[2][..., n_ids:].any() and not out[2][0].any()
    assert rel_err(out[2][..., :n_ids], ref[2]) < 1e-5


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("num_stages", [2, 3])
def test_pass_without_a_score_term_matches_the_reference(dtype, tolerance, num_stages):
    """The table on V alone (per_id=None): the pass compiled without the per-position gather equals the reference
    with no score term, and equals the gathering pass given a zero score table."""
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    args = inputs(dtype, device)
    n_ids = args["per_id"].shape[-1]
    zero = dict(args, per_id=torch.zeros_like(args["per_id"]))
    out = bias_decode(**dict(args, per_id=None), n_ids=n_ids, num_splits=3, block_t=16, num_stages=num_stages)
    ref = bias_decode_ref(**dict(args, per_id=None), n_ids=n_ids)
    gathered = bias_decode(**zero, num_splits=3, block_t=16)
    for name, o, r, g in zip(("out_latent", "mean", "mass"), out, ref, gathered):
        assert o.isfinite().all(), name
        assert o.shape == r.shape, name
        assert rel_err(o[:2], r[:2]) < tolerance, name
        assert rel_err(o[:2], g[:2]) < tolerance, name


def test_reads_views_in_their_dtype_writes_combined_in_its_own_and_nothing_uninitialised(monkeypatch):
    """As the model calls it: the queries and q_terms as fp32 views of one projection over an fp16 cache (cast in
    the kernel), `combined` in the next matmul's dtype (fp16), and every buffer the call allocates full of NaN at
    first (the mass's zeros come from the combine): the reference's numbers, no NaN."""
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    args = inputs(dtype, device)
    batch, heads, d_c = args["q_absorbed"].shape
    d_r = args["q_pe"].shape[-1]
    proj = torch.randn(batch, heads, d_c + 2 + d_r + 5, device=device)  # fp32, a wider row per head
    args.update(q_absorbed=proj[..., :d_c], q_terms=proj[..., d_c:d_c + 2], q_pe=proj[..., d_c + 2:d_c + 2 + d_r])
    ref = bias_decode_ref(**args)
    combined = torch.full((batch, heads, d_c + 2 + 3), float("nan"), dtype=dtype, device=device)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")) if
                        k.get("dtype", torch.float32).is_floating_point else empty(*a, **k))
    out = bias_decode(**args, num_splits=3, block_t=16, combined=combined)
    monkeypatch.undo()
    assert out[0].dtype == dtype and not combined[..., :d_c + 2].isnan().any()
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert not o.isnan().any(), name
        assert rel_err(o[:2].float(), r[:2]) < 1e-2, name


def test_pass_without_a_score_term_needs_the_mass_width():
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.float32, kernel_device())
    with pytest.raises(ValueError, match="n_ids"):
        bias_decode(**dict(args, per_id=None))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("ids", ["random", "one", "distinct"])
def test_grouped_mass_matches_the_reference(dtype, tolerance, ids):
    """The mass as segment sums in the plan's grouped order (no atomics): the same as the reference and as the
    atomic mass, with positions registered but not visible (ragged and empty queries), one id filling the context,
    every id distinct, and more slots than one program holds."""
    from egmla.attention.cache import TokenGroups
    from egmla.kernels.bias_decode import bias_decode

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    args = inputs(dtype, device, max_len=80, cache_len=80, n_ids=45)
    batch, max_len = args["slots"].shape
    vocab = {"random": 45, "one": 1, "distinct": 10 * max_len}[ids]
    tokens = (torch.randint(0, vocab, (batch, max_len)) if ids != "distinct"
              else torch.randperm(vocab)[:batch * max_len].view(batch, max_len))
    groups = TokenGroups(batch, max_len, device)
    groups.append(tokens.to(device), torch.arange(max_len, device=device).expand(batch, -1))  # all registered
    n_cols = int(groups.n_distinct.max())
    args["slots"] = groups.slots[:, :max_len]
    args["per_id"] = torch.randn(batch, args["q_absorbed"].shape[1], n_cols, device=device)
    out = bias_decode(**args, num_splits=3, block_t=16, plan=groups.plan(16))
    ref = bias_decode_ref(**args)
    atomic = bias_decode(**args, num_splits=3, block_t=16)
    assert out[2].isfinite().all() and rel_err(out[2][:2], ref[2][:2]) < tolerance
    assert rel_err(out[2], atomic[2]) < tolerance
    assert not out[2][2].any()  # the empty query: no mass, though its positions are registered
    live = torch.arange(n_cols, device=device)[None, :] < groups.n_distinct[:, None]
    assert not out[2][~live[:, None].expand_as(out[2])].any()  # columns past a sequence's distinct ids are 0


def test_kernel_writes_into_a_callers_buffer_and_takes_strided_query_terms():
    """How the model calls it: q_terms a strided fp32 view, per_id in half precision, and the combined
    [out_latent | mean | 1 if the sequence has positions] written into the first columns of a wider buffer."""
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.float32, kernel_device())
    wide_terms = torch.randn(3, 3, 9, device=kernel_device())
    wide_terms[..., 4:6] = args["q_terms"]
    args["q_terms"] = wide_terms[..., 4:6]
    args["per_id"] = args["per_id"].half()
    combined = torch.full((3, 3, 16 + 2 + 5), float("nan"), device=kernel_device())
    out = bias_decode(**args, num_splits=3, block_t=16, combined=combined)
    ref = bias_decode_ref(**{**args, "per_id": args["per_id"].float()})
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert rel_err(o, r) < 1e-5, name
    assert out[0].data_ptr() == combined.data_ptr()
    assert torch.equal(combined[..., 17], torch.tensor([1.0, 1.0, 0.0], device=kernel_device())[:, None].expand(3, 3))
    assert combined[..., 18:].isnan().all()  # nothing written past d_c + 2


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_per_id_kernels_match_their_references(dtype, tolerance):
    """The per-id terms read each distinct id's embedding row from the table: scores q . e_u and mass-weighted
    sums of rows, for sequences with all, some and no distinct ids live (columns past n_ids are 0 / ignored),
    repeated ids, a strided q (the model's slice of its projection) and a mass laid out [batch, id, head]."""
    from egmla.kernels.bias_decode import mass_embeddings, per_id_scores
    from egmla.kernels.bias_decode_ref import mass_embeddings_ref, per_id_scores_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    torch.manual_seed(3)
    batch, heads, d_e, vocab, n_cols = 3, 5, 40, 50, 37
    table = torch.randn(vocab, d_e).to(device, dtype)
    ids = torch.randint(0, vocab, (batch, n_cols + 4), dtype=torch.int32, device=device)[:, :n_cols]
    n_ids = torch.tensor([n_cols, 11, 0], device=device)
    wide = torch.randn(batch, heads, d_e + 7, device=device)
    q_embed = wide[..., 3:3 + d_e]
    scores = per_id_scores(q_embed, table, ids, n_ids)
    ref = per_id_scores_ref(q_embed, table, ids, n_ids)
    assert scores.isfinite().all() and rel_err(scores, ref) < tolerance
    assert torch.equal(scores[1, :, 11:], torch.zeros_like(scores[1, :, 11:])) and not scores[2].any()
    mass = torch.rand(batch, heads, n_cols, device=device)
    out = torch.full((batch, heads, d_e + 9), float("nan"), device=device)
    summed = mass_embeddings(mass, table, ids, n_ids, out=out[..., 9:])
    ref = mass_embeddings_ref(mass, table, ids, n_ids)
    assert summed.isfinite().all() and rel_err(summed, ref) < tolerance
    assert not summed[2].any() and out[..., :9].isnan().all()
    # the layout bias_decode returns: a [batch, id, head] buffer seen as [batch, head, id]
    by_id = mass.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(mass_embeddings(by_id, table, ids, n_ids), mass_embeddings(mass, table, ids, n_ids))


@pytest.mark.parametrize("splits", [1, 2, 3, 10, None])
def test_embedding_sum_split_over_the_ids_matches_the_reference(splits):
    """The embedding sum with its ids split over programs (partial sums added by a second launch, written in the
    output's dtype): every split count, more splits than id blocks, a split past a sequence's ids, a sequence with
    none, and the default (split where the batch gives few programs) equal the reference."""
    from egmla.kernels import bias_decode as kernels
    from egmla.kernels.bias_decode_ref import mass_embeddings_ref

    device = kernel_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tolerance = 1e-2 if device == "cuda" else 1e-5
    torch.manual_seed(4)
    batch, heads, d_e, vocab, n_cols = 3, 5, 40, 50, 37
    table = torch.randn(vocab, d_e).to(device, dtype)
    ids = torch.randint(0, vocab, (batch, n_cols), dtype=torch.int32, device=device)
    n_ids = torch.tensor([n_cols, 11, 0], device=device)
    mass = torch.rand(batch, n_cols, heads, device=device).transpose(1, 2)  # bias_decode's layout
    ref = mass_embeddings_ref(mass, table, ids, n_ids)
    launch = dict(block_e=16, block_u=8, num_warps=1, num_stages=2, splits=splits)
    out = torch.full((batch, heads, d_e + 2), float("nan"), device=device, dtype=dtype)
    summed = kernels.mass_embeddings(mass, table, ids, n_ids, out=out[..., 2:], **launch)
    assert summed.isfinite().all() and rel_err(summed.float(), ref) < tolerance
    assert not summed[2].any() and out[..., :2].isnan().all()
    fp32 = kernels.mass_embeddings(mass, table, ids, n_ids, **launch)
    assert fp32.dtype == torch.float32 and rel_err(fp32, ref) < tolerance
    assert kernels.mass_splits(3 * 3, n_cols, 8) == 5
    assert kernels.mass_splits(kernels.MASS_SPLIT_PROGRAMS, n_cols, 8) == 1
    with pytest.raises(ValueError, match="splits=-1: must be >= 1"):
        kernels.mass_embeddings(mass, table, ids, n_ids, **dict(launch, splits=-1))


@pytest.mark.gpu
@needs_cuda
def test_kernel_in_bf16_at_paper_base_shapes():
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.bfloat16, "cuda", batch=8, heads=12, d_c=64, d_r=64, max_len=2048, cache_len=2100, n_ids=300)
    out, ref = bias_decode(**args), bias_decode_ref(**args)
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert o.isfinite().all() and rel_err(o, r) < 1e-2, name


def test_kernel_refuses_bad_shapes_by_name():
    from egmla.kernels.bias_decode import bias_decode

    args = inputs(torch.float32, kernel_device())
    args["per_id"] = args["per_id"][:, :2]
    with pytest.raises(ValueError, match=r"bias_decode: per_id.shape=\(3, 2, 7\), expected \(3, 3, 7\)"):
        bias_decode(**args)


@pytest.mark.parametrize("gate_op,norm,mass", [("bias", "layernorm", "atomic"), ("bias-v", "layernorm", "atomic"),
                                               ("bias", "rmsnorm", "atomic"), ("bias-v", "none", "atomic"),
                                               ("bias", "layernorm", "grouped"), ("bias-v", "layernorm", "grouped")])
def test_model_path_through_the_kernel_equals_the_pytorch_equations(gate_op, norm, mass):
    """The kernel path takes the per-id terms through the gate embedding (W_UE absorbed; the V-only control has
    no score term) and folds the norm's affine into its weights; the PyTorch path goes through the gate table's
    rows. Compared with a random affine, then again after the weights change in place (the folded weights must
    follow)."""
    from tests.conftest import small_config
    from egmla.model import Transformer

    config = small_config(attention="eg-mla", gate_op=gate_op, gate_norm=norm, kv_lora_rank=16, qk_rope_head_dim=16)
    torch.manual_seed(4)
    model = Transformer(config).eval().to(kernel_device())
    model.set_decode_path("absorbed")
    tokens = torch.randint(0, 9, (3, 20), device=kernel_device())
    for change in range(2):
        with torch.no_grad():
            for layer in model.layers:  # a random affine (the init's is 1 and 0), new W_UKV and W_UE rows
                for name, mean in (("weight", 1.0), ("bias", 0.0)):
                    if getattr(layer.attn.gate_norm, name, None) is not None:
                        getattr(layer.attn.gate_norm, name).normal_(mean, 0.3)
                layer.attn.wkv_b.weight.mul_(1.0 + 0.2 * change)
                layer.attn.wue.weight.add_(0.1 * change)
                layer.attn.build_gate_table()  # the PyTorch path reads the table rebuilt by hand
        logits = {}
        with torch.no_grad():
            for backend in ("pytorch", "kernel"):
                for layer in model.layers:
                    layer.attn.absorbed_backend, layer.attn.bias_mass = backend, mass
                cache = model.new_cache(3, max_len=24)
                model(tokens[:, :6], cache, n_new=torch.tensor([6, 3, 1], device=kernel_device()))
                logits[backend] = torch.cat([model(tokens[torch.arange(3), cache.lengths][:, None], cache)
                                             for _ in range(6)], dim=1)
        assert rel_err(logits["kernel"], logits["pytorch"]) < 1e-5, f"after change {change}"


def test_an_unknown_mass_mode_is_refused_by_name(monkeypatch):
    from tests.conftest import small_config
    from egmla.model import Transformer

    monkeypatch.setenv("EGMLA_BIAS_MASS", "sorted")  # read when the layers are built
    config = small_config(attention="eg-mla", gate_op="bias", kv_lora_rank=16, qk_rope_head_dim=16)
    model = Transformer(config).eval().to(kernel_device())
    model.set_decode_path("absorbed")
    for layer in model.layers:
        layer.attn.absorbed_backend = "kernel"
    cache = model.new_cache(1, max_len=8)
    tokens = torch.randint(0, 9, (1, 3), device=kernel_device())
    with torch.no_grad():
        model(tokens, cache)
        with pytest.raises(ValueError, match="bias_mass='sorted' .or EGMLA_BIAS_MASS.: choose 'atomic' or 'grouped'"):
            model(tokens[:, :1], cache)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("gate_op", ["bias", "bias-v"])
def test_model_path_in_bf16_equals_the_pytorch_equations(gate_op):
    """A bf16 model: the folded weights are bf16 (the step's matmuls on the tensor cores); its decode logits stay
    within bf16 tolerance of the PyTorch equations' over the gate table's rows."""
    from tests.conftest import small_config
    from egmla.model import Transformer

    config = small_config(attention="eg-mla", gate_op=gate_op, d_model=256, n_heads=4, kv_lora_rank=64,
                          qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
    torch.manual_seed(5)
    model = Transformer(config).eval().to("cuda", torch.bfloat16)
    model.set_decode_path("absorbed")
    assert model.layers[0].attn.absorbed_weights().query.dtype == torch.bfloat16
    tokens = torch.randint(0, config.vocab_size, (4, 40), device="cuda")
    logits = {}
    with torch.no_grad():
        for backend in ("pytorch", "kernel"):
            for layer in model.layers:
                layer.attn.absorbed_backend = backend
            cache = model.new_cache(4, max_len=48)
            model(tokens[:, :32], cache)
            logits[backend] = torch.cat([model(tokens[:, 32 + i:33 + i], cache) for i in range(8)], dim=1).float()
    assert logits["kernel"].isfinite().all() and rel_err(logits["kernel"], logits["pytorch"]) < 1e-2


def test_bias_sweep_checks_and_times_each_launch_on_the_cpu():
    """`egmla bench kernel-sweep --kernels bias` at a tiny shape in the interpreter: MLA's anchor, the pass per
    setting for both tables, and the whole decode checked against the reference (a wrong result is an error row)."""
    import torch

    from egmla.bench.kernel_sweep import sweep_bias

    ids = torch.tensor([[5, 7, 5, 9, 7, 5, 1, 2] * 4, [3] * 32])  # repeated ids; one id filling a sequence
    rows = sweep_bias(2, 32, "test", ids, torch.device("cpu"), configs=[(16, 4, 2)])
    assert [r["kernel"] for r in rows].count("mla_decode kv64 (anchor)") == 1
    for table in ("K/V table", "V table"):
        launches = [r["launch"] for r in rows if r.get("table") == table]
        assert launches == ["pass", "whole (defaults)", "whole (fastest pass)"], launches
    assert all("us" in r and "error" not in r for r in rows), rows
    assert all(r["rel_err"] < 1e-4 for r in rows if r.get("launch", "").startswith("whole")), rows


def test_mass_sweep_checks_each_launch_against_the_reference_on_the_cpu(tmp_path):
    """`egmla bench kernel-sweep --kernels mass` at a tiny shape in the interpreter: each setting of the embedding
    sum checked against the reference over each sequence's distinct ids (a wrong result is an error row), and its
    Markdown table names the default's row."""
    import json

    import torch

    from egmla.bench.kernel_sweep import mass_markdown, sweep_mass

    ids = torch.stack([(torch.arange(32) * 7) % 20 + 1, torch.full((32,), 3)])  # 20 distinct ids; one id throughout
    rows = sweep_mass(2, 32, "test", ids, torch.device("cpu"), d_e=48,
                      configs=[(16, 16, 2, 2, 1), (32, 8, 1, 3, 0), (32, 8, 1, 3, 1)])
    assert len(rows) == 3 and all("us" in r and r["rel_err"] < 1e-4 for r in rows), rows
    assert rows[0]["distinct_ids_mean"] == 10.5
    assert (rows[1]["splits"], rows[1]["splits_auto"], rows[2]["splits"]) == (3, True, 1)  # 20 ids in blocks of 8
    defaults = {"mass_embeddings": dict(block_e=32, block_u=8, num_warps=1, num_stages=3)}
    (tmp_path / "m.json").write_text(json.dumps({"device": "cpu", "defaults": defaults, "rows": rows}))
    mass_markdown(str(tmp_path / "m.json"), str(tmp_path / "m.md"))
    table = (tmp_path / "m.md").read_text()
    assert "block_e 32, block_u 8, num_warps 1, num_stages 3, splits 3 (default)" in table, table
    assert "| 2 | 32 | 10 |" in table and "num_stages 3, splits 1 |" in table, table
    mass_markdown(str(tmp_path / "m.json"), str(tmp_path / "m.md"), top=1)  # the one launch shown beside the default
    short = (tmp_path / "m.md").read_text()
    assert "num_warps 1, num_stages 3, splits 3 (default)" in short, short
    assert "block_e 32, block_u 8, num_warps 1, num_stages 3, splits 1 |" in short, short


def test_bias_sweep_table(tmp_path):
    """`kernel-sweep --markdown` on a bias sweep: per table the default and fastest pass beside MLA's, and the
    combine + mass as the whole decode minus its pass."""
    import json

    from egmla.bench.cli import run

    base = {"kernel": "bias_decode kv64", "batch": 32, "context": 4096, "ids": "python-source"}
    rows = [{**base, "ids": None, "kernel": "mla_decode kv64 (anchor)", "us": 20.0}]
    for table, scale in (("K/V table", 1.2), ("V table", 1.0)):
        rows += [{**base, "table": table, "launch": "pass", "block_t": 64, "num_warps": 4, "num_stages": 2,
                  "us": 60.0 * scale},
                 {**base, "table": table, "launch": "pass", "block_t": 64, "num_warps": 8, "num_stages": 2,
                  "us": 40.0 * scale},
                 {**base, "table": table, "launch": "whole (defaults)", "us": 90.0 * scale},
                 {**base, "table": table, "launch": "whole (fastest pass)", "us": 70.0 * scale}]
    sweep = tmp_path / "bias.json"
    sweep.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    assert run("kernel-sweep", ["--markdown", str(sweep), str(tmp_path / "bias.md")]) == 0
    lines = [line for line in (tmp_path / "bias.md").read_text().splitlines() if line.startswith("| 32")]
    assert lines == ["| 32 × 4,096 | K/V table | 20.0 | 72.0 | 48.0 (tiles of 64, 8 warps, 2 stages) | 2.40 | 108.0 | "
                     "84.0 | 36.0 |",
                     "| 32 × 4,096 | V table | 20.0 | 60.0 | 40.0 (tiles of 64, 8 warps, 2 stages) | 2.00 | 90.0 | "
                     "70.0 | 30.0 |"]
    # the default column is the defaults the file says it ran with (a file without them: 64 / 4 / 2), not today's
    sweep.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows,
                                 "defaults": {"bias_pass": {"block_t": 64, "num_warps": 8, "num_stages": 2}}}))
    assert run("kernel-sweep", ["--markdown", str(sweep), str(tmp_path / "bias.md")]) == 0
    text = (tmp_path / "bias.md").read_text()
    assert "at the default (tiles of 64, 8 warps, 2 stages)" in text
    assert "| 32 × 4,096 | V table | 20.0 | 40.0 | 40.0 (tiles of 64, 8 warps, 2 stages) |" in text
