"""lm-evaluation-harness: the registered `egmla` model on the two local tasks, end to end; its scores
checked against direct computation with our model and against lm-eval's own `hf` backend.

lm-eval is a dev dependency: if it is missing these tests fail (they must not skip)."""
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import egmla.hf.lm_eval_model  # noqa: F401  (registers model "egmla")
import lm_eval
from egmla.hf.export import export_hf
from egmla.hf.lm_eval_model import EgmlaLM
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

TASKS = ["egmla_mc", "egmla_ppl"]
METRICS = {"egmla_mc": ("acc,none", "acc_norm,none"),
           "egmla_ppl": ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")}


def evaluate(tasks_dir, model: str, model_args: str) -> dict:
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                                      task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                      log_samples=False)
    return {task: {metric: results["results"][task][metric] for metric in METRICS[task]} for task in TASKS}


@pytest.fixture(scope="module")
def scores(make_run, tasks_dir):
    args = f"run={make_run('eg-mla')},batch_size=32"
    return evaluate(tasks_dir, "egmla", args), evaluate(tasks_dir, "egmla", args)


@pytest.fixture(scope="module")
def lm(make_run):
    return EgmlaLM(run=str(make_run("eg-mla")), batch_size=3)


def test_local_tasks_run_end_to_end_deterministically(scores):
    first, second = scores
    assert first == second  # bit for bit, twice
    mc, ppl = first["egmla_mc"], first["egmla_ppl"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert ppl["byte_perplexity,none"] > 1 and ppl["byte_perplexity,none"] < 300 and math.isfinite(ppl["word_perplexity,none"])
    # lm-eval derives both from the same summed log-likelihoods: they must agree
    assert ppl["byte_perplexity,none"] == pytest.approx(2 ** ppl["bits_per_byte,none"], rel=1e-9)


def test_exported_model_scores_the_same_through_lm_evals_hf_backend(scores, make_run, tasks_dir, tmp_path):
    export_hf(make_run("eg-mla"), tmp_path / "hf")  # lm-eval's HFLM loads it via AutoModelForCausalLM
    theirs = evaluate(tasks_dir, "hf", f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu,"
                                       f"backend=causal,batch_size=32")
    for task, metrics in scores[0].items():
        for metric, value in metrics.items():
            assert theirs[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_stock_lm_eval_command_scores_an_export_through_trust_remote_code(scores, make_run, tasks_dir, tmp_path):
    """Plain `lm_eval`, nothing of egmla registered: the exported folder's auto_map finds the model, and the scores
    equal the registered `egmla` model's."""
    export_hf(make_run("eg-mla"), tmp_path / "hf")
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
               f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32,backend=causal", "--device", "cpu",
               "--batch_size", "32", "--include_path", str(tasks_dir), "--tasks", ",".join(TASKS),
               "--output_path", str(tmp_path / "results")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = (tmp_path / "results").rglob("results_*.json")
    theirs = json.loads(path.read_text())["results"]
    for task, metrics in scores[0].items():
        for metric, value in metrics.items():
            assert theirs[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def direct_logprob(lm: EgmlaLM, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = F.log_softmax(lm.model(tokens[:, :-1]).float(), dim=-1)[0, len(context_ids) - 1:]
    target = torch.tensor(continuation_ids)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_direct_computation(lm):
    pairs = [("Question: What do bees collect from flowers?\nAnswer:", " nectar"),
             ("The library closed at six,", " but the reading room lights stayed on"),
             ("Answer: ", "chalk"),  # trailing space moves to the continuation
             ("", "Rain had fallen all night.")]  # empty context: conditioned on <|endoftext|>
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    enc = lm.tok_encode
    expected = [direct_logprob(lm, enc(pairs[0][0]), enc(pairs[0][0] + pairs[0][1])[len(enc(pairs[0][0])):]),
                direct_logprob(lm, enc(pairs[1][0]), enc(pairs[1][0] + pairs[1][1])[len(enc(pairs[1][0])):]),
                direct_logprob(lm, enc("Answer:"), enc("Answer: chalk")[len(enc("Answer:")):]),
                direct_logprob(lm, [lm.eot_token_id], enc(pairs[3][1]))]
    for (score, greedy), (want, want_greedy) in zip(results, expected):
        assert score == pytest.approx(want, rel=1e-5) and greedy == want_greedy and score < 0


def test_direct_calls_without_context_or_continuation_are_clear_errors(lm):
    with pytest.raises(ValueError, match="empty context"):
        lm._loglikelihood_tokens([(None, [], [5, 6])])
    with pytest.raises(ValueError, match="empty continuation"):
        lm._loglikelihood_tokens([(None, [5], [])])


def test_loglikelihood_does_not_depend_on_batching(lm, make_run):
    requests = [Instance("loglikelihood", {}, ("Question: " + "why " * n + "?\nAnswer:", " yes" * (1 + n % 3)), n)
                for n in range(7)]
    one_by_one = EgmlaLM(run=str(make_run("eg-mla")), batch_size=1).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(lm.loglikelihood(requests), one_by_one):
        assert a == pytest.approx(b, rel=1e-5) and greedy_a == greedy_b


def test_loglikelihood_rolling_equals_direct_computation(lm):
    text = "Trains left the station every quarter of an hour."
    ids = lm.tok_encode(text)
    assert len(ids) < lm.max_length  # one window: the whole text after <|endoftext|>
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(direct_logprob(lm, [lm.eot_token_id], ids)[0], rel=1e-5)
    long_text = " ".join([text] * 12)  # several windows of max_length tokens
    (long_score,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_text,), 0)])
    assert len(lm.tok_encode(long_text)) > 2 * lm.max_length and math.isfinite(long_score)
    assert long_score < rolling * 5


def test_generate_until_is_greedy_and_stops(lm):
    context, until = "The harbour town", ["\n", "."]
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": 12}), 0)])
    # plain greedy loop with full forwards, no cache, as the reference
    ids = lm.tok_encode(context)
    generated = []
    with torch.no_grad():
        for _ in range(12):
            next_id = int(lm.model(torch.tensor([ids + generated]))[0, -1].argmax())
            if next_id == lm.eot_token_id:
                break
            generated.append(next_id)
    expected = lm.tok_decode(generated)
    for stop in until:
        expected = expected.split(stop)[0]
    assert text == expected
    assert not any(stop in text for stop in until)


def test_generate_until_over_an_fp8_cache_is_the_engines(make_run):
    """model_args cache_dtype=fp8 (an MLA run): generate_until's engine keeps an fp8 cache and answers as egmla's engine
    over one; scoring is unchanged (whole forwards, no cache)."""
    from egmla.infer import GenerationEngine

    run = str(make_run("mla"))
    fp8, plain = EgmlaLM(run=run, batch_size=3, cache_dtype="fp8"), EgmlaLM(run=run, batch_size=3)
    context = "The harbour town"
    request = Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 10}), 0)
    (text,) = fp8.generate_until([request])
    expected = GenerationEngine(fp8.model, fp8.tokenizer, cache_dtype="fp8").generate(
        [fp8.tok_encode(context)], max_new_tokens=10)[0].token_ids
    assert text == fp8.tok_decode(expected[: expected.index(fp8.eot_token_id)] if fp8.eot_token_id in expected
                                  else expected).split("\n")[0]
    scored = Instance("loglikelihood", {}, (context, " by the sea"), 0)
    assert fp8.loglikelihood([scored]) == plain.loglikelihood([scored])


def test_generate_until_refuses_max_gen_toks_that_leave_no_context(lm):
    """max_gen_toks >= max_length cut every context to its last token (the answer made without the question) and
    generated past max_length; lm-eval's HF model refuses it too. One below keeps the context's last token."""
    context = "Question: What do bees collect from flowers?\nAnswer:"
    for max_gen_toks in (lm.max_length, lm.max_length + 36):
        request = Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": max_gen_toks}), 0)
        with pytest.raises(ValueError, match=rf"max_gen_toks={max_gen_toks} leaves no room for the context within "
                                             rf"max_length={lm.max_length}.*lower max_gen_toks"):
            lm.generate_until([request])
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": lm.max_length - 1}), 0)])
    assert isinstance(text, str)


def test_generate_until_answers_one_token_for_an_empty_stop_string_as_lm_evals_hf_backend(lm, make_run, tmp_path):
    """lm-eval's HF model stops on "" after the first token (its stop check `"" in text` always holds) and skips ""
    when it cuts the text; this was refused. Compared with that backend on the exported model."""
    from lm_eval.models.huggingface import HFLM

    export_hf(make_run("eg-mla"), tmp_path / "hf")
    theirs = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", backend="causal", batch_size=1)
    contexts = ["The harbour town", "Question: What do bees collect from flowers?\nAnswer:", "Rain had"]
    for until in ([""], ["", "."], ""):
        requests = [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 12}), i)
                    for i, c in enumerate(contexts)]
        assert lm.generate_until(requests) == theirs.generate_until(requests), until
    # the full answers are longer: the empty stop string made the difference above
    one_token = lm.generate_until([Instance("generate_until", {}, (c, {"until": [""], "max_gen_toks": 12}), 0)
                                   for c in contexts])
    full = lm.generate_until([Instance("generate_until", {}, (c, {"max_gen_toks": 12}), 0) for c in contexts])
    assert all(len(a) < len(b) for a, b in zip(one_token, full))


def engine_text(lm, context: str, temperature: float, max_new: int = 12) -> str:
    """What egmla's engine generates for one context at this temperature (seed 0, the adapter's default)."""
    from egmla.infer import GenerationEngine, SamplingParams

    (output,) = GenerationEngine(lm.model, lm.tokenizer).generate(
        [lm.tok_encode(context)], max_new_tokens=max_new, sampling=SamplingParams(temperature=temperature, seed=0),
        eos_token_id=lm.eot_token_id)
    return lm.tok_decode([t for t in output.token_ids if t != lm.eot_token_id])


def test_generate_until_samples_or_decodes_greedily_by_lm_evals_rules(lm):
    """lm-eval's normalize_gen_kwargs: do_sample=False is greedy, do_sample unset samples when temperature > 0,
    do_sample=True samples at the given temperature or, with none (was greedy), at 1.0 (transformers' default)."""
    context = "The harbour town"
    greedy, at_1, at_07 = (engine_text(lm, context, t) for t in (0.0, 1.0, 0.7))
    assert greedy != at_1 and greedy != at_07  # so that each case below tells sampling from greedy decoding
    cases = [({"do_sample": True}, at_1), ({"temperature": 0.7}, at_07),
             ({"do_sample": True, "temperature": 0.7}, at_07), ({"do_sample": True, "temperature": 0.0}, greedy),
             ({"do_sample": False, "temperature": 0.7}, greedy), ({"temperature": 0.0}, greedy), ({}, greedy)]
    for kwargs, expected in cases:
        (text,) = lm.generate_until([Instance("generate_until", {}, (context, {**kwargs, "max_gen_toks": 12}), 0)])
        assert text == expected, kwargs


def test_lm_eval_command_line_with_egmla_registered(make_run, tmp_path):
    command = [sys.executable, "-m", "egmla.hf.lm_eval_model", "--model", "egmla",
               "--model_args", f"run={make_run('mla')}", "--tasks", "egmla_mc",
               "--limit", "4", "--output_path", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "egmla_mc" in done.stdout and "acc" in done.stdout
    assert list(tmp_path.rglob("results_*.json"))


def test_egmla_eval_command_runs_lm_eval_on_a_run_and_passes_extra_options(make_run, tmp_path):
    """A run at a path lm-eval's key=value model_args would garble (space, quote, ',', '=', braces), tasks given after
    --: lm_eval gets the path as it is and those tasks only, and the printed command runs the same by itself."""
    import shlex
    import shutil

    from lm_eval.utils import sanitize_model_name

    run = shutil.copytree(make_run("eg-mla"), tmp_path / "it's, a=run {1}")
    command = [sys.executable, "-m", "egmla", "eval", "--run", str(run), "--limit", "4", "--device", "cpu",
               "--output-path", str(tmp_path / "out"), "--", "--tasks", "egmla_mc", "--seed", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [path] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(path.read_text())
    assert list(results["results"]) == ["egmla_mc"]  # not egmla eval's default tasks as well
    assert 0 <= results["results"]["egmla_mc"]["acc,none"] <= 1
    assert results["config"]["model_args"] == {"pretrained": str(run), "dtype": "float32"}
    assert path.parent.name == sanitize_model_name(str(run))  # lm-eval's folder named after the run, not at random
    assert results["config"]["random_seed"] == 3  # the option after -- reached lm_eval
    printed = shlex.split(done.stdout.splitlines()[0])  # the command it ran, quoted for a shell
    assert printed[1:5] == ["-m", "egmla.hf.lm_eval_model", "--model", "egmla"] and str(run) in printed[6]


def eval_args(*argv):
    from egmla.cli import build_parser

    return build_parser().parse_args(["eval", *argv])


def lm_evals_model_args(argv: list[str]) -> dict:
    """model_args as lm_eval's own command line reads them from `argv`."""
    try:
        from lm_eval._cli.harness import HarnessCLI  # lm-eval >= 0.4.10

        return HarnessCLI()._parser.parse_args(["run", *argv]).model_args
    except ImportError:
        from lm_eval.__main__ import setup_parser

        return setup_parser().parse_args(argv).model_args


def test_egmla_eval_builds_lm_evals_command_line(tmp_path, monkeypatch):
    from egmla.commands.eval import lm_eval_argv

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = eval_args("--run", "runs/a", "--dtype", "bfloat16", "--batch-size", "32", "--checkpoint",
                     "runs/a/checkpoints/step_10", "--num-fewshot", "0", "--limit", "8", "--", "--log_samples")
    model_args = {"pretrained": "runs/a", "dtype": "bfloat16", "checkpoint": "runs/a/checkpoints/step_10"}
    assert lm_eval_argv(args) == [
        "--model", "egmla", "--model_args", json.dumps(model_args), "--tasks", "egmla_mc,egmla_ppl",
        "--batch_size", "32", "--device", "cpu", "--num_fewshot", "0", "--limit", "8", "--log_samples"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the run's device, not lm_eval's cuda:0
    assert lm_eval_argv(eval_args("--run", "runs/a", "--limit", "0.25"))[-4:] == ["--device", "cuda", "--limit",
                                                                                  "0.25"]
    # --cache-dtype: generation tasks' cache, as model_args' cache_dtype (absent for auto)
    argv = lm_eval_argv(eval_args("--run", "runs/a", "--cache-dtype", "fp8-keep-rope"))
    assert json.loads(argv[argv.index("--model_args") + 1])["cache_dtype"] == "fp8-keep-rope"


def test_egmla_eval_checks_the_device_before_lm_eval_starts(tmp_path):
    """--device tpu went to lm_eval, whose model loader then called every checkpoint unusable in torch's words."""
    from egmla.commands.eval import lm_eval_argv

    with pytest.raises(ValueError, match=r"--device 'tpu': not a device; use cpu, cuda, cuda:1, \.\.\. or auto"):
        lm_eval_argv(eval_args("--run", str(tmp_path), "--device", "tpu"))
    assert lm_eval_argv(eval_args("--run", str(tmp_path), "--device", "cpu"))[-2:] == ["--device", "cpu"]


@pytest.mark.parametrize("name", ["1e3", "2024", "true", "it's a run", "runs,b=c", "run{1}", "run(1"])
def test_lm_eval_reads_any_run_name_as_given(name, tmp_path, monkeypatch):
    """lm-eval's key=value model_args turned these into a float, an int, a bool, swallowed the dtype, or failed."""
    from egmla.commands.eval import lm_eval_argv

    monkeypatch.chdir(tmp_path)
    Path(name).mkdir()
    argv = lm_eval_argv(eval_args("--run", name, "--checkpoint", name, "--dtype", "float16"))
    assert lm_evals_model_args(argv) == {"pretrained": name, "dtype": "float16", "checkpoint": name}


def test_tasks_after_the_separator_replace_the_default_and_are_given_once(tmp_path):
    from egmla.commands.eval import lm_eval_argv

    for extra in (["--tasks", "piqa"], ["-t", "piqa"], ["--tasks=piqa"]):
        argv = lm_eval_argv(eval_args("--run", str(tmp_path), "--", *extra))
        assert "egmla_mc,egmla_ppl" not in argv and argv[-len(extra):] == extra
    with pytest.raises(ValueError, match=r"--tasks='arc_easy' and --tasks after --: .*give the tasks once"):
        lm_eval_argv(eval_args("--run", str(tmp_path), "--tasks", "arc_easy", "--", "--tasks", "piqa"))


@pytest.mark.parametrize("option,value,message", [
    ("--limit", "0", "give a fraction of each task in (0, 1)"), ("--limit", "-1", "give a fraction of each task"),
    ("--limit", "1.5", "give a fraction of each task"), ("--batch-size", "0", "must be at least 1"),
    ("--num-fewshot", "-1", "must be 0 or more")])
def test_egmla_eval_refuses_numbers_lm_eval_would_misread(option, value, message, tmp_path, capsys):
    """lm-eval cut --limit 1.5 to one document and ran --num-fewshot -1; --limit 0 and --batch-size 0 failed with
    messages that named neither option."""
    from egmla.cli import main as egmla_main

    with pytest.raises(SystemExit) as exit_info:
        egmla_main(["eval", "--run", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: {value}: {message}" in capsys.readouterr().err


def test_egmla_eval_names_a_missing_run_before_starting_lm_eval(tmp_path, capsys):
    from egmla.cli import main as egmla_main

    assert egmla_main(["eval", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"--run='{tmp_path / 'nowhere'}': no such directory; pass a run directory" in err
    assert "Initializing" not in err  # refused before lm_eval loads anything


def test_local_task_configs_leave_lm_eval_nothing_to_guess(tasks_dir, caplog):
    """Every metric names its aggregation and direction, so lm-eval prints no "is defined, but" warnings."""
    with caplog.at_level(logging.WARNING):
        tasks = TaskManager(include_path=str(tasks_dir), include_defaults=False).load(TASKS)
    assert tasks and not [r.getMessage() for r in caplog.records if "is defined, but" in r.getMessage()]


def test_pretrained_is_runs_other_name(make_run):
    """lm-eval names its --output_path folder after a `pretrained` model arg: the egmla model takes it as `run`."""
    from egmla.hf.lm_eval_model import EgmlaLM

    run = make_run("mla")
    assert EgmlaLM(pretrained=str(run), device="cpu").model.config == EgmlaLM(run=str(run), device="cpu").model.config
    with pytest.raises(ValueError, match="name two models: give one"):
        EgmlaLM(run=str(run), pretrained=str(make_run("mha")), device="cpu")
