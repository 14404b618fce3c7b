"""Decode path 'grouped' (docs/design.md §4b): the PyTorch reference equals the naive rebuild (fp64 to 1e-10,
model logits in fp32 to 1e-4) for random and heavily repeated ids, ragged batches and every context
length from 1 to 40; the token-group bookkeeping, cache bytes, kv-report row and bad inputs."""
import pytest
import torch

from egmla.accounting import kv_rows, variant_configs
from egmla.attention import decode_paths
from egmla.attention.cache import TokenGroups
from egmla.attention.egmla_equations import grouped_attention
from egmla.config import preset
from egmla.model import Transformer
from tests.attention.fp64_case import attend, grouped_arguments, norm_with_stats, random_case
from tests.conftest import small_config


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- the equations, in fp64, against a direct rebuild -----------------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("n_ids", [3, 50])  # heavy repetition / mostly distinct
def test_equations_match_rebuild_in_fp64(norm, n_ids):
    case = random_case(n_ids, norm)
    x = (case["latent"] @ case["wkv_b"].T) * case["table"][case["ids"]]  # f_t = Norm(kv_t ⊙ g_t)
    f, stats = norm_with_stats(x, norm, case["gamma"], case["beta"])
    out = grouped_attention(*grouped_arguments(case, stats))
    assert (out - attend(case, f)).abs().max().item() < 1e-10


# ---- the model: grouped == naive ------------------------------------------------------------------
def decode_logits(model, path, tokens, prompt_lens, steps, finished_at=None):
    """Prefill right-padded prompts, then `steps` one-token steps; logits per step [batch, 1, vocab] and
    which rows were real tokens. A sequence listed in finished_at stops (n_new = 0) from that step."""
    model.set_decode_path(path)
    batch = tokens.shape[0]
    cache = model.new_cache(batch, max_len=48)
    width = int(prompt_lens.max())
    logits = [model(tokens[:, :width].clone(), cache, n_new=prompt_lens)]
    real = [torch.arange(width)[None, :] < prompt_lens[:, None]]
    for step in range(steps):
        n_new = torch.ones(batch, dtype=torch.long)
        for b, stop in (finished_at or {}).items():
            n_new[b] = int(step < stop)
        nxt = tokens[torch.arange(batch), cache.lengths.clamp(max=tokens.shape[1] - 1)][:, None]
        logits.append(model(nxt, cache, n_new=n_new))
        real.append(n_new[:, None].bool())
    return logits, real, cache


@pytest.mark.parametrize("ids", ["random", "repeated"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_grouped_equals_naive_every_length(ids, norm):
    config = small_config(gate_norm=norm)
    model = Transformer(config).eval()
    high = config.vocab_size if ids == "random" else 3
    tokens = torch.randint(0, high, (3, 48))
    prompt_lens = torch.tensor([1, 3, 1])  # contexts of every length 1..40 are decoded
    with torch.no_grad():
        naive, real, _ = decode_logits(model, "naive", tokens, prompt_lens, 39, finished_at={2: 20})
        grouped, _, cache = decode_logits(model, "grouped", tokens, prompt_lens, 39, finished_at={2: 20})
    for a, b, rows in zip(naive, grouped, real):
        assert torch.isfinite(b).all()
        assert rel_err(b[rows], a[rows]) < 1e-4
    assert cache.token_groups.lengths.tolist() == cache.lengths.tolist()


def test_greedy_tokens_identical():
    config = small_config()
    model = Transformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 5))

    def greedy(path):
        model.set_decode_path(path)
        cache = model.new_cache(2, max_len=40)
        out, nxt = [], model(prompt, cache)[:, -1:].argmax(-1)
        for _ in range(25):
            out.append(nxt)
            nxt = model(nxt, cache)[:, -1:].argmax(-1)
        return torch.cat(out, 1)

    with torch.no_grad():
        assert torch.equal(greedy("grouped"), greedy("naive"))


def test_paths_offered_only_where_exact():
    assert "grouped" in decode_paths(small_config())
    assert "grouped" in decode_paths(small_config(gate_norm="rmsnorm"))
    for kw in (dict(gate_op="add"), dict(gate_norm="none"), dict(gate_placement="latent")):
        assert "grouped" not in decode_paths(small_config(**kw))
    assert "grouped" not in decode_paths(small_config(attention="mla"))


# ---- bookkeeping --------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,vocab", [(3, 6), (9, 40), (5, 1)])  # few ids, mostly distinct, one id
def test_token_groups_incremental_matches_scratch(batch, vocab):
    max_len = 30
    groups = TokenGroups(batch, max_len)
    history = [[] for _ in range(batch)]
    lengths = torch.zeros(batch, dtype=torch.long)
    for chunk in (4, 1, 1, 7, 1, 1, 1, 3, 1):  # prefill chunks and decode steps, ragged
        tokens = torch.randint(0, vocab, (batch, chunk))
        n_new = torch.randint(0, chunk + 1, (batch,))
        positions = lengths[:, None] + torch.arange(chunk)
        groups.append(tokens, positions, n_new)
        for b in range(batch):
            history[b] += tokens[b, : n_new[b]].tolist()
        lengths += n_new
    for b in range(batch):
        uniq = list(dict.fromkeys(history[b]))
        assert groups.n_distinct[b] == len(uniq) and groups.lengths[b] == len(history[b])
        assert groups.distinct_ids[b, : len(uniq)].tolist() == uniq  # order of first appearance
        assert [uniq[s] for s in groups.slots[b, : len(history[b])].tolist()] == history[b]
        assert groups.counts[b, : len(uniq)].tolist() == [history[b].count(i) for i in uniq]
        assert groups.ranks[b, : len(history[b])].tolist() == [history[b][:t].count(i) for t, i in enumerate(history[b])]
    version = groups.version
    groups.reset()
    assert groups.lengths.sum() == 0 and groups.n_distinct.sum() == 0 and groups.version > version


def test_cache_bytes_count_stats_and_groups():
    config = small_config()
    model = Transformer(config)
    naive = model.new_cache(2, max_len=40).nbytes()
    model.set_decode_path("grouped")
    cache = model.new_cache(2, max_len=40)
    per_position = config.n_layers * 8 + 16  # (mu, rho) fp32 per layer + slot, rank, distinct id, count (int32)
    assert cache.nbytes() - naive == 2 * 40 * per_position
    assert cache.layers[0].buffers["ln_stats"].dtype == torch.float32


def test_kv_report_has_grouped_row():
    rows = {r["variant"]: r for r in kv_rows(variant_configs(preset("paper-base")))}
    row = rows["EG-MLA kv64 (grouped: +2 fp32 stats/layer)"]
    assert row["bytes_per_token_bf16"] == 1536 * 2 + 12 * 8
    assert row["measured_bytes_per_token"] == 1536 * 2 + 12 * 8 + 4 + 16  # + token id, slot, rank, id, count
    assert "EG-MLA kv64 latent-gate (grouped: +2 fp32 stats/layer)" not in rows


# ---- bad input -----------------------------------------------------------------------------------------
def test_cache_without_stats_is_a_clear_error():
    model = Transformer(small_config()).eval()
    tokens = torch.randint(0, 10, (2, 6))
    with torch.no_grad():
        cache = model.new_cache(2, max_len=20)  # allocated for 'naive': no statistics at all
        model(tokens, cache)
        model.set_decode_path("grouped")
        with pytest.raises(ValueError, match="set_decode_path\\('grouped'\\) before model.new_cache"):
            model(tokens[:, :1], cache)
        cache = model.new_cache(2, max_len=20)
        model(tokens, cache)
        model.set_decode_path("naive")  # appended without registering the position in the token groups
        model(tokens[:, :1], cache)
        model.set_decode_path("grouped")
        with pytest.raises(ValueError, match="while the decode path was not 'grouped'"):
            model(tokens[:, :1], cache)
        cache.reset()  # refilled on the grouped path: usable again
        model(tokens, cache)
        assert model(tokens[:, :1], cache).isfinite().all()


def test_id_beyond_vocab_is_a_clear_error():
    config = small_config()
    model = Transformer(config).eval()
    model.set_decode_path("grouped")
    cache = model.new_cache(1, max_len=20)
    with torch.no_grad():
        with pytest.raises(ValueError, match="vocab_size"):
            model(torch.tensor([[1, config.vocab_size + 3]]), cache)
        model(torch.tensor([[1, 2]]), cache)
        cache.token_groups.distinct_ids[0, 1] = config.vocab_size  # a cache holding ids of another vocab
        with pytest.raises(ValueError, match="vocab_size"):
            model(torch.tensor([[3]]), cache)


def test_dropping_finished_sequences_keeps_groups_in_step():
    """The generation engine compacts the cache when sequences finish; the token groups follow."""
    config = small_config()
    model = Transformer(config).eval()
    tokens = torch.randint(0, 8, (3, 20))
    logits = {}
    with torch.no_grad():
        for path in ("naive", "grouped"):
            model.set_decode_path(path)
            cache = model.new_cache(3, max_len=24)
            model(tokens[:, :6], cache)
            cache.compact(torch.tensor([0, 2]))
            logits[path] = [model(tokens[[0, 2], 6 + i:7 + i], cache) for i in range(4)]
    for a, b in zip(logits["naive"], logits["grouped"]):
        assert rel_err(b, a) < 1e-4
