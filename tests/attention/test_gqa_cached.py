"""GQA cached attention stacks the query heads of a KV group as rows; it must equal SDPA's own
enable_gqa on fresh random inputs and random masks (several query rows, every group size)."""
import pytest
import torch
import torch.nn.functional as F

from egmla.attention.mha import GroupedQueryAttention
from tests.conftest import small_config


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("seq", [1, 3])
def test_stacked_groups_equal_enable_gqa(n_kv_heads, seq):
    config = small_config(attention="gqa" if n_kv_heads < 4 else "mha", n_kv_heads=n_kv_heads)
    attn = GroupedQueryAttention(config)
    batch, kv_len, dim = 3, 11, attn.head_dim
    q = torch.randn(batch, seq, attn.n_heads, dim)
    k, v = torch.randn(batch, kv_len, n_kv_heads, dim), torch.randn(batch, kv_len, n_kv_heads, dim)
    mask = torch.rand(batch, 1, seq, kv_len) < 0.7
    mask[..., 0] = True  # every row sees at least one key
    ours = attn._cached_attention(q, k, v, mask)
    reference = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, enable_gqa=n_kv_heads != attn.n_heads)
    assert ours.shape == reference.shape == (batch, attn.n_heads, seq, dim)
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-5
