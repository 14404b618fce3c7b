"""EG-MLA fused decode kernel and its norm-statistics pass vs the PyTorch reference: every gate op
and norm, several heads per program, ragged lengths (1 included), poisoned outputs."""
import pytest
import torch

from tests.kernels.conftest import (kernel_device, nan_past, needs_cuda, poisoned, rel_err, requires_triton,
                                   resident_rows)

pytestmark = requires_triton


def make_inputs(batch, heads, d_n, d_v, d_c, d_r, max_len, vocab, lengths, dtype, device, norm="layernorm"):
    """A dict of egmla_decode's keyword inputs (cache tensors are views of longer buffers)."""
    width = heads * (d_n + d_v)

    def randn(*shape, mean=0.0, std=1.0):
        return (mean + std * torch.randn(*shape)).to(dtype=dtype, device=device)

    return dict(
        q_nope=randn(batch, heads, d_n), q_pe=randn(batch, heads, d_r),
        latent=randn(batch, max_len + 5, d_c)[:, :max_len], k_rope=randn(batch, max_len + 5, d_r)[:, :max_len],
        token_ids=torch.randint(0, vocab, (batch, max_len + 5), dtype=torch.int32, device=device)[:, :max_len],
        lengths=torch.tensor(lengths, device=device), gate_table=randn(vocab, width, mean=1.0, std=0.5),
        wkv_b=randn(width, d_c, std=d_c ** -0.5),
        norm_weight=None if norm == "none" else randn(width, mean=1.0, std=0.3),
        norm_bias=randn(width, std=0.3) if norm == "layernorm" else None)


def stats_for(inputs, norm, gate_op, eps=1e-6):
    from egmla.kernels.egmla_decode_ref import layernorm_stats

    gates = inputs["gate_table"][inputs["token_ids"].long()]
    return layernorm_stats(inputs["latent"], gates, inputs["wkv_b"], eps, gate_op, norm)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
@pytest.mark.parametrize("gate_op", ["mul", "add", "bias"])
def test_stats_kernel_matches_reference(norm, gate_op):
    from egmla.kernels.egmla_decode import layernorm_stats_triton

    inputs = make_inputs(2, 3, 16, 8, 20, 8, 40, 30, [40, 40], torch.float32, kernel_device(), norm)
    stats = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                   n_heads=3, d_n=16, eps=1e-6, gate_op=gate_op, norm=norm, block_t=16)
    ref = stats_for(inputs, norm, gate_op)
    assert not stats.isnan().any()
    assert rel_err(stats, ref) < 1e-5


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "none"])
def test_stats_kernel_writes_at_the_cache_positions(norm):
    """With out and positions the pass writes each position's statistics at its row of the cache's buffer and
    nothing else (a decode step's append, one position per sequence at different lengths)."""
    from egmla.kernels.egmla_decode import layernorm_stats_triton

    device = kernel_device()
    inputs = make_inputs(3, 3, 16, 8, 20, 8, 1, 30, [1, 1, 1], torch.float32, device, norm)
    buffer = poisoned((3, 12, 2), torch.float32, device)
    positions = torch.tensor([[0], [7], [11]], device=device)
    out = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                 n_heads=3, d_n=16, eps=1e-6, norm=norm, block_t=16, out=buffer, positions=positions)
    assert out is buffer
    rows = torch.arange(3, device=device)[:, None]
    assert rel_err(buffer[rows, positions], stats_for(inputs, norm, "mul")) < 1e-5
    untouched = torch.ones(3, 12, dtype=torch.bool, device=device)
    untouched[rows, positions] = False
    assert buffer[untouched].isnan().all()
    with pytest.raises(ValueError, match="together"):
        layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                               n_heads=3, d_n=16, out=buffer)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_stats_kernel_matches_the_bias_controls_cache(norm):
    """What `egmla bench grouped`/`decode` write into the bias control's 'absorbed' cache on CUDA (the Triton
    pass) is what its appends write (attn.norm_stats): the statistics of the ungated W_UKV c_t."""
    from egmla.kernels.egmla_decode import layernorm_stats_triton
    from tests.infer.helpers import tiny_model

    attn = tiny_model("eg-mla-bias", gate_norm=norm).to(kernel_device()).layers[0].attn
    latent = torch.randn(2, 24, attn.kv_lora_rank, device=kernel_device())
    ids = torch.randint(0, 300, (2, 24), device=kernel_device())
    stats = layernorm_stats_triton(latent, ids, attn.gate_table_like(latent), attn.wkv_b.weight, attn.n_heads,
                                   attn.qk_nope_head_dim, attn.gate_norm.eps, gate_op=attn.gate_op,
                                   norm=attn.norm_kind, block_t=16)
    with torch.no_grad():
        assert rel_err(stats, attn.norm_stats(latent, ids)) < 1e-5


def test_fused_decode_refuses_the_bias_control():
    """The fused rebuild gates before the norm; the control adds its table after it: a clear error, not a
    silently different model."""
    from egmla.kernels.egmla_decode import egmla_decode

    inputs = make_inputs(1, 2, 8, 8, 8, 8, 4, 5, [4], torch.float32, "cpu")
    with pytest.raises(ValueError, match="gate_op='bias'.*absorbed"):
        egmla_decode(**inputs, ln_stats=stats_for(inputs, "layernorm", "mul"), scale=0.2, gate_op="bias")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("norm,gate_op,heads_per_program,num_splits", [
    ("layernorm", "mul", 1, None), ("layernorm", "mul", 2, 1), ("layernorm", "add", 4, 3),
    ("rmsnorm", "mul", 2, 3), ("none", "mul", 4, 1)])
def test_matches_reference(dtype, tol, norm, gate_op, heads_per_program, num_splits):
    from egmla.kernels.egmla_decode import egmla_decode
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref

    device = kernel_device()
    inputs = make_inputs(3, 3, 16, 8, 20, 8, 50, 40, [1, 50, 23], dtype, device, norm)
    out = egmla_decode(**inputs, ln_stats=stats_for(inputs, norm, gate_op), scale=0.2, gate_op=gate_op,
                       num_splits=num_splits, block_t=16, heads_per_program=heads_per_program,
                       out=poisoned((3, 3, 8), dtype, device))
    ref = egmla_decode_ref(**inputs, scale=0.2, eps=1e-6, gate_op=gate_op, norm=norm)
    assert not out.isnan().any()
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("num_splits,heads_per_program", [(1, 1), (9, 2)])
def test_padding_is_never_read(num_splits, heads_per_program):
    """Every cached position past a sequence's length (and past T) poisoned: NaN latent, RoPE key and statistics, and
    an id whose gate row is NaN. Lengths 0 (no position: output 0, as the reference's, not beta^V), 1, a whole
    number of tiles (32) and not (37); one split, and more splits than tiles (9: the combine with the affine)."""
    from egmla.kernels.egmla_decode import egmla_decode
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref

    device = kernel_device()
    inputs = make_inputs(4, 3, 16, 8, 20, 8, 40, 30, [0, 1, 32, 37], torch.float32, device)
    stats = stats_for(inputs, "layernorm", "mul")
    ref = egmla_decode_ref(**inputs, scale=0.2)
    lengths = inputs["lengths"]
    table = torch.cat([inputs["gate_table"], torch.full_like(inputs["gate_table"][:1], float("nan"))])  # id 30: NaN
    padded = dict(inputs, latent=nan_past(inputs["latent"], lengths), k_rope=nan_past(inputs["k_rope"], lengths),
                  token_ids=nan_past(inputs["token_ids"], lengths, fill=30), gate_table=table)
    out = egmla_decode(**padded, ln_stats=nan_past(stats, lengths), scale=0.2, num_splits=num_splits, block_t=16,
                       heads_per_program=heads_per_program, out=poisoned((4, 3, 8), torch.float32, device))
    assert out.isfinite().all()
    assert not out[0].any(), "a sequence with no position attends to nothing"
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,d_n,d_v,d_c,d_r", [(16, 128, 128, 128, 64), (12, 64, 64, 256, 64)])  # paper-1b; kv256
def test_largest_preset_widths_at_batch_one(dtype, tol, heads, d_n, d_v, d_c, d_r):
    """The widest heads and latent the presets use, one sequence, the launch's default configuration; the
    statistics pass at those widths too."""
    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref

    device = kernel_device()
    inputs = make_inputs(1, heads, d_n, d_v, d_c, d_r, 21, 50, [21], dtype, device)
    stats = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                   n_heads=heads, d_n=d_n, block_t=16)
    assert rel_err(stats, stats_for(inputs, "layernorm", "mul")) < 1e-4
    scale = (d_n + d_r) ** -0.5
    out = egmla_decode(**inputs, ln_stats=stats, scale=scale, out=poisoned((1, heads, d_v), dtype, device))
    assert out.isfinite().all()
    assert rel_err(out, egmla_decode_ref(**inputs, scale=scale)) < tol


def test_dense_head_width():
    """d_n + d_v a power of two: the heads' slices are one contiguous run (the paper-base case)."""
    from egmla.kernels.egmla_decode import egmla_decode
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref

    device = kernel_device()
    inputs = make_inputs(2, 3, 16, 16, 16, 16, 40, 30, [40, 9], torch.float32, device)
    out = egmla_decode(**inputs, ln_stats=stats_for(inputs, "layernorm", "mul"), scale=0.2, num_splits=2,
                       block_t=16, heads_per_program=2, out=poisoned((2, 3, 16), torch.float32, device))
    assert rel_err(out, egmla_decode_ref(**inputs, scale=0.2)) < 1e-4


@pytest.mark.parametrize("dtype,num_splits,id_dtype", [(torch.float32, 1, torch.int64), (torch.float32, 2, torch.int32),
                                                       (torch.float16, 2, torch.int64)])
def test_id_to_row_reads_the_rows_it_maps(dtype, num_splits, id_dtype):
    """egmla_decode(..., id_to_row=map) over the rows of a gate-table offload (each id's row at its slot) equals the
    plain call over the whole table: the same gates, read through the map."""
    from egmla.kernels.egmla_decode import egmla_decode

    device = kernel_device()
    inputs = make_inputs(3, 3, 16, 8, 20, 8, 40, 30, [1, 40, 23], dtype, device)
    stats = stats_for(inputs, "layernorm", "mul")
    settings = dict(ln_stats=stats, scale=0.2, num_splits=num_splits, block_t=16)
    plain = egmla_decode(**inputs, **settings)
    rows, id_to_row = resident_rows(inputs["gate_table"], id_dtype=id_dtype)
    mapped = egmla_decode(**{**inputs, "gate_table": rows}, **settings, id_to_row=id_to_row,
                          out=poisoned((3, 3, 8), dtype, device))
    assert torch.equal(mapped, plain)
    with pytest.raises(ValueError, match="id_to_row"):
        egmla_decode(**{**inputs, "gate_table": rows}, **settings, id_to_row=id_to_row.float())


def test_bad_inputs_raise_value_error():
    from egmla.kernels.egmla_decode import egmla_decode

    inputs = make_inputs(2, 2, 16, 16, 16, 16, 10, 20, [3, 10], torch.float32, "cpu")
    stats = stats_for(inputs, "layernorm", "mul")
    with pytest.raises(ValueError, match="heads_per_program"):
        egmla_decode(**inputs, ln_stats=stats, scale=0.1, heads_per_program=3)
    with pytest.raises(ValueError, match="gate_table"):
        egmla_decode(**{**inputs, "gate_table": inputs["gate_table"][:, :-2]}, ln_stats=stats, scale=0.1)
    with pytest.raises(ValueError, match="wkv_b.stride"):  # the kernels step over rows only
        egmla_decode(**{**inputs, "wkv_b": inputs["wkv_b"].t().contiguous().t()}, ln_stats=stats, scale=0.1)
    with pytest.raises(ValueError, match="gate_op"):
        egmla_decode(**inputs, ln_stats=stats, scale=0.1, gate_op="max")


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("config,num_splits", [(None, None), ((64, 1, 4), None), ((64, 4, 4), 1)])
@pytest.mark.gpu
@needs_cuda
def test_gpu_paper_base_shapes(dtype, config, num_splits):
    """paper-base EG-MLA kv64 (12 heads of 64+64, d_r 64), ragged lengths up to 4096, vs fp32 reference;
    the stats kernel in the same precision feeds the decode kernel, as in the model."""
    from egmla.kernels.egmla_decode import egmla_decode, layernorm_stats_triton
    from egmla.kernels.egmla_decode_ref import egmla_decode_ref

    inputs = make_inputs(8, 12, 64, 64, 64, 64, 4096, 32768, [1, 4096, 2049, 17, 4000, 640, 3, 1000], dtype, "cuda")
    stats = layernorm_stats_triton(inputs["latent"], inputs["token_ids"], inputs["gate_table"], inputs["wkv_b"],
                                   n_heads=12, d_n=64)
    assert rel_err(stats, stats_for(inputs, "layernorm", "mul")) < 1e-4
    out = egmla_decode(**inputs, ln_stats=stats, scale=128 ** -0.5, num_splits=num_splits,
                       **dict(zip(("block_t", "heads_per_program", "num_warps"), config or ())),
                       out=poisoned((8, 12, 64), dtype, "cuda"))
    assert not out.isnan().any()
    assert rel_err(out, egmla_decode_ref(**inputs, scale=128 ** -0.5)) < 1e-2


@pytest.mark.parametrize("variant, path, overrides", [
    ("eg-mla", "kernel", {}), ("eg-mla", "grouped", {"gate_norm": "rmsnorm"}), ("eg-mla", "kernel", {"gate_op": "add"}),
    ("eg-mla", "kernel", {"gate_init": "identity"}), ("eg-mla-bias", "absorbed", {}),
    ("eg-mla-bias-v", "absorbed", {"gate_norm": "rmsnorm"})])
def test_decode_step_stats_pass_matches_the_pytorch_equations(variant, path, overrides):
    """A decode step's appended (mu, rho) come from one Triton pass over the gate table where the kernels run;
    they must be the PyTorch `norm_stats` of the same positions (each gate op, norm and gate start)."""
    from tests.infer.helpers import tiny_model

    model = tiny_model(variant, **overrides).to(kernel_device())
    model.set_decode_path(path)
    latent = torch.randn(3, 1, model.config.kv_lora_rank, device=kernel_device())
    ids = torch.randint(0, model.config.vocab_size, (3, 1), device=kernel_device())
    for layer in model.layers:
        with torch.no_grad():
            stats, ref = layer.attn.appended_stats(latent, ids), layer.attn.norm_stats(latent, ids)
        assert stats.shape == ref.shape == (3, 1, 2) and not stats.isnan().any()
        assert rel_err(stats, ref) < 1e-5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant, path", [("eg-mla", "kernel"), ("eg-mla", "grouped"), ("eg-mla-bias", "absorbed")])
def test_prompt_stats_pass_matches_the_pytorch_equations(variant, path):
    """On CUDA a prompt's (mu, rho) take the same Triton pass as a decode step (bf16 model, long ragged prompt)."""
    from tests.infer.helpers import tiny_model

    model = tiny_model(variant).to("cuda", torch.bfloat16)
    model.set_decode_path(path)
    latent = torch.randn(3, 301, model.config.kv_lora_rank, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (3, 301), device="cuda")
    for layer in model.layers:
        with torch.no_grad():
            stats, ref = layer.attn.appended_stats(latent, ids), layer.attn.norm_stats(latent, ids)
        assert stats.shape == ref.shape == (3, 301, 2) and not stats.isnan().any()
        assert rel_err(stats, ref) < 1e-2
