"""`egmla bench train` runs end to end on the CPU at tiny shapes (its numbers matter only on a GPU)."""
import argparse
import json

from egmla.bench import train as bench_train


def test_bench_train_cpu_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--device", "cpu", "--preset", "tiny", "--set", "vocab_size=512", "--set", "n_layers=1",
                              "--batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1", "--no-compile",
                              "--out", str(out)])
    assert bench_train.main(args) == 0
    printed = capsys.readouterr().out
    assert "egmla bench train: cpu" in printed and "vs MLA kv64" in printed
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["mha", "mla-kv64", "egmla-kv64"]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["mfu"] is None  # no MFU on a CPU
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
