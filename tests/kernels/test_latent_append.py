"""MLA's cache append in one launch vs its PyTorch reference (the norm, the rotation and the index writes the model
runs otherwise): fresh random inputs, ragged positions, several new tokens, strided views, buffers poisoned with NaN
so a write to a wrong place shows; the model's decode through it equals the full forward; and on a GPU, the model
takes it only without gradients. EG-MLA's one-token steps also write their norm statistics from that launch."""
import dataclasses

import pytest
import torch

from tests.kernels.conftest import kernel_device, needs_cuda, poisoned, rel_err, requires_triton

pytestmark = requires_triton


def inputs(batch, seq, d_c, d_r, max_len, dtype, device, weighted=True):
    wide = torch.randn(batch, seq, d_c + d_r + 5, device=device).to(dtype)
    projected = wide[..., : d_c + d_r]  # a view with row stride d_c + d_r + 5, as a slice of a wider product
    weight = (1 + 0.3 * torch.randn(d_c, device=device)).to(dtype) if weighted else None
    angles = torch.rand(max_len, d_r // 2, device=device) * 6.0
    positions = torch.stack([torch.randperm(max_len - seq, device=device)[:1] + torch.arange(seq, device=device)
                             for _ in range(batch)])  # ragged starts
    cos, sin = angles.cos()[positions], angles.sin()[positions]
    return projected, weight, cos, sin, positions


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("batch,seq,d_c,d_r,weighted", [(3, 1, 64, 32, True), (2, 3, 10, 4, True),
                                                          (4, 1, 48, 16, False)])
def test_latent_append_matches_the_reference(dtype, tol, batch, seq, d_c, d_r, weighted):
    from egmla.kernels.latent_append import latent_append
    from egmla.kernels.latent_append_ref import latent_append_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    max_len = 12
    projected, weight, cos, sin, positions = inputs(batch, seq, d_c, d_r, max_len, dtype, device, weighted)
    # the cache's first `batch` rows of a larger allocation, as KVCache.rows gives a decode step
    latent = poisoned((batch + 2, max_len, d_c), dtype, device)[:batch]
    k_rope = poisoned((batch + 2, max_len, d_r), dtype, device)[:batch]
    ref_latent, ref_k = poisoned(latent.shape, torch.float32, device), poisoned(k_rope.shape, torch.float32, device)
    kept = latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope, keep_latent=True)
    ref_kept = latent_append_ref(projected.float(), None if weight is None else weight.float(), 1e-6, cos, sin,
                                 positions, ref_latent, ref_k, keep_latent=True)
    assert kept.shape == (batch, seq, d_c) and kept.dtype == dtype and rel_err(kept, ref_kept) < tol
    rows = torch.arange(batch, device=device)[:, None]
    written = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    written[rows, positions] = True
    assert latent[~written].isnan().all() and k_rope[~written].isnan().all(), "wrote outside the new positions"
    assert rel_err(latent[written], ref_latent[written]) < tol and not latent[written].isnan().any()
    assert rel_err(k_rope[written], ref_k[written]) < tol and not k_rope[written].isnan().any()


def test_bad_inputs_name_the_field():
    from egmla.kernels.latent_append import latent_append

    projected, weight, cos, sin, positions = inputs(2, 1, 8, 4, 6, torch.float32, "cpu")
    latent, k_rope = torch.zeros(2, 6, 8), torch.zeros(2, 6, 4)
    with pytest.raises(ValueError, match="d_c \\+ d_r"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, torch.zeros(2, 6, 9), k_rope)
    with pytest.raises(ValueError, match="cos"):
        latent_append(projected, weight, 1e-6, cos.double(), sin, positions, latent, k_rope)
    with pytest.raises(ValueError, match="positions"):
        latent_append(projected, weight, 1e-6, cos, sin, positions.float(), latent, k_rope)
    with pytest.raises(ValueError, match="k_rope"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, torch.zeros(3, 6, 4))


def stats_inputs(batch, n_heads, width, d_c, vocab, max_len, dtype, device, gate_op, norm, eps=1e-5):
    """AppendedStats over poisoned statistics rows of a larger allocation, with ids repeated across the batch."""
    from egmla.kernels.latent_append import AppendedStats

    ids = torch.randint(0, vocab, (batch, 1), device=device)
    ids[-1] = ids[0]  # two sequences appending one id
    gate_table = (1 + 0.5 * torch.randn(vocab, n_heads * width, device=device)).to(dtype)
    wkv_b = (torch.randn(n_heads * width, d_c, device=device) / d_c ** 0.5 + 0.2).to(dtype)  # a nonzero mean
    out = poisoned((batch + 2, max_len, 2), torch.float32, device)[:batch]
    arrivals = torch.zeros(batch + 1, dtype=torch.int32, device=device)[1:]  # a view, as KVCache.rows gives
    return AppendedStats(ids, gate_table, wkv_b, n_heads, gate_op, norm, eps, out, arrivals)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("gate_op,norm,n_heads,width", [("mul", "layernorm", 3, 14), ("add", "layernorm", 1, 8),
                                                        ("mul", "rmsnorm", 4, 6), ("bias-v", "layernorm", 3, 14)])
def test_append_with_statistics_matches_the_reference(dtype, tol, gate_op, norm, n_heads, width):
    """The append's own launch also writes EG-MLA's (mu, rho) of the new positions, as the reference computes them
    from the latents as cached (heads' shares merged by the last head to arrive); twice in a row, as a step's layers
    call it, so the per-sequence counters must be back at 0 after each call; nothing else written."""
    from egmla.kernels.latent_append import latent_append
    from egmla.kernels.latent_append_ref import latent_append_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    batch, d_c, d_r, max_len = 3, 16, 8, 12
    stats = stats_inputs(batch, n_heads, width, d_c, 20, max_len, dtype, device, gate_op, norm)
    ref_stats = dataclasses.replace(stats, out=poisoned(stats.out.shape, torch.float32, device))
    latent, k_rope = poisoned((batch, max_len, d_c), dtype, device), poisoned((batch, max_len, d_r), dtype, device)
    ref_latent, ref_k = latent.clone(), k_rope.clone()
    written = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    for _ in range(2):
        projected, weight, cos, sin, positions = inputs(batch, 1, d_c, d_r, max_len, dtype, device)
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope, stats=stats)
        latent_append_ref(projected, weight, 1e-6, cos, sin, positions, ref_latent, ref_k, stats=ref_stats)
        assert (stats.arrivals == 0).all(), "the counters must be left at zero for the next layer's launch"
        written[rows, positions] = True
        assert stats.out[~written].isnan().all(), "wrote statistics outside the new positions"
        assert rel_err(latent[written], ref_latent[written]) < tol and rel_err(k_rope[written], ref_k[written]) < tol
        got, want = stats.out[written], ref_stats.out[written]
        assert not got.isnan().any() and rel_err(got, want) < tol
        if norm == "rmsnorm":
            assert (got[:, 0] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
@pytest.mark.parametrize("seq,with_stats", [(1, False), (3, False), (1, True)])
def test_the_query_rotates_in_the_same_launch(dtype, tol, seq, with_stats):
    """q_rope, the RoPE slice of each head's query inside a wider product (as the merged input GEMM lays it out), is
    rotated in place by either append kernel as `rope_ref` rotates it; the rest of the product is left as it was."""
    from egmla.kernels.latent_append import latent_append
    from egmla.kernels.rope_ref import rope_ref

    device = kernel_device()
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16
    batch, heads, d_c, d_r, max_len = 2, 5, 16, 8, 12
    projected, weight, cos, sin, positions = inputs(batch, seq, d_c, d_r, max_len, dtype, device)
    product = torch.randn(batch, seq, d_c + d_r + heads * (6 + d_r), device=device).to(dtype)  # [kv part ; query]
    query = product[..., d_c + d_r:].unflatten(-1, (heads, 6 + d_r))
    q_rope = query[..., 6:]
    before = product.clone()
    want = rope_ref(q_rope, cos, sin)
    stats = stats_inputs(batch, heads, 7, d_c, 20, max_len, dtype, device, "mul", "layernorm") if with_stats else None
    latent, k_rope = poisoned((batch, max_len, d_c), dtype, device), poisoned((batch, max_len, d_r), dtype, device)
    latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope, stats=stats, q_rope=q_rope)
    assert rel_err(q_rope, want) < tol and not q_rope.isnan().any()
    untouched = torch.ones_like(product, dtype=torch.bool)
    untouched[..., d_c + d_r:].unflatten(-1, (heads, 6 + d_r))[..., 6:] = False
    assert torch.equal(product[untouched], before[untouched]), "wrote outside the query's RoPE slice"


def test_append_with_statistics_names_bad_inputs():
    from egmla.kernels.latent_append import latent_append

    projected, weight, cos, sin, positions = inputs(2, 1, 8, 4, 6, torch.float32, "cpu")
    latent, k_rope = torch.zeros(2, 6, 8), torch.zeros(2, 6, 4)
    stats = stats_inputs(2, 2, 5, 8, 10, 6, torch.float32, "cpu", "mul", "layernorm")
    two, w2, c2, s2, p2 = inputs(2, 2, 8, 4, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match="one new token per sequence"):
        latent_append(two, w2, 1e-6, c2, s2, p2, latent, k_rope, stats=stats)
    with pytest.raises(ValueError, match="arrivals"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope,
                      stats=dataclasses.replace(stats, arrivals=stats.arrivals.long()))
    with pytest.raises(ValueError, match="norm='none'"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope,
                      stats=dataclasses.replace(stats, norm="none"))
    with pytest.raises(ValueError, match="out"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope,
                      stats=dataclasses.replace(stats, out=torch.zeros(2, 5, 2)))
    with pytest.raises(ValueError, match="q_rope"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope, q_rope=torch.zeros(2, 1, 3, 6))
    with pytest.raises(ValueError, match="2 heads"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope, stats=stats,
                      q_rope=torch.zeros(2, 1, 3, 4))
    transposed = stats.wkv_b.t().contiguous().t()  # the same values, columns strided: the kernel steps rows only
    with pytest.raises(ValueError, match="wkv_b.stride"):
        latent_append(projected, weight, 1e-6, cos, sin, positions, latent, k_rope,
                      stats=dataclasses.replace(stats, wkv_b=transposed))


@pytest.mark.parametrize("path,extra", [("kernel", {}), ("grouped", {}), ("absorbed", {"gate_op": "bias-v"}),
                                        ("kernel", {"gate_norm": "rmsnorm"})])
def test_one_token_steps_append_their_statistics_in_the_same_launch(monkeypatch, path, extra):
    """EG-MLA's one-token cached steps (where the kernels run) take the statistics in the append's launch, not the
    statistics pass (a prompt still takes the pass), and give the full forward's logits; the counters end at 0."""
    import egmla.attention.mla as mla
    import egmla.kernels.egmla_decode as ed
    import egmla.kernels.latent_append as kernel
    from egmla.model import Transformer
    from tests.conftest import small_config

    device = kernel_device()
    fused, passes = [], []
    original_fused, original_pass = kernel._append_with_stats, ed.layernorm_stats_triton
    monkeypatch.setattr(kernel, "_append_with_stats", lambda *a, **k: fused.append(1) or original_fused(*a, **k))
    monkeypatch.setattr(ed, "layernorm_stats_triton", lambda *a, **k: passes.append(a[0].shape[1])
                        or original_pass(*a, **k))
    monkeypatch.setattr(mla, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
    model = Transformer(small_config(attention="eg-mla", **extra)).to(device).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, model.config.vocab_size, (3, 9), device=device)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3)
        model(tokens[:, :6], cache)
        prompt_passes = list(passes)
        steps = [model(tokens[:, i: i + 1], cache) for i in range(6, 9)]
    assert len(fused) == 3 * model.config.n_layers and passes == prompt_passes
    assert cache.stats_arrivals is not None and (cache.stats_arrivals == 0).all()
    assert rel_err(torch.cat(steps, dim=1), full[:, 6:]) < 1e-4


@pytest.mark.parametrize("attention,path,extra,fused", [("mla", "absorbed", {}, True),
                                                         ("mla", "kernel", {"kv_lora_rank": 6}, True),  # folds
                                                         ("eg-mla", "kernel", {}, True),
                                                         ("eg-mla", "grouped", {}, True),
                                                         ("eg-mla", "absorbed", {"gate_op": "bias-v"}, True),
                                                         ("eg-mla", "kernel", {"gate_placement": "latent"}, False)])
def test_the_model_decodes_through_it_as_the_full_forward(monkeypatch, attention, path, extra, fused):
    """The model's cached steps with the one-launch append (on the CPU made to run in the interpreter, as it runs on a
    GPU without gradients; fp32 on either) give the full forward's logits; MLA and EG-MLA with the gate on the
    rebuilt K/V take it (EG-MLA's norm statistics from the latents it returns), with the query's RoPE rotated by it
    (no other rotation in a step), EG-MLA with the gate on the latent does not."""
    import egmla.attention.mla as mla
    import egmla.kernels.latent_append as kernel
    from egmla.model import Transformer
    from tests.conftest import small_config

    device = kernel_device()
    calls, rotations = [], []
    original, original_rope = kernel.latent_append, mla.apply_rope
    monkeypatch.setattr(kernel, "latent_append", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(mla, "apply_rope", lambda *a, **k: rotations.append(1) or original_rope(*a, **k))
    monkeypatch.setattr(mla, "no_grad_kernel_can_run", lambda x: not torch.is_grad_enabled())
    config = small_config(attention=attention, **extra)
    model = Transformer(config).to(device).eval()
    model.set_decode_path(path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), device=device)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2)
        model(tokens[:, :6], cache)  # a fresh prompt: the causal pass, which also wants the latents themselves
        assert calls == []
        rotations.clear()
        steps = [model(tokens[:, i: i + 1], cache) for i in range(6, 9)]
    assert len(calls) == (3 * model.config.n_layers if fused else 0)
    assert bool(rotations) != fused, "the query's RoPE is rotated by the append's launch exactly where it runs"
    assert rel_err(torch.cat(steps, dim=1), full[:, 6:]) < 1e-4


@needs_cuda
def test_the_model_appends_in_one_launch_on_a_gpu(monkeypatch):
    """On the GPU: MLA's and EG-MLA's cached no-grad steps go through the kernel and give the PyTorch numbers; a step
    that wants gradients does not touch it."""
    import egmla.kernels.latent_append as kernel
    from egmla.model import Transformer
    from tests.conftest import small_config

    calls = []
    original = kernel.latent_append
    monkeypatch.setattr(kernel, "latent_append", lambda *a, **k: calls.append(1) or original(*a, **k))
    for attention, expected in (("mla", True), ("eg-mla", True)):
        calls.clear()
        model = Transformer(small_config(attention=attention)).cuda().to(torch.bfloat16).eval()
        tokens = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
        with torch.no_grad():
            full = model(tokens)
            cache = model.new_cache(2)
            model(tokens[:, :5], cache)
            steps = [model(tokens[:, i: i + 1], cache) for i in (5, 6)]
        assert bool(calls) == expected, attention
        assert rel_err(torch.cat(steps, dim=1).float(), full[:, 5:].float()) < 2e-2
    calls.clear()
    model = Transformer(small_config(attention="mla")).cuda().to(torch.bfloat16)
    cache = model.new_cache(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 4), device="cuda")
    model(tokens[:, :3], cache)
    model(tokens[:, 3:], cache).float().sum().backward()
    assert calls == []
