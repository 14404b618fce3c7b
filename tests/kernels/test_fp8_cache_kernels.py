"""The kernels that write or read an fp8 KV cache (float8_e4m3fn), each against its PyTorch reference: the decode
kernels read the stored fp8 values widened to the query's dtype (so they equal the reference on those values to the
query dtype's tolerance), and the append kernels store what `quantize` stores (saturated at +-448, rounded once),
writing nothing else. The GPU test runs them in bf16 as the model does."""
import pytest
import torch

from egmla.attention.cache import FP8, quantize
from tests.kernels.conftest import kernel_device, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton

try:  # the kernel of test_stored_rounds_as_torch_does (a jit function must live at module level)
    import triton
    import triton.language as tl

    from egmla.kernels.fp8 import stored

    @triton.jit
    def _cast_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, stored(tl.load(x_ptr + offs), out_ptr + offs))
except ImportError:  # no Triton: requires_triton skips every test here
    _cast_kernel = None


def fp8(shape, device, scale=3.0, spare=5):
    """An fp8 cache tensor [batch, T, ...], a view of a longer buffer as the model passes it."""
    batch, length, *rest = shape
    return quantize(scale * torch.randn(batch, length + spare, *rest, device=device), FP8)[:, :length]


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("half,widen_once", [(False, None), (True, None), (True, False)])
def test_mla_decode_reads_an_fp8_cache(num_splits, half, widen_once):
    """half: a 16-bit query, whose dots over an fp8 cache run in fp16 (FP16_DOTS); else fp32 (the CPU's model dtype).
    widen_once None: on a GPU the tile is widened once in registers (egmla.kernels.fp8.widened); False: where Triton
    places it."""
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    dtype, tol = ((torch.bfloat16 if device == "cuda" else torch.float16, 1e-2) if half
                  else (torch.float32, 1e-4))
    q_latent, q_pe = torch.randn(3, 5, 24, device=device).to(dtype), torch.randn(3, 5, 8, device=device).to(dtype)
    latent, k_rope = fp8((3, 70, 24), device), fp8((3, 70, 8), device)
    lengths = torch.tensor([1, 70, 33], device=device)
    out = mla_decode(q_latent, q_pe, latent, k_rope, lengths, scale=0.1, num_splits=num_splits, block_t=16,
                     out=poisoned((3, 5, 24), dtype, device), widen_once=widen_once)
    ref = mla_decode_ref(q_latent, q_pe, latent, k_rope, lengths, scale=0.1)
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("widen_once", [None, False])
def test_gqa_decode_reads_an_fp8_cache(heads, kv_heads, widen_once):
    """On a GPU: a bf16 query, the dots in fp16, V widened once in registers (None) or where Triton places it."""
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref

    device = kernel_device()
    dtype, tol = (torch.bfloat16, 1e-2) if device == "cuda" else (torch.float32, 1e-4)
    q = torch.randn(2, heads, 16, device=device).to(dtype)
    k, v = fp8((2, 40, kv_heads, 16), device, scale=1.0), fp8((2, 40, kv_heads, 16), device)
    lengths = torch.tensor([40, 17], device=device)
    out = gqa_decode(q, k, v, lengths, 0.25, num_splits=3, block_t=16, widen_once=widen_once)
    ref = gqa_decode_ref(q, k, v, lengths, 0.25)
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("half", [False, True])
def test_the_decode_kernels_read_fp8_keep_rope(half):
    """fp8-keep-rope: MLA's fp8 latent beside RoPE keys in the query's dtype (under a 16-bit query the latent's dots
    in fp16, the RoPE dot in the query's own dtype: ROPE_FP16 off), and MHA's wide K beside an fp8 V (the dots in the
    query's dtype, V widened as read); each equals its reference over the same values widened."""
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.gqa_decode_ref import gqa_decode_ref
    from egmla.kernels.mla_decode import mla_decode
    from egmla.kernels.mla_decode_ref import mla_decode_ref

    device = kernel_device()
    dtype, tol = half_or_fp32(half, device)
    q_latent, q_pe = torch.randn(3, 5, 24, device=device).to(dtype), torch.randn(3, 5, 8, device=device).to(dtype)
    latent, k_rope = fp8((3, 70, 24), device), (3 * torch.randn(3, 75, 8, device=device)).to(dtype)[:, :70]
    lengths = torch.tensor([1, 70, 33], device=device)
    out = mla_decode(q_latent, q_pe, latent, k_rope, lengths, scale=0.1, num_splits=3, block_t=16,
                     out=poisoned((3, 5, 24), dtype, device))
    ref = mla_decode_ref(q_latent, q_pe, latent, k_rope, lengths, scale=0.1)
    assert out.dtype == dtype and out.isfinite().all() and rel_err(out, ref) < tol
    q = torch.randn(2, 6, 16, device=device).to(dtype)
    k, v = torch.randn(2, 40, 2, 16, device=device).to(dtype), fp8((2, 40, 2, 16), device)
    out = gqa_decode(q, k, v, torch.tensor([40, 17], device=device), 0.25, num_splits=3, block_t=16)
    ref = gqa_decode_ref(q, k, v, torch.tensor([40, 17], device=device), 0.25)
    assert out.dtype == dtype and out.isfinite().all() and rel_err(out, ref) < tol


def test_widening_once_is_refused_where_nothing_is_fp8():
    from egmla.kernels.gqa_decode import gqa_decode
    from egmla.kernels.mla_decode import mla_decode

    device = kernel_device()
    q, cache = torch.randn(1, 2, 16, device=device), torch.randn(1, 8, 2, 16, device=device)
    with pytest.raises(ValueError, match="widen_once=True: only an fp8 cache"):
        gqa_decode(q, cache, cache, torch.tensor([8], device=device), 0.25, widen_once=True)
    with pytest.raises(ValueError, match="widen_once=True: only an fp8 cache"):
        mla_decode(q, q, cache[:, :, 0], cache[:, :, 1], torch.tensor([8], device=device), 0.25, widen_once=True)


def half_or_fp32(half: bool, device: str) -> tuple[torch.dtype, float]:
    """The model's dtype for an fp8 test and its tolerance: 16-bit (bf16 on a GPU, fp16 in the interpreter, which gets
    bf16 wrong) or fp32."""
    if not half:
        return torch.float32, 1e-4
    return (torch.bfloat16 if device == "cuda" else torch.float16), 1e-2


@pytest.mark.parametrize("half,num_splits,heads_per_program", [(False, None, 1), (True, 3, 2), (True, 1, 1)])
def test_egmla_decode_reads_an_fp8_cache(half, num_splits, heads_per_program):
    """EG-MLA's fused rebuild over an fp8 cache: the latents and RoPE keys widened to the model's dtype as read, the
    gate table, weights and output in that dtype; the statistics pass over the same fp8 latents equals the reference's
    over the widened ones."""
    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref
    from tests.kernels.test_egmla_decode import make_inputs, stats_for

    device = kernel_device()
    dtype, tol = half_or_fp32(half, device)
    inputs = make_inputs(3, 3, 16, 8, 20, 8, 50, 40, [1, 50, 23], dtype, device)
    inputs["latent"], inputs["k_rope"] = fp8((3, 50, 20), device, scale=1.0), fp8((3, 50, 8), device, scale=1.0)
    widened = dict(inputs, latent=inputs["latent"].to(dtype), k_rope=inputs["k_rope"].to(dtype))
    stats = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                   n_heads=3, d_n=16)
    assert rel_err(stats, stats_for(widened, "layernorm", "mul")) < tol
    out = egmla_decode(**inputs, ln_stats=stats, scale=0.2, num_splits=num_splits, block_t=16,
                       heads_per_program=heads_per_program, out=poisoned((3, 3, 8), dtype, device))
    ref = egmla_decode_ref(**widened, scale=0.2)  # its own statistics, from the widened latents
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("half,widen_once,ids", [(False, None, "random"), (True, None, "repeated"),
                                                 (True, False, "random")])
def test_grouped_decode_reads_an_fp8_cache(half, widen_once, ids):
    """EG-MLA's grouped decode over an fp8 cache: the attend launch widens each latent tile to A's dtype (the model's)
    once in registers on a GPU (None) or where Triton places it (False); A, S and the output stay in the model's
    dtype."""
    from egmla.kernels.egmla_decode_ref import layernorm_stats
    from egmla.kernels.grouped_decode import grouped_decode, make_plan
    from egmla.kernels.grouped_decode_ref import grouped_decode_ref
    from tests.kernels.test_grouped_decode import make_case

    device = kernel_device()
    dtype, tol = half_or_fp32(half, device)
    lengths = [40, 17, 1]
    case, groups = make_case(3, 6, 16, 8, 20, 8, lengths, 50, dtype, device, high=3 if ids == "repeated" else None)
    max_len = case["latent"].shape[1]
    case["latent"], case["k_rope"] = fp8((3, max_len, 20), device, scale=1.0), fp8((3, max_len, 8), device, scale=1.0)
    widened = dict(case, latent=case["latent"].to(dtype), k_rope=case["k_rope"].to(dtype))
    tokens = groups.distinct_ids.gather(1, groups.slots.long())  # each position's id
    widened["ln_stats"] = case["ln_stats"] = layernorm_stats(widened["latent"], case["gate_table"][tokens],
                                                             case["wkv_b"], 1e-6, "mul", "layernorm")
    out = grouped_decode(plan=make_plan(groups, 16), out=poisoned((3, 6, 8), dtype, device), widen_once=widen_once,
                         **case)
    ref = grouped_decode_ref(slots=groups.slots, distinct_ids=groups.distinct_ids, lengths=groups.lengths, **widened)
    assert out.dtype == dtype and out.isfinite().all()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("half,widen_once", [(False, None), (True, None), (True, False)])
def test_bias_decode_reads_an_fp8_cache(half, widen_once):
    """The same-table controls' absorbed pass over an fp8 cache: its dots in the queries' dtype (the model's), each tile
    widened as read, once in registers on a GPU (None) or where Triton places it (False)."""
    from egmla.kernels.bias_decode import bias_decode, bias_pass
    from egmla.kernels.bias_decode_ref import bias_decode_ref
    from tests.kernels.test_bias_decode import inputs

    device = kernel_device()
    dtype, tol = half_or_fp32(half, device)
    args = inputs(dtype, device)
    args["latent"], args["k_rope"] = fp8((3, 40, 16), device, scale=1.0), fp8((3, 40, 16), device, scale=1.0)
    if widen_once is not None:  # the pass alone takes the setting; bias_decode takes the default
        parts = bias_pass(*(args[name] for name in ("q_absorbed", "q_pe", "q_terms", "latent", "k_rope", "ln_stats",
                                                     "slots", "per_id", "lengths", "scale")), block_t=16,
                          widen_once=widen_once)
        default = bias_pass(*(args[name] for name in ("q_absorbed", "q_pe", "q_terms", "latent", "k_rope", "ln_stats",
                                                       "slots", "per_id", "lengths", "scale")), block_t=16)
        for a, b in zip(parts[:2], default[:2]):  # the same widened values into the same dots
            assert torch.equal(a, b)
    out = bias_decode(**args, num_splits=3, block_t=16)
    ref = bias_decode_ref(**dict(args, latent=args["latent"].to(dtype), k_rope=args["k_rope"].to(dtype)))
    for name, o, r in zip(("out_latent", "mean", "mass"), out, ref):
        assert o.isfinite().all() and rel_err(o[:2], r[:2]) < tol, name


def test_stored_rounds_as_torch_does():
    """`stored` (what the append kernels write) equals torch's clamp-and-cast bit for bit: ties to even, carries into
    the exponent, subnormals, saturation. (Triton's interpreter gets the first two wrong when left to cast itself.)"""
    device = kernel_device()
    x = torch.cat([torch.randn(3000) * 10, torch.randn(1000) * 0.01, torch.randn(1000) * 300, torch.randn(500) * 1e-3,
                   torch.tensor([1.9866, 100.0, 104.0, 1.0625, -1.9375, 1e6, -1e6, 448.0, 464.0, 2 ** -10, 3 * 2 ** -10,
                                 1.5 * 2 ** -9, 0.015625 * 1.03125])])
    x = torch.cat([x, torch.zeros(8192 - len(x))]).to(device)
    out = torch.empty(8192, dtype=FP8, device=device)
    _cast_kernel[(1,)](x, out, BLOCK=8192)
    assert torch.equal(out.float(), quantize(x, FP8).float())


def close_in_fp8(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """out (stored fp8) equals ref quantized, but for the elements where ref's fp32 value (computed in another order
    than the kernel's) sits at an fp8 rounding boundary: those may differ by one fp8 step."""
    expected = quantize(ref, FP8).float()
    got = out.float()
    step = (expected.abs() * 2 ** -3).clamp(min=2 ** -9)  # e4m3: 3 mantissa bits; subnormal step 2^-9
    return bool(((got - expected).abs() <= step).all()) and (got == expected).float().mean().item() > 0.95


def test_latent_append_stores_fp8():
    from egmla.kernels.latent_append import latent_append
    from egmla.kernels.latent_append_ref import latent_append_ref

    device = kernel_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, seq, d_c, d_r, max_len = 3, 2, 32, 16, 10
    projected = torch.randn(batch, seq, d_c + d_r, device=device).to(dtype)
    projected[0, 0, d_c:] *= 1000  # the RoPE key past fp8's range: saturates
    weight = (1 + 0.3 * torch.randn(d_c, device=device)).to(dtype)
    angles = torch.rand(max_len, d_r // 2, device=device) * 6.0
    positions = torch.stack([torch.tensor([1, 2]), torch.tensor([5, 6]), torch.tensor([8, 9])]).to(device)
    cos, sin = angles.cos()[positions], angles.sin()[positions]
    latent = poisoned((batch + 1, max_len, d_c), torch.float32, device).to(FP8)[:batch]
    k_rope = poisoned((batch + 1, max_len, d_r), torch.float32, device).to(FP8)[:batch]
    ref_latent, ref_k = torch.zeros(latent.shape, device=device), torch.zeros(k_rope.shape, device=device)
    latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope)
    latent_append_ref(projected.float(), weight.float(), 1e-6, cos, sin, positions, ref_latent, ref_k)
    written = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    written[torch.arange(batch, device=device)[:, None], positions] = True
    assert latent.float()[~written].isnan().all() and k_rope.float()[~written].isnan().all()
    assert close_in_fp8(latent[written], ref_latent[written]) and close_in_fp8(k_rope[written], ref_k[written])
    assert k_rope.float()[0, 1].abs().max().item() == 448.0  # saturated, not NaN


def test_kv_append_stores_fp8():
    from egmla.kernels.kv_append import kv_append
    from egmla.kernels.kv_append_ref import kv_append_ref

    device = kernel_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, seq, heads, kv_heads, dim, max_len = 2, 1, 4, 2, 8, 6
    q = torch.randn(batch, seq, heads, dim, device=device).to(dtype)
    k, v = (torch.randn(batch, seq, kv_heads, dim, device=device).to(dtype) for _ in range(2))
    v[0, 0, 0] *= 1e4  # past fp8's range: saturates
    angles = torch.rand(max_len, dim // 2, device=device) * 6.0
    positions = torch.tensor([[2], [5]], device=device)
    cos, sin = angles.cos()[positions], angles.sin()[positions]
    k_cache = poisoned((batch, max_len, kv_heads, dim), torch.float32, device).to(FP8)
    v_cache = poisoned((batch, max_len, kv_heads, dim), torch.float32, device).to(FP8)
    ref_q = q.clone().float()
    ref_k_cache, ref_v_cache = (torch.zeros(k_cache.shape, device=device) for _ in range(2))
    kv_append(q, k, v, cos, sin, positions, k_cache, v_cache)
    kv_append_ref(ref_q, k.float(), v.float(), cos, sin, positions, ref_k_cache, ref_v_cache)
    rows = torch.arange(batch, device=device)[:, None]
    assert close_in_fp8(k_cache[rows, positions], ref_k_cache[rows, positions])
    assert close_in_fp8(v_cache[rows, positions], ref_v_cache[rows, positions])
    assert v_cache.float()[0, 2, 0].abs().max().item() == 448.0
    assert v_cache.float()[0, 3].isnan().all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind,cache_dtype", [
    *((kind, FP8) for kind in (dict(attention="mla"), dict(attention="gqa", n_kv_heads=2), dict(attention="eg-mla"),
                               dict(attention="eg-mla", gate_norm="rmsnorm"),
                               dict(attention="eg-mla", gate_op="bias"))),
    *((kind, "fp8-keep-rope") for kind in (dict(attention="mla"), dict(attention="gqa", n_kv_heads=2),
                                           dict(attention="eg-mla"), dict(attention="eg-mla", gate_op="bias")))])
def test_the_model_decodes_from_an_fp8_cache_on_a_gpu(kind, cache_dtype):
    """bf16 model on the GPU, graph-free: the one-launch appends write the fp8 cache (EG-MLA's with the norm statistics
    of the rounded latents) and the kernels read it (EG-MLA: 'kernel' and 'grouped'; the same-table control:
    'absorbed'); the naive path reads the same cache widened. They agree to bf16's tolerance. fp8-keep-rope too (its
    RoPE keys in bf16 beside the fp8 latents)."""
    from egmla.model import Transformer
    from tests.attention.test_fp8_cache import decode_logits
    from tests.conftest import perturbed, small_config

    config = small_config(**kind)
    model = perturbed(Transformer(config)).to("cuda", torch.bfloat16).eval()
    tokens = torch.randint(0, config.vocab_size, (3, 14), device="cuda")
    with torch.no_grad():
        naive = decode_logits(model, tokens, 6, "naive", cache_dtype)
        fast_paths = [path for path in ("kernel", "grouped", "absorbed") if path in model.layers[0].attn.paths]
        for path in fast_paths:
            fast = decode_logits(model, tokens, 6, path, cache_dtype)
            assert fast.isfinite().all() and rel_err(fast, naive) < 2e-2, path


def test_the_fp8_sweep_checks_every_form_and_tables_them(tmp_path):
    """`egmla bench kernel-sweep --kernels fp8` at a tiny shape in the interpreter: MLA's and MHA's kernels over a
    16-bit cache and an fp8 one (both widening forms), each row checked against the reference (a wrong result is an
    error row), and its Markdown table's rows per form against the 16-bit cache."""
    import json

    from egmla.bench import kernel_sweep
    from egmla.bench.kernel_sweep import fp8_markdown, sweep_fp8

    rows = sweep_fp8(2, 32, torch.device(kernel_device()), configs=[(16, 4, 2)], dtype=torch.float16)
    assert [(r["kernel"], r["cache"], r.get("widen_once")) for r in rows] == [
        ("mla_decode kv64", "fp16", None), ("gqa_decode MHA", "fp16", None),
        ("mla_decode kv64", "fp8", False), ("mla_decode kv64", "fp8", True),
        ("gqa_decode MHA", "fp8", False), ("gqa_decode MHA", "fp8", True),
        ("mla_decode kv64", "fp8-keep-rope", False), ("mla_decode kv64", "fp8-keep-rope", True),
        ("gqa_decode MHA", "fp8-keep-rope", False), ("gqa_decode MHA", "fp8-keep-rope", True)]
    keep_rope = next(r for r in rows if r["cache"] == "fp8-keep-rope")  # its bytes: an fp8 latent, fp16 RoPE keys
    assert keep_rope["gbytes_per_s"] * keep_rope["us"] * 1e3 == pytest.approx(2 * 32 * (64 + 2 * kernel_sweep.D_R))
    assert all("us" in r and r["rel_err"] < 1e-2 for r in rows), rows
    (tmp_path / "s.json").write_text(json.dumps({"device": "cpu", "rows": rows}))
    fp8_markdown(str(tmp_path / "s.json"), str(tmp_path / "s.md"))
    table = (tmp_path / "s.md").read_text()
    assert table.count("| mla_decode kv64 | 2 | 32 |") == 5 and "| fp8 | once | tiles 16, 4 warps, 2 stages |" in table
    assert "| fp8-keep-rope | once |" in table
    assert "| fp16 | - | tiles 16, 4 warps, 2 stages |" in table and "| 1.00 | - |" in table, table


def test_fp8_keep_rope_launches_at_its_own_swept_defaults(monkeypatch, tmp_path):
    """Called without launch settings, MLA's and MHA's decode over fp8-keep-rope take the setting that was fastest for
    that format at both swept shapes on the H100 (docs/bench/fp8_keep_rope_h100: tiles of 128; MHA 8 warps, 3
    stages); bf16 and fp8 caches keep theirs. The sweep's table reads the default per form, and a file from before
    per-form defaults (one setting for every form) still tables."""
    import json

    from egmla.bench.kernel_sweep import fp8_launch_defaults, fp8_markdown
    from egmla.kernels import gqa_decode as g
    from egmla.kernels import mla_decode as m

    launched = []
    for module in (g, m):
        monkeypatch.setattr(module, "launch_first_fitting", lambda key, tiles, launch: launched.append((key, tiles)))
    fp8, b, t = torch.float8_e4m3fn, 2, 8
    q, lengths = torch.randn(b, 12, 64, dtype=torch.bfloat16), torch.full((b,), t)
    for k_dtype, v_dtype in ((torch.bfloat16, torch.bfloat16), (fp8, fp8), (torch.bfloat16, fp8)):
        k, v = torch.zeros(b, t, 12, 64, dtype=k_dtype), torch.zeros(b, t, 12, 64, dtype=v_dtype)
        g.gqa_decode(q, k, v, lengths, 0.1)
        m.mla_decode(q, q, torch.zeros(b, t, 64, dtype=v_dtype), torch.zeros(b, t, 64, dtype=k_dtype), lengths, 0.1)
    (bf16_gqa, _), (bf16_mla, _), (fp8_gqa, _), (fp8_mla, _), (keep_gqa, keep_tiles), (keep_mla, _) = launched
    assert bf16_gqa[-3:] == fp8_gqa[-3:] == ((64, 32, 16), 4, 2) and keep_gqa[-3:] == ((128, 64, 32, 16), 8, 3)
    assert bf16_mla[-1] == fp8_mla[-1] == (64, 32, 16) and keep_mla[-1] == (128, 64, 32, 16) and keep_tiles[0] == 128

    defaults = fp8_launch_defaults()
    assert defaults["gqa_decode MHA"]["fp8-keep-rope"] == {"block_t": 128, "num_warps": 8, "num_stages": 3}
    rows = [{"kernel": "gqa_decode MHA", "batch": 2, "context": 8, "cache": cache, "widen_once": once, "block_t": tile,
             "num_warps": warps, "num_stages": stages, "us": us}
            for cache, once in (("bf16", None), ("fp8-keep-rope", True))
            for tile, warps, stages, us in ((64, 4, 2, 10.0 if cache == "bf16" else 9.0), (128, 8, 3, 7.0))]
    for recorded, keep_default in ((defaults, "7.0"), ({"gqa_decode MHA": defaults["gqa_decode MHA"]["bf16"]}, "9.0")):
        (tmp_path / "s.json").write_text(json.dumps({"device": "x", "defaults": recorded, "rows": rows}))
        fp8_markdown(str(tmp_path / "s.json"), str(tmp_path / "s.md"))
        table = (tmp_path / "s.md").read_text()
        assert "| bf16 | - | tiles 128, 8 warps, 3 stages | 7.0 |" in table and table.count("| 10.0 |") == 1, table
        assert "| fp8-keep-rope | once | tiles 128, 8 warps, 3 stages | 7.0 |" in table
        assert table.rstrip().endswith(f"| {keep_default} |"), table
