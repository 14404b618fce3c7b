"""`egmla bench fp8-loss`: a trained run's held-out loss decoded through a cache in its dtype and in fp8, and the range
of the values the fp8 cache rounds. On the CPU in fp32 the cache in the model's dtype must give the full forward's
loss; the figures themselves are the benchmark's."""
import json
import math

import pytest
import torch

from egmla.bench.cli import run
from egmla.train.__main__ import main as train_main
from tests.train.helpers import write_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """A tiny EG-MLA run of 4 steps, with its data config (the validation split the benchmark scores by default)."""
    folder = tmp_path_factory.mktemp("fp8-loss")
    config = write_config(folder / "run.toml", cache_dir, train=dict(steps=4, eval_every=0, checkpoint_every=0))
    assert train_main(["--config", str(config), "--run-dir", str(folder / "run"), "--no-progress"]) == 0
    return folder / "run"


def measured(run_dir, tmp_path, *extra) -> dict:
    out = tmp_path / "fp8.json"
    assert run("fp8-loss", ["--run", str(run_dir), "--windows", "4", "--length", "32", "--prompt", "8",
                            "--device", "cpu", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_the_validation_split_through_both_caches(trained_run, tmp_path, capsys):
    result = measured(trained_run, tmp_path, "--path", "naive")
    assert (result["variant"], result["path"], result["device"], result["dtype"]) == ("EG-MLA kv16", "naive", "cpu",
                                                                                      "fp32")
    assert result["windows"] == 4 and result["scored_tokens"] == 4 * (32 - 8)
    # an fp32 cache decodes what the full forward computes; fp8 rounds, so it moves the loss, a little
    assert abs(result["loss_cache_native"] - result["loss_full_forward"]) < 1e-4
    assert abs(result["native_cache_minus_full_forward"]) < 1e-4
    assert result["loss_cache_fp8"] != result["loss_cache_native"]
    assert abs(result["fp8_minus_native"]) < 0.05 and math.isfinite(result["fp8_minus_native_stderr"])
    assert set(result["fp8_range"]) == {"latent", "k_rope"}
    for stats in result["fp8_range"].values():
        assert 0 < stats["max_abs"] < 448 and stats["share_saturated"] == 0
        assert 0.01 < stats["rounding_rel_error"] < 0.05  # e4m3's three mantissa bits: ~2.7% of the norm
    printed = capsys.readouterr().out
    assert "fp8 - fp32:" in printed and "latent: max |x|" in printed


def test_kl_and_top1_agreement_of_the_two_caches(trained_run, tmp_path):
    """KL(model's dtype || fp8) and the top-1 agreement, decoded in lockstep, equal what two separate decodes give
    (torch's kl_div over their logits); two caches of one dtype give 0 and 100%; and the command's file has them."""
    import torch.nn.functional as F

    from egmla.attention.cache import FP8
    from egmla.bench.fp8_loss import decode_through_both
    from egmla.runs import load_model

    model, _ = load_model(trained_run, dtype=torch.float32, device="cpu")
    torch.manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3, 20))

    def logits_through(cache_dtype):
        cache = model.new_cache(3, max_len=20, dtype=cache_dtype)
        steps = [model(tokens[:, :6], cache)[:, -1]] + [model(tokens[:, t:t + 1], cache)[:, 0] for t in range(6, 19)]
        return torch.log_softmax(torch.stack(steps, 1).float(), -1)  # [3, 14 positions, vocab]

    with torch.no_grad():
        both = decode_through_both(model, tokens, 6, FP8)
        native, fp8 = logits_through(None), logits_through(FP8)
        same = decode_through_both(model, tokens, 6, None)
    expected = F.kl_div(fp8, native, log_target=True, reduction="none").sum(-1).mean(1)
    assert torch.allclose(both["kl"], expected, rtol=1e-4, atol=1e-9) and (both["kl"] > 0).all()
    assert torch.equal(both["top1_agreement"], (native.argmax(-1) == fp8.argmax(-1)).float().mean(1))
    assert torch.equal(same["kl"], torch.zeros(3)) and torch.equal(same["top1_agreement"], torch.ones(3))
    assert torch.allclose(both["native"], -native.gather(-1, tokens[:, 6:, None])[..., 0].mean(1), rtol=1e-5)
    result = measured(trained_run, tmp_path, "--path", "naive")
    assert 0 < result["kl_native_fp8"] < 0.05 and math.isfinite(result["kl_native_fp8_stderr"])
    assert 0.5 < result["top1_agreement"] <= 1 and math.isfinite(result["top1_agreement_stderr"])


def test_one_tensor_in_fp8(trained_run, tmp_path, capsys):
    """--fp8-tensors latent: only the latents rounded; the RoPE keys stay in the model's dtype, so only the latents'
    range is reported, the file and the table say so, and the cost is its own (neither none nor the whole cache's)."""
    whole = measured(trained_run, tmp_path, "--path", "naive")
    result = measured(trained_run, tmp_path, "--path", "naive", "--fp8-tensors", "latent")
    assert result["fp8_tensors"] == ["latent"] and whole["fp8_tensors"] == "all"
    assert set(result["fp8_range"]) == {"latent"}
    assert result["fp8_range"]["latent"] == whole["fp8_range"]["latent"]
    assert result["loss_cache_native"] == pytest.approx(whole["loss_cache_native"], abs=1e-6)
    assert 0 < result["kl_native_fp8"] != whole["kl_native_fp8"]
    assert "(fp8: latent only)" in capsys.readouterr().out
    table = tmp_path / "table.md"
    assert run("fp8-loss", ["--report", str(tmp_path / "fp8.json"), "--markdown", str(table)]) == 0
    assert "| EG-MLA kv16, `naive`, fp8 latent only |" in table.read_text()


def test_fp8_keep_rope_is_the_latent_alone_in_fp8(trained_run, tmp_path, capsys):
    """--cache-dtype fp8-keep-rope scores the format generation keeps: for EG-MLA the latent in fp8 and the RoPE keys
    in the model's dtype, so the same numbers as --fp8-tensors latent; the two options together are refused."""
    latent = measured(trained_run, tmp_path, "--path", "naive", "--fp8-tensors", "latent")
    result = measured(trained_run, tmp_path, "--path", "naive", "--cache-dtype", "fp8-keep-rope")
    assert result["cache_dtype"] == "fp8-keep-rope" and set(result["fp8_range"]) == {"latent"}
    for key in ("loss_cache_fp8", "kl_native_fp8", "top1_agreement"):
        assert result[key] == pytest.approx(latent[key], rel=1e-6, abs=1e-9), key
    assert "(fp8-keep-rope: the RoPE keys in the model's dtype)" in capsys.readouterr().out
    table = tmp_path / "table.md"
    assert run("fp8-loss", ["--report", str(tmp_path / "fp8.json"), "--markdown", str(table)]) == 0
    assert "| EG-MLA kv16, `naive`, fp8-keep-rope |" in table.read_text()
    with pytest.raises(ValueError, match="--fp8-tensors latent with --cache-dtype fp8-keep-rope"):
        measured(trained_run, tmp_path, "--path", "naive", "--cache-dtype", "fp8-keep-rope", "--fp8-tensors", "latent")


def test_the_grouped_path_reads_the_same_fp8_cache_to_the_same_loss(trained_run, tmp_path):
    """The grouped path reads the cached norm statistics, computed from the latents as rounded: its losses over either
    cache equal naive's, and its fp32 statistics are not counted among the tensors fp8 rounds."""
    naive = measured(trained_run, tmp_path, "--path", "naive")
    grouped = measured(trained_run, tmp_path, "--path", "grouped")
    for key in ("loss_cache_native", "loss_cache_fp8"):
        assert grouped[key] == pytest.approx(naive[key], abs=1e-5)
    assert set(grouped["fp8_range"]) == {"latent", "k_rope"}


def test_held_out_text_from_a_file(trained_run, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("The quality of mercy is not strained; it droppeth as the gentle rain from heaven. " * 30)
    result = measured(trained_run, tmp_path, "--text", str(text))
    assert result["windows"] == 4 and math.isfinite(result["loss_cache_fp8"])


def test_the_range_counts_saturated_and_subnormal_values():
    from egmla.attention.cache import FP8
    from egmla.bench.fp8_loss import fp8_range
    from tests.infer.helpers import tiny_model

    model = tiny_model("mla")
    native, fp8 = model.new_cache(1, max_len=4), model.new_cache(1, max_len=4, dtype=FP8)
    for layer in native.layers:
        for buffer in layer.buffers.values():
            buffer[0, :2] = torch.tensor([1000.0, 1e-3] * (buffer[0, :2].numel() // 2)).view_as(buffer[0, :2])
    ranges = fp8_range(native, fp8)
    assert set(ranges) == {"latent", "k_rope"}
    for stats in ranges.values():
        assert stats["max_abs"] == 1000.0
        assert stats["share_saturated"] == pytest.approx(0.5) and stats["share_subnormal"] == pytest.approx(0.5)
        # 1000 is stored as 448: the error is dominated by it
        assert stats["rounding_rel_error"] == pytest.approx(552 / math.hypot(1000, 1e-3), rel=1e-3)


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "32"], r"^--prompt 32: must be below --length 32"),
    (["--windows", "0"], r"^--windows 0: must be >= 1$"),
    (["--length", "100"], r"^--length 100: longer than the model's max_seq_len 64"),
    (["--fp8-tensors", "latent,k"], r"^fp8_tensors=\['k', 'latent'\]: this cache keeps k_rope, latent in the model's"),
])
def test_bad_options_are_refused_with_the_fix(trained_run, extra, message):
    with pytest.raises(ValueError, match=message):
        run("fp8-loss", ["--run", str(trained_run), "--length", "32", "--device", "cpu", *extra])


def test_a_run_without_a_data_section_needs_text(trained_run, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(trained_run, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["data"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no data section .* pass held-out text with --text FILE"):
        run("fp8-loss", ["--run", str(bare), "--length", "32", "--device", "cpu"])
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least 2 are needed"):
        run("fp8-loss", ["--run", str(bare), "--length", "32", "--device", "cpu", "--text", str(short)])


def test_a_hugging_face_export_is_scored_on_text_it_is_given(trained_run, tmp_path):
    """An export keeps no data config: without --text it is refused with the fix; with it, it is scored as the run."""
    from egmla.hf.export import export_hf  # transformers: a dev dependency, so a missing one fails here

    exported = tmp_path / "exported"
    export_hf(trained_run, exported)
    with pytest.raises(ValueError, match="a Hugging Face export, .* pass held-out text with --text FILE"):
        run("fp8-loss", ["--run", str(exported), "--length", "32", "--device", "cpu"])
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    from_run, from_export = (measured(folder, tmp_path, "--text", str(text), "--path", "naive")
                             for folder in (trained_run, exported))
    assert from_export["loss_cache_fp8"] == pytest.approx(from_run["loss_cache_fp8"], abs=1e-6)


def test_the_report_tabulates_result_files(trained_run, tmp_path, capsys):
    """--report measures nothing: one row per file, the losses and ranges as the file has them, linked by its name; and
    without --run or --report the command says what it needs."""
    result = measured(trained_run, tmp_path, "--path", "naive")
    table = tmp_path / "table.md"
    assert run("fp8-loss", ["--report", str(tmp_path / "fp8.json"), "--markdown", str(table)]) == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| EG-MLA")]
    assert len(rows) == 1 and f"{result['loss_cache_fp8']:.6f}" in rows[0] and "latent " in rows[0]
    assert f"{result['fp8_minus_native']:+.5f} ± {result['fp8_minus_native_stderr']:.5f}" in rows[0]
    assert f"| {result['kl_native_fp8']:.3g} ± {result['kl_native_fp8_stderr']:.2g} | {result['top1_agreement']:.2%} |" \
        in rows[0]
    assert rows[0].endswith(f"[fp8.json]({tmp_path / 'fp8.json'}) |")
    with pytest.raises(ValueError, match="^--run: missing"):
        run("fp8-loss", [])
    with pytest.raises(ValueError, match="--report .*: no such file"):
        run("fp8-loss", ["--report", str(tmp_path / "absent.json")])
