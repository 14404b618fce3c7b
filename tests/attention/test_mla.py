"""MLA's causal attention: v padded to q/k's head dim (FlashAttention's shape) gives the unpadded result, and the K/V
buffer the causal pass builds (`keys_values`) gives the cat's K/V, forward and backward."""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from egmla.attention.mla import causal_attention
from egmla.model import Transformer
from tests.conftest import perturbed, small_config


def mla_inputs(dtype, device="cpu", batch=2, seq=33, heads=3, qk_dim=24, v_dim=8):
    q, k = (torch.randn(batch, seq, heads, qk_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, seq, heads, v_dim, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def padded_and_plain(q, k, v):
    results = []
    for pad in (True, False):
        out = causal_attention(q, k, v, 24 ** -0.5, pad_v=pad)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, grads))
    return results


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_padding_v_changes_nothing(dtype, tolerance):
    (out, grads), (out_plain, grads_plain) = padded_and_plain(*mla_inputs(dtype))
    assert out.shape == (2, 33, 3, 8)
    torch.testing.assert_close(out, out_plain, rtol=tolerance, atol=tolerance)
    for grad, grad_plain in zip(grads, grads_plain):
        assert grad.shape == grad_plain.shape
        torch.testing.assert_close(grad, grad_plain, rtol=tolerance, atol=tolerance)


def test_the_training_forward_takes_it():
    """The model's uncached forward is causal_attention (on the CPU unpadded, as before)."""
    model = Transformer(small_config(attention="mla"))
    tokens = torch.randint(0, 61, (2, 12))
    cache = model.new_cache(2, 12)
    torch.testing.assert_close(model(tokens), model(tokens, cache=cache), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention)")
def test_padded_v_runs_on_flash_attention():
    q, k, v = mla_inputs(torch.bfloat16, "cuda", seq=256, heads=4, qk_dim=128, v_dim=64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only FlashAttention: an unsupported shape raises
        out = causal_attention(q, k, v, 128 ** -0.5, pad_v=True)
    with sdpa_kernel(SDPBackend.MATH):
        reference = causal_attention(q.float(), k.float(), v.float(), 128 ** -0.5, pad_v=False)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def cat_keys_values(attn, latent, k_pe, token_ids):
    """K and V as the causal pass built them before `keys_values`: wkv_b's output split, K a cat with k^R."""
    k_nope, v = attn.expand_kv(latent, token_ids)
    return torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, attn.n_heads, -1)], dim=-1), v


@pytest.mark.parametrize("pad_v", [False, True])
def test_keys_values_buffer_equals_cat(pad_v):
    """MLA's K/V buffer (zero rows in the up-projection, k^R copied into its slot) is the cat, and with pad_v its v has
    exact zero columns up to K's width; forward and gradients of the causal attention over it match."""
    attn = Transformer(small_config(attention="mla")).double().layers[0].attn
    d_qk, d_v = attn.qk_nope_head_dim + attn.qk_rope_head_dim, attn.v_head_dim
    latent = torch.randn(2, 9, attn.kv_lora_rank, dtype=torch.float64, requires_grad=True)
    k_pe = torch.randn(2, 9, attn.qk_rope_head_dim, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 9, attn.n_heads, d_qk, dtype=torch.float64, requires_grad=True)
    k, v = attn.keys_values(latent, k_pe, None, pad_v=pad_v)
    k_ref, v_ref = cat_keys_values(attn, latent, k_pe, None)
    assert k.shape == k_ref.shape and v.shape[-1] == (d_qk if pad_v else d_v)
    torch.testing.assert_close(k, k_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v[..., :d_v], v_ref, rtol=1e-12, atol=1e-12)
    assert not v[..., d_v:].any()
    inputs = (q, latent, k_pe, attn.wkv_b.weight)
    out = causal_attention(q, k, v, attn.softmax_scale)[..., :d_v]
    out_ref = causal_attention(q, k_ref, v_ref, attn.softmax_scale, pad_v=False)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    grads, grads_ref = (torch.autograd.grad(o.sin().sum(), inputs) for o in (out, out_ref))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overrides", [dict(attention="mla"), dict(attention="eg-mla", gate_placement="latent")])
def test_training_gradients_equal_the_cat_construction(overrides, monkeypatch):
    """The training forward (in-place RoPE into the projections, the K/V buffer) gives the loss and gradients of K/V
    built by cat (fp64, so any difference is a bug, not rounding). EG-MLA's placement up builds K by cat anyway."""
    from egmla.attention.mla import MultiHeadLatentAttention

    torch.manual_seed(0)
    model = Transformer(small_config(**overrides)).double()
    tokens = torch.randint(0, 61, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    fast = loss_and_grads()
    monkeypatch.setattr(MultiHeadLatentAttention, "keys_values",
                        lambda self, latent, k_pe, ids, pad_v=False: cat_keys_values(self, latent, k_pe, ids))
    reference = loss_and_grads()
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention)")
def test_keys_values_buffer_runs_on_flash_attention():
    """K and the padded V are strided views of one buffer: FlashAttention takes them (an unsupported layout raises)."""
    config = small_config(attention="mla", d_model=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                          kv_lora_rank=64)
    attn = Transformer(config).to("cuda", torch.bfloat16).layers[0].attn
    latent = torch.randn(2, 256, 64, device="cuda", dtype=torch.bfloat16)
    k_pe = torch.randn(2, 256, 64, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 256, attn.n_heads, 128, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only FlashAttention
        out = attn.attend_causal(q, latent, k_pe, None)
    with sdpa_kernel(SDPBackend.MATH):
        k, v = cat_keys_values(copy.deepcopy(attn).float(), latent.float(), k_pe.float(), None)
        reference = causal_attention(q.float(), k, v, attn.softmax_scale, pad_v=False)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("overrides", [dict(attention="mla"), dict(attention="mla", q_lora_rank=24),
                                       dict(attention="eg-mla", gate_placement="latent")])
@pytest.mark.parametrize("path", ["naive", "absorbed", "kernel"])
def test_a_change_to_the_query_reaches_every_decode_path(overrides, path, monkeypatch):
    """`query` is the one place the query is formed, the folded decode (`forward_folded`, kv_lora_rank 6 <= d_n, d_v)
    included: a per-head logit temperature made there (docs/design.md §6) reaches the full forward and every decode
    path, whose steps still equal the full forward, and it changes the logits (so a path that ignored it would fail)."""
    from egmla.attention.mla import MultiHeadLatentAttention

    model = perturbed(Transformer(small_config(**overrides, kv_lora_rank=6))).eval()
    tokens = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        plain = model(tokens)
    temperature = torch.linspace(0.2, 5.0, model.config.n_heads)[:, None]  # [heads, 1]: scales q^C and q^R alike
    original = MultiHeadLatentAttention.query
    monkeypatch.setattr(MultiHeadLatentAttention, "query", lambda *a, **k: original(*a, **k) * temperature)
    cache = model.new_cache(2, max_len=12)
    with torch.no_grad():
        full = model(tokens)
        model.set_decode_path(path)
        assert all((layer.attn.folded is not None) == (path != "naive") for layer in model.layers)
        model(tokens[:, :7], cache)
        steps = torch.cat([model(tokens[:, i:i + 1], cache) for i in range(7, 12)], dim=1)
    assert ((full - plain).norm() / plain.norm()).item() > 1e-3  # 100 times the tolerance below
    assert ((steps - full[:, 7:]).norm() / full[:, 7:].norm()).item() < 1e-5


def later_chunk(device="cpu", dtype=torch.float32, batch=3, seq=17, kv_len=40, heads=4, d_c=10, d_r=4):
    """A later prompt chunk's attention inputs: rows that already hold 23, 5 and 0 positions (ragged, one fresh among
    them) take `seq` new tokens each, right-padded as the scheduler's runs are, over a cache of kv_len positions."""
    from egmla.attention.context import AttnContext
    held = torch.tensor([23, 5, 0][:batch], device=device)
    positions = held[:, None] + torch.arange(seq, device=device)
    zeros = torch.zeros(batch, seq, 1, device=device)
    ctx = AttnContext(torch.zeros(batch, seq, dtype=torch.long, device=device), positions, zeros, zeros, kv_len=kv_len)
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    return make(batch, seq, heads, d_c), make(batch, seq, heads, d_r), make(batch, kv_len, d_c), \
        make(batch, kv_len, d_r), ctx


# (fp64: the reference's softmax is fp32 whatever its input, so they agree to fp32 rounding only)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_a_later_chunk_through_sdpa_equals_the_reference(dtype, tolerance):
    """`latent_sdpa` (a prompt's later chunk: several new tokens over the row's cache) against `latent_reference`, the
    scores written out with an fp32 softmax, on fresh random inputs with ragged rows."""
    attn = Transformer(small_config(attention="mla")).layers[0].attn
    q_latent, q_pe, latent, k_pe, ctx = later_chunk(dtype=dtype)
    out = attn.latent_sdpa(q_latent, q_pe, latent, k_pe, ctx.mask)
    reference = attn.latent_reference(q_latent, q_pe, latent, k_pe, ctx)
    assert out.shape == reference.shape == q_latent.shape and not out.isnan().any()
    torch.testing.assert_close(out, reference, rtol=tolerance, atol=tolerance)
    # what latent_attention takes for several new tokens; one new token keeps the reference (the kernels' twin)
    torch.testing.assert_close(attn.latent_attention(q_latent, q_pe, latent, k_pe, ctx, use_kernel=False), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SDPA's memory-efficient kernel)")
def test_a_later_chunk_through_sdpa_in_bf16_on_a_gpu():
    attn = Transformer(small_config(attention="mla", d_model=768, n_heads=12, kv_lora_rank=64, qk_rope_head_dim=64,
                                    max_seq_len=512)).layers[0].attn.cuda()
    q_latent, q_pe, latent, k_pe, ctx = later_chunk("cuda", torch.bfloat16, seq=300, kv_len=400, heads=12, d_c=64,
                                                    d_r=64)
    out = attn.latent_sdpa(q_latent, q_pe, latent, k_pe, ctx.mask)
    reference = attn.latent_reference(*(t.float() for t in (q_latent, q_pe, latent, k_pe)), ctx)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)
