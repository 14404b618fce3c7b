"""The allocator-trace replay behind `egmla bench train --memory-snapshot`, on hand-made snapshots."""
import pytest

from egmla.bench.memory_peak import MARK, format_breakdown, peak_breakdown


def frames(filename, name, line=1):
    return [{"filename": "??", "line": 0, "name": "c10::cuda::alloc"},
            {"filename": "/site-packages/torch/nn/functional.py", "line": 7, "name": "linear"},
            {"filename": filename, "line": line, "name": name}]


def alloc(addr, size, where=("/repo/egmla/model.py", "forward")):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames(*where)}


def free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size, "frames": []}


def mark():
    return {"action": "alloc", "addr": 9, "size": 512,
            "frames": [{"filename": "/repo/egmla/bench/memory_peak.py", "line": 3, "name": MARK}]}


def snapshot(trace, segments):
    return {"segments": segments, "device_traces": [trace]}


def segment(address, size, allocated, pool=(0, 0)):
    return {"device": 0, "address": address, "total_size": size, "allocated_size": allocated,
            "segment_pool_id": pool, "blocks": []}


def test_the_peak_its_step_and_what_was_live_then():
    graph = ("/tmp/torchinductor_me/ab/cabc.py", "call")
    trace = [mark(), alloc(1000, 300, graph), alloc(2000, 50), free(2000, 50),  # warm-up 1: graph pool
             mark(), alloc(2000, 80), alloc(3000, 20), free(3000, 20), free(2000, 80),  # step 1: 380 live at most
             mark(), alloc(2000, 90), alloc(3000, 60), free(3000, 60), free(2000, 90)]  # step 2: 450 at most
    segments = [segment(0, 500, 100), segment(1000, 400, 300, pool=(1, 0)), segment(2000, 2000, 0)]
    result = peak_breakdown(snapshot(trace, segments), ["setup", "warm-up 1", "step 1", "step 2"])
    # 100 bytes were allocated before the trace (in the segments at the end, not in the trace's net 300)
    assert result["before_trace_gb"] == pytest.approx(100e-9)
    assert result["peak_gb"] == pytest.approx((100 + 300 + 90 + 60) * 1e-9)
    assert result["peak_in"] == "step 2"
    assert [(g["where"], g["pool"], g["allocated_in"], g["blocks"]) for g in result["live"]] == [
        ("inductor cabc.py:1 call", "private", "warm-up 1", 1),
        ("model.py:1 forward", "default", "step 2", 2)]
    assert result["live"][1]["gb"] == pytest.approx(150e-9)
    assert result["live_other_gb"] == 0
    assert result["reserved_at_end_gb"]["default"] == pytest.approx(2500e-9)
    assert result["reserved_at_end_gb"]["private"] == pytest.approx(400e-9)
    text = format_breakdown("EG-MLA kv64", result)
    assert "in step 2" in text and "private" in text and "inductor cabc.py:1 call" in text


def test_groups_beyond_top_are_summed_and_a_free_of_an_untraced_block_is_ignored():
    trace = [alloc(10 * i, i + 1, (f"/repo/egmla/m{i}.py", "f")) for i in range(5)]
    trace.append(free(999, 7))  # allocated before the trace began
    result = peak_breakdown(snapshot(trace, [segment(0, 100, 15)]), top=2)
    assert [g["gb"] * 1e9 for g in result["live"]] == pytest.approx([5, 4])
    assert result["live_other_gb"] * 1e9 == pytest.approx(1 + 2 + 3)
    assert result["peak_in"] == "span 0" and result["before_trace_gb"] == 0


def test_an_empty_trace_says_so():
    result = peak_breakdown({"segments": [], "device_traces": []})
    assert result["peak_in"] is None and result["live"] == [] and result["peak_gb"] == 0
    assert result["reserved_at_end_gb"] == {"default": 0, "private": 0}
