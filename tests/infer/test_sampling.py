"""Sampling filters and text streaming helpers, on hand-made inputs."""
import torch

from egmla.infer.sampling import SamplingParams, filter_logits, select_next
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


def test_stop_matcher_holds_back_possible_stop_prefixes():
    matcher = StopStringMatcher(["END", "\n\n"])
    assert matcher.add("abc E") == ("abc ", False)  # "E" could start "END"
    assert matcher.add("x") == ("Ex", False)  # it did not
    assert matcher.add("yEN") == ("y", False)
    assert matcher.add("Dzzz") == ("", True)  # the stop string spans three pieces
    assert matcher.text == "abc Exy"
    plain = StopStringMatcher([])
    assert plain.add("anything") == ("anything", False)
