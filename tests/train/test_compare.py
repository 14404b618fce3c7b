"""`egmla compare`: several variants, one data/seed/budget, a table and a plot."""
import argparse
import json

from egmla.train import compare

TINY_MODEL = ["model.vocab_size=320", "model.n_layers=1", "model.d_model=64", "model.n_heads=2",
              "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=16", "model.v_head_dim=16", "model.max_seq_len=64"]
TINY_RUN = ["train.steps=3", "train.batch_size=4", "train.seq_len=32", "train.eval_sequences=8",
            "train.tensorboard=false",
            "data.max_bytes=300000", "data.val_fraction=0.1"]


def test_compare_trains_each_variant_on_the_same_budget(tmp_path, cache_dir, capsys):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    sets = [x for item in TINY_MODEL + TINY_RUN + [f"data.cache_dir={cache_dir}"] for x in ("--set", item)]
    args = parser.parse_args(["mha", "mla-kv16", "egmla-kv16", *sets, "--out", str(tmp_path), "--no-progress"])
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "KV elem/token" in out and "EG-MLA kv16" in out and "MHA" in out
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["mha", "mla-kv16", "egmla-kv16"]
    assert [r["kv_elements_per_token"] for r in rows] == [2 * 64 * 1, 32, 32]
    eg = rows[2]
    assert eg["params"] > eg["params_without_gate_tables"]
    assert rows[1]["params"] == rows[1]["params_without_gate_tables"]  # MLA has no gate tables
    assert all(r["final_val_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("mha", "mla-kv16", "egmla-kv16"):  # same data order and budget
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["train"]["steps"] == 3 and config["data"]["max_bytes"] == 300000
