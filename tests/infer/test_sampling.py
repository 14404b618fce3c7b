"""Sampling filters and text streaming helpers, on hand-made inputs."""
import array
import random

import numpy as np
import pytest
import torch

from egmla.infer.sampling import SamplingParams, filter_logits, long_tensor, padded_rows, select_next
from egmla.infer.text import IncrementalDetokenizer, StopStringMatcher


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.15, 0.1]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(filter_logits(logits, top_k=2)) == [1, 2]
    assert kept(filter_logits(logits, top_p=0.5)) == [1]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 2, 3]  # 0.5 + 0.2 < 0.75 needs the 0.15
    assert kept(filter_logits(logits, top_p=0.01)) == [1]  # the top token always stays
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [1, 2]
    assert kept(filter_logits(logits)) == [0, 1, 2, 3, 4]


def test_select_next_greedy_and_filtered_sampling():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    assert torch.equal(select_next(logits, SamplingParams()), logits.argmax(-1))
    top1 = SamplingParams(temperature=2.0, top_k=1, seed=3)
    assert torch.equal(select_next(logits, top1, top1.make_generator("cpu")), logits.argmax(-1))
    params = SamplingParams(temperature=1.0, top_k=5, seed=3)
    draws = select_next(logits, params, params.make_generator("cpu"))
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == draws[:, None]).any(-1).all()
    assert not torch.equal(draws, logits.argmax(-1))


def test_detokenizer_waits_for_whole_characters(tokenizer):
    text = "Café naïve — façade."
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text == detok.text()
    assert not any("\ufffd" in p for p in pieces)


def test_decode_stream_and_two_decodes_give_the_same_pieces(tokenizer):
    """A `tokenizers.Tokenizer` decodes through DecodeStream, one call per token; other tokenizers (or use_stream=False)
    through two decodes per token. On real text and on random ids (pieces ending inside UTF-8 characters) both join to
    the one-shot decode, piece for piece the same."""
    import random

    class Wrapped:  # a tokenizer that is not a `tokenizers.Tokenizer` (as transformers' wrappers are not)
        decode = staticmethod(tokenizer.decode)

    assert IncrementalDetokenizer(tokenizer).stream is not None
    assert IncrementalDetokenizer(Wrapped()).stream is None and IncrementalDetokenizer(tokenizer, False).stream is None
    rng = random.Random(0)
    texts = ["Café naïve — façade. 日本語 🙂", "To be, or not to be"]
    for ids in [tokenizer.encode(t).ids for t in texts] + [[rng.randrange(tokenizer.get_vocab_size())
                                                            for _ in range(400)]]:
        pieces = {}
        for name, detok in (("stream", IncrementalDetokenizer(tokenizer)), ("two", IncrementalDetokenizer(Wrapped()))):
            pieces[name] = [detok.push(i) for i in ids]
            assert "".join(pieces[name]) + detok.text()[len("".join(pieces[name])):] == tokenizer.decode(ids)
        assert pieces["stream"] == pieces["two"]


def test_stop_matcher_holds_back_possible_stop_prefixes():
    matcher = StopStringMatcher(["END", "\n\n"])
    assert matcher.add("abc E") == ("abc ", False)  # "E" could start "END"
    assert matcher.add("x") == ("Ex", False)  # it did not
    assert matcher.add("yEN") == ("y", False)
    assert matcher.add("Dzzz") == ("", True)  # the stop string spans three pieces
    assert matcher.text == "abc Exy"
    plain = StopStringMatcher([])
    assert plain.add("anything") == ("anything", False)
    assert plain.add(" more") == (" more", False) and plain.text == "anything more" and plain.flush() == ""


def test_stop_matcher_on_random_text_releases_a_prefix_and_cuts_at_the_first_stop():
    """Random pieces over a small alphabet against stop strings made of it: what the matcher releases is always a
    prefix of the text up to the first stop string (the joined pieces searched whole), it holds back fewer characters
    than the longest stop string, and released + flushed is exactly that text."""
    import random

    rng = random.Random(1)
    for trial in range(300):
        stops = ["".join(rng.choice("abc\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        pieces = ["".join(rng.choice("abcd\n") for _ in range(rng.randint(0, 3))) for _ in range(30)]
        matcher, released, stopped = StopStringMatcher(stops), "", False
        for piece in pieces:
            out, stopped = matcher.add(piece)
            released += out
            if stopped:
                break
            assert matcher.text.startswith(released) and len(matcher.text) - len(released) < max(1, matcher.longest)
        released += matcher.flush()
        full = "".join(pieces)
        cut = min((p for s in stops if (p := full.find(s)) >= 0), default=-1)
        expected = full[:cut] if cut >= 0 else full
        assert released == expected == matcher.text and stopped == (cut >= 0), (trial, stops, pieces)


def test_a_sequences_text_is_the_same_streamed_or_decoded_once_special_tokens_and_cut_characters_included(tokenizer):
    """`SequenceState` as the scheduler feeds it, on ids thick with <|endoftext|> (id 0: no text) and with bytes that
    split characters, ending by length, at eos 0 or at an ordinary token named as eos: a streamed sequence's pieces
    (DecodeStream) join to its text, which is an unstreamed one's (decoded once at its end) and the one-shot decode of
    its tokens less the eos (whose text is left out, as vLLM does); a stop string taken from that text cuts it before
    its first occurrence, streamed or not, and no piece of it is streamed."""
    import random

    from egmla.infer.engine import SequenceState

    rng = random.Random(2)
    known = tokenizer.encode("Café naïve — 日本語 🙂 aa\n\n").ids

    def run(ids, eos, stream, stops=()):
        sequence, pieces = SequenceState(0, [1], tokenizer, list(stops), text_per_token=stream), []
        for token_id in ids:
            pieces.append(sequence.add(token_id, eos, len(ids), 10**6))
            if sequence.result.finish_reason is not None:
                return sequence.result, "".join(pieces)

    for trial in range(300):
        ids = [0 if rng.random() < 0.3 else rng.choice(known) if rng.random() < 0.5
               else rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randint(1, 16))]
        eos = rng.choice([None, 0, rng.choice(known)])
        streamed, joined = run(ids, eos, True)
        quiet, nothing = run(ids, eos, False)
        texted = streamed.token_ids[:-1] if streamed.finish_reason == "eos" else streamed.token_ids
        assert joined == streamed.text == quiet.text == tokenizer.decode(texted) and nothing == "", trial
        assert (quiet.token_ids, quiet.finish_reason) == (streamed.token_ids, streamed.finish_reason), trial
        cut = rng.randint(0, len(ids))  # a request cancelled after `cut` tokens: the same text either way
        cancelled = [SequenceState(0, [1], tokenizer, [], text_per_token=stream) for stream in (True, False)]
        for sequence in cancelled:
            for token_id in ids[:cut]:
                sequence.add(token_id, None, 10**6, 10**6)
        assert cancelled[0].text_so_far() == cancelled[1].text_so_far() == tokenizer.decode(ids[:cut]), trial
        text = streamed.text
        starts = [k for k in range(len(text)) if "\ufffd" not in text[k:k + 3]]
        if starts:
            start = rng.choice(starts)
            stop = text[start:start + rng.randint(1, 3)]
            for stream in (True, False):
                result, joined = run(ids, eos, stream, [stop, "never said"])
                assert (result.text, result.finish_reason) == (text[:text.index(stop)], "stop"), (trial, stop)
                assert joined == result.text, (trial, stop)  # stop strings watch the text per token either way


def test_each_row_is_filtered_and_drawn_as_it_is_alone():
    """sample_rows: a batch of mixed settings (greedy, temperature, top-k on and off, k past the vocabulary, top-p on
    and off, seeded and not) filtered in one pass: every row's filter equals filter_logits of that row alone, every
    seeded row draws what select_next gives it alone with the same seed, every other row stays in its support."""
    import random

    from egmla.infer.sampling import filter_rows, sample_rows

    rng = random.Random(0)
    vocab = 50
    for trial in range(30):
        rows = rng.randrange(1, 9)
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(trial)) * 3
        params = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), top_k=rng.choice([0, 1, 3, 10, 60]),
                                 top_p=rng.choice([1.0, 0.9, 0.5, 0.05]), seed=rng.choice([None, trial, 7]))
                  for _ in range(rows)]
        filtered = filter_rows(logits, [p.top_k for p in params], [p.top_p for p in params])
        for i, p in enumerate(params):
            assert torch.equal(filtered[i], filter_logits(logits[i: i + 1], p.top_k, p.top_p)[0]), (trial, i)
        generators = [p.make_generator("cpu") if p.seed is not None else None for p in params]
        ids = sample_rows(logits, params, generators, shared=torch.Generator().manual_seed(1))
        for i, p in enumerate(params):
            alone = select_next(logits[i: i + 1], p, p.make_generator("cpu"))[0]
            if p.greedy or p.seed is not None:
                assert ids[i] == alone, (trial, i, p)
            else:
                scaled = filter_logits(logits[i: i + 1] / p.temperature, p.top_k, p.top_p)[0]
                assert scaled[ids[i]] > float("-inf"), (trial, i, p)


def test_a_temperature_below_greedy_below_is_greedy_not_nan(tokenizer):
    """SamplingParams(temperature=1e-45) (a float32 subnormal) or 1e-300 (0 in float32) made the scaled logits
    infinite and the probabilities NaN: torch.multinomial raised, failing the whole decode step of a Scheduler. Below
    GREEDY_BELOW (vLLM's 1e-5) it is greedy, as `egmla serve` made it (the rule now lives in SamplingParams alone)."""
    from tests.infer.helpers import tiny_model

    from egmla.infer import GenerationEngine
    from egmla.infer.sampling import GREEDY_BELOW, sample_rows
    from egmla.infer.scheduler import Scheduler

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature in (1e-45, 1e-300, GREEDY_BELOW / 2):
        params = SamplingParams(temperature, seed=1)
        assert params.greedy and params == SamplingParams(0.0, seed=1)
        assert torch.equal(sample_rows(logits, [params] * 3, [params.make_generator("cpu")] * 3), logits.argmax(-1))
    assert not SamplingParams(GREEDY_BELOW).greedy
    engine = GenerationEngine(tiny_model("eg-mla", seed=3), tokenizer, decode_path="gate-table")
    greedy = engine.generate(["To be"], max_new_tokens=5)[0].token_ids
    scheduler = Scheduler(engine, max_batch=2, max_len=32, seed=0)
    handles = [scheduler.submit("To be", max_new_tokens=5, sampling=SamplingParams(t, seed=None))
               for t in (1e-45, 1e-300)]
    while scheduler.step():
        pass
    assert [handle.result(timeout=0).token_ids for handle in handles] == [greedy, greedy]


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -1.0])
def test_a_temperature_that_is_not_a_finite_number_at_least_0_is_refused(temperature):
    """inf was taken (`egmla generate --temperature inf`): every logit divided to 0, uniform draws over the vocabulary."""
    with pytest.raises(ValueError, match=r"^temperature=.*: must be a finite number >= 0 \(0 = greedy\)"):
        SamplingParams(temperature=temperature)


@pytest.mark.parametrize("field,value", [("top_k", 2.5), ("top_k", 3.0), ("top_k", True), ("seed", 1.5),
                                         ("seed", "7")])
def test_a_top_k_or_seed_that_is_not_an_int_is_refused(field, value):
    """Taken until the draw (topk and manual_seed raise there): in the scheduler that failed every request running
    beside the one that brought it."""
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(temperature=1.0, **{field: value})
    assert SamplingParams(temperature=1.0, top_k=np.int64(3), seed=np.int64(4)).top_k == 3


def test_the_nucleus_of_bf16_logits_is_the_nucleus_of_their_fp32_values():
    """filter_logits on bf16 logits summed the probabilities and compared top_p in bf16 (0.95 became 0.9492): the
    nucleus of the same numbers differed with their dtype. The engine samples in fp32; a caller of the public function
    with a model's bf16 logits got another nucleus."""
    torch.manual_seed(0)
    logits = (torch.randn(2000, 50) * 2).to(torch.bfloat16)
    for top_p in (0.5, 0.9, 0.95):
        kept_bf16 = filter_logits(logits, top_p=top_p).isfinite()
        kept_fp32 = filter_logits(logits.float(), top_p=top_p).isfinite()
        assert torch.equal(kept_bf16, kept_fp32), top_p


def test_cpu_seeds_a_multiple_of_2_to_the_32_apart_draw_differently():
    """torch's CPU generator keeps 32 bits of a seed; seeds below 2**32 keep their old draws."""
    def draws(seed):
        return torch.rand(8, generator=SamplingParams(temperature=1.0, seed=seed).make_generator("cpu"))

    assert torch.equal(draws(7), torch.rand(8, generator=torch.Generator().manual_seed(7)))
    seen = [draws(seed) for seed in (1, 1 + 2**32, 1 + 2 * 2**32, 2**64 - 1, -2, -2**63)]  # -1 is 2**64 - 1 to torch
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_a_seed_torch_cannot_take_is_refused_when_made_not_at_the_draw(seed):
    with pytest.raises(ValueError, match=r"seed=.*must lie in \[-2\*\*63, 2\*\*64\)"):
        SamplingParams(temperature=1.0, seed=seed)


def test_long_tensor_equals_torch_tensor_on_fresh_lists():
    """`long_tensor` (the host's fast path from ints to int64, per prefill row) against `torch.tensor`: lists and
    tuples, empty, negative and past 2^31, and a tensor that outlives the list it came from."""
    rng = random.Random(7)
    cases = [[], (), [0], [True, 5], tuple(range(1024)), [-3, 2 ** 40, -(2 ** 62)]]
    cases += [[rng.randrange(-2 ** 63, 2 ** 63) for _ in range(rng.randrange(1, 3000))] for _ in range(5)]
    for values in cases:
        out = long_tensor(values)
        assert out.dtype == torch.long and out.shape == (len(values),)
        assert torch.equal(out, torch.tensor(list(values), dtype=torch.long))
    kept = long_tensor([rng.randrange(50_000) for _ in range(100)])
    copy = kept.clone()
    [bytearray(1 << 16) for _ in range(64)]  # the list and its array are gone: the tensor keeps the buffer alive
    assert torch.equal(kept, copy)
    kept[0] = 1  # writable, as torch.tensor's
    with pytest.raises(TypeError):
        long_tensor([1.5])


def test_padded_rows_equals_a_zero_tensor_written_row_by_row_on_fresh_rows():
    """`padded_rows` (the prefill inputs of the scheduler and of `generate`) against the plain way: a zero tensor with
    each row written in: rows as arrays, array slices, lists and tuples, empty rows, a full row, no rows, width 0; a
    row wider than the width is refused, naming the row."""
    rng = random.Random(11)
    for _ in range(20):
        width = rng.randrange(1, 300)
        rows = []
        for _ in range(rng.randrange(1, 12)):
            ids = [rng.randrange(-2 ** 63, 2 ** 63) for _ in range(rng.choice([0, width, rng.randrange(width + 1)]))]
            kind = rng.randrange(4)
            rows.append(array.array("q", ids) if kind == 0 else array.array("q", [7, *ids, 9])[1:-1] if kind == 1
                        else ids if kind == 2 else tuple(ids))
        expected = torch.zeros(len(rows), width, dtype=torch.long)
        for i, ids in enumerate(rows):
            expected[i, :len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        out = padded_rows(rows, width)
        assert out.dtype == torch.long and torch.equal(out, expected)
    assert padded_rows([], 8).shape == (0, 8) and padded_rows([[], ()], 0).shape == (2, 0)
    with pytest.raises(ValueError, match="row 1: 4 ids do not fit a width of 3"):
        padded_rows([[1], [1, 2, 3, 4]], 3)
