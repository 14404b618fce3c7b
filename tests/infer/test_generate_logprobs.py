"""GenerationEngine.generate(logprobs=k): each generated token's log-probability and the step's k most likely tokens
are those of one full forward of prompt + tokens (the model's own distribution, as the Scheduler serves), on every
decode path, through graph replays, offloaded gate tables and ragged batches; None costs nothing; `egmla generate
--logprobs N`."""
import json

import pytest
import torch
from tests.infer.helpers import (VARIANTS, GraphReplay, assert_served_log_probs_match, forward_into_one_buffer,
                                 full_forward_log_probs, prefill_steps_as_graphs, tiny_model)

from egmla.attention import decode_paths
from egmla.cli import main as egmla_main
from egmla.infer import GenerationEngine, SamplingParams
from egmla.infer.decode_step import DecodeStep
from egmla.infer.offload import GateTableOffload
from egmla.infer.prefill_step import PrefillStep

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [120, 8], [33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45], [260]]
TOP = 3


def assert_full_forwards(model, prompts: list[list[int]], results, top: int, where) -> None:
    """Each result's logprobs and top_logprobs (k = `top` per step, most likely first) against one full forward of
    its prompt + tokens, to fp32 (`assert_served_log_probs_match`, the Scheduler's check)."""
    for prompt, result in zip(prompts, results):
        assert len(result.logprobs) == len(result.top_logprobs) == len(result.token_ids), (where, result.index)
        assert all(len(step) == top for step in result.top_logprobs), (where, result.index)
        assert all(list(step.values()) == sorted(step.values(), reverse=True) for step in result.top_logprobs)
        assert_served_log_probs_match(model, prompt, result, (where, result.index))


def ragged_eos(engine) -> int:
    """A token that ends sequence 0 by step 4, so that the batch's sequences end at different steps."""
    return engine.generate(PROMPTS, max_new_tokens=4)[0].token_ids[3]


# every variant's every path; those of Triton kernels (slow in the CPU interpreter) on one variant each
TRITON_ONCE = [("mla", "kernel"), ("eg-mla", "kernel"), ("eg-mla", "grouped"), ("eg-mla-bias", "absorbed")]


def runs_triton(config, path: str) -> bool:
    return path in ("kernel", "grouped") or (path == "absorbed" and config.adds_table)


PATHS = [(variant, path) for variant in VARIANTS for path in decode_paths(tiny_model(variant).config)
         if (variant, path) in TRITON_ONCE or not runs_triton(tiny_model(variant).config, path)]


@pytest.mark.parametrize("variant,path", PATHS)
def test_logprobs_equal_the_full_forward_on_every_path_for_ragged_batches(variant, path):
    """Ragged prompts ending at different steps (eos; padded bucket 4 -> 8, then the live rows compacted into
    smaller buckets): each token's log-probability and the step's top-k are the full forward's, to fp32."""
    model = tiny_model(variant, seed=1)
    engine = GenerationEngine(model, decode_path=path, batch_buckets=(1, 2, 3, 8))
    eos = ragged_eos(engine)
    results = engine.generate(PROMPTS, max_new_tokens=8, eos_token_id=eos, logprobs=TOP)
    assert len({len(r.token_ids) for r in results}) > 1 and results[0].finish_reason == "eos"
    assert_full_forwards(model, PROMPTS, results, TOP, path)


@pytest.fixture
def graphs_emulated(monkeypatch):
    """Decode and prefill steps behave as CUDA graphs on a GPU: captured once, then each replay rewrites the one
    output buffer kept since the capture, so logits read after the next replay would be the next step's."""

    def capture_prefill(step):  # into the scratch cache: running it twice changes nothing
        step.forward()  # warm-up
        step.logits = step.forward()
        step.graph = GraphReplay(step)

    def capture_decode(step):  # a capture runs nothing: the warm-up's n_new = 0 appends nothing
        n_new = step.n_new.clone()
        step.n_new.zero_()
        step.logits = step.forward()
        step.n_new.copy_(n_new)
        step.graph = GraphReplay(step)

    forward_into_one_buffer(monkeypatch, DecodeStep)
    monkeypatch.setattr(DecodeStep, "capture", capture_decode)
    forward_into_one_buffer(monkeypatch)
    monkeypatch.setattr(PrefillStep, "capture", capture_prefill)
    prefill_steps_as_graphs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)  # the prefill graphs' pool: none on a CPU


@pytest.mark.parametrize("variant,path,overlap", [("mla", "absorbed", True), ("eg-mla", "grouped", True),
                                                  ("gqa", "naive", True), ("mla", "absorbed", False)])
def test_logprobs_are_read_before_the_next_graph_replay(graphs_emulated, variant, path, overlap):
    """With graph replays (emulated) and steps queued ahead of the host (overlap_host), the log-probabilities are the
    full forward's: they are taken from the logits before the step run ahead rewrites them."""
    model = tiny_model(variant, seed=2)
    engine = GenerationEngine(model, decode_path=path, batch_buckets=(1, 2, 3, 8), overlap_host=overlap,
                              prefill_graphs=True)
    engine.cuda_graphs = True  # as on CUDA: every decode step captured, then replayed
    eos = ragged_eos(engine)
    results = engine.generate(PROMPTS, max_new_tokens=8, eos_token_id=eos, logprobs=TOP)
    assert engine.last_stats.cuda_graphs and engine.last_step.graph is not None
    assert len({len(r.token_ids) for r in results}) > 1
    assert_full_forwards(model, PROMPTS, results, TOP, (path, overlap))


@pytest.mark.parametrize("path", ["gate-table", "grouped"])
def test_logprobs_with_offloaded_gate_tables_whose_rows_grow_mid_call(graphs_emulated, monkeypatch, path):
    """Gate tables in host memory, their rows claimed on the device with little room kept, so that the rows grow
    between steps and the graphs are captured again mid-call: the full forward's log-probabilities still."""
    from egmla.infer import engine as engine_module

    monkeypatch.setattr(engine_module, "OFFLOAD_ROOM_DIVISOR", 10 ** 6)  # room for 4 new ids per row
    model = tiny_model("eg-mla", seed=3)
    engine = GenerationEngine(model, decode_path=path, offload_gate_tables=True, batch_buckets=(1, 2, 4))
    engine.offload.restore()  # claimed on the device, as on CUDA (the Triton kernels, interpreted here)
    engine.offload = GateTableOffload(model, initial_rows=4, on_device=True)
    engine.cuda_graphs = True
    prompts = [[1, 2], [200, 201, 202], [7]]
    results = engine.generate(prompts, max_new_tokens=10, sampling=SamplingParams(temperature=2.0, seed=1),
                              logprobs=TOP)
    assert engine.offload.capacity > 4 + len(set().union(*prompts) | {0})  # the rows grew mid-call
    reference = tiny_model("eg-mla", seed=3)  # the same weights, its tables on the device: no offload under test
    assert_full_forwards(reference, prompts, results, TOP, path)


def test_sampled_tokens_get_the_models_own_log_probabilities_and_the_same_draws():
    """With temperature, top-k and top-p the values are the model's own distribution (the Scheduler's, vLLM's
    default), not the tempered one the token was drawn from; asking for them changes no draw."""
    model = tiny_model("eg-mla", seed=4)
    engine = GenerationEngine(model)
    sampling = SamplingParams(temperature=1.7, top_k=40, top_p=0.9, seed=5)
    plain = engine.generate(PROMPTS, max_new_tokens=6, sampling=sampling)
    results = engine.generate(PROMPTS, max_new_tokens=6, sampling=sampling, logprobs=2)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert_full_forwards(model, PROMPTS, results, 2, "sampled")
    tempered = full_forward_log_probs(model, PROMPTS[0], results[0].token_ids) * 1.7  # not what is served
    assert not torch.allclose(torch.tensor(results[0].logprobs),
                              tempered.log_softmax(-1).gather(-1, torch.tensor(results[0].token_ids)[:, None])[:, 0])


def test_events_carry_them_and_zero_lists_only_the_token():
    """logprobs=0: each token's log-probability, no alternatives ({}); the streamed events carry the same values."""
    model = tiny_model("mla", seed=6)
    events = []
    results = GenerationEngine(model).generate(PROMPTS, max_new_tokens=5, on_token=events.append, logprobs=0)
    assert all(top == {} for r in results for top in r.top_logprobs)
    for result in results:
        mine = [e for e in events if e.index == result.index]
        assert [e.logprob for e in mine] == result.logprobs and [e.top_logprobs for e in mine] == result.top_logprobs
    assert_full_forwards(model, PROMPTS, results, 0, "zero")


def test_none_leaves_the_fields_none_and_adds_no_work(monkeypatch):
    """logprobs=None (the default): no field filled, and no log-softmax, no copy back, no wait beyond the tokens'."""
    from egmla.infer import engine as engine_module

    copies = []
    to_host = engine_module.to_host_async
    monkeypatch.setattr(engine_module, "to_host_async", lambda ids: copies.append(ids.dtype) or to_host(ids))
    monkeypatch.setattr(engine_module, "token_logprobs", lambda *args: pytest.fail("log-probabilities computed"))
    events = []
    results = GenerationEngine(tiny_model("eg-mla")).generate(PROMPTS, max_new_tokens=4, on_token=events.append)
    assert all(r.logprobs is None and r.top_logprobs is None and r.prompt_logprobs is None for r in results)
    assert all(e.logprob is None and e.top_logprobs is None for e in events)
    assert copies == [torch.long] * 4  # one copy back per step: the tokens


@pytest.mark.parametrize("bad,said", [(-1, "logprobs=-1: negative"), (301, "logprobs=301: more than the vocabulary's "
                                      "300 tokens"), (1.5, "logprobs=1.5: not an int"), (True, "logprobs=True: a bool"),
                                      ("2", "logprobs='2': not an int")])
def test_bad_values_are_refused_naming_the_argument_and_the_fix(bad, said):
    with pytest.raises(ValueError) as caught:
        GenerationEngine(tiny_model("mha")).generate(PROMPTS, max_new_tokens=2, logprobs=bad)
    assert str(caught.value).startswith(said) and "0 to 300" in str(caught.value) and "or None" in str(caught.value)


def egmla_generate(capsys, *argv):
    code = egmla_main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_them_in_json_and_as_a_listing(capsys, run_dir):
    args = ["--run", str(run_dir), "--prompt", "To be, or", "--prompt", "Café", "--max-new-tokens", "6",
            "--temperature", "0", "--ignore-eos"]
    code, out, _ = egmla_generate(capsys, *args, "--json", "--logprobs", "2")
    results = json.loads(out)
    assert code == 0 and len(results) == 2
    for result in results:
        assert len(result["logprobs"]) == len(result["top_logprobs"]) == len(result["token_ids"]) == 6
        for token, value, top in zip(result["token_ids"], result["logprobs"], result["top_logprobs"]):
            assert len(top) == 2 and set(top[0]) == {"id", "text", "logprob"}
            assert top[0]["id"] == token and top[0]["logprob"] == value < 0  # greedy: the most likely token
            assert top[0]["logprob"] >= top[1]["logprob"]
    code, out, _ = egmla_generate(capsys, *args, "--json")
    assert code == 0 and "logprobs" not in json.loads(out)[0]  # not asked: the JSON as before
    code, out, _ = egmla_generate(capsys, *args, "--logprobs", "1")  # the listing after the texts
    assert code == 0 and out.count("log-probabilities of 6 tokens, sum ") == 2 and out.count("  top: ") == 12
    code, _, err = egmla_generate(capsys, *args, "--logprobs", "-1")
    assert code == 2 and "--logprobs -1: must be >= 0" in err
