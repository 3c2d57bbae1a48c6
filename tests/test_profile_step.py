"""The profiling helpers of benchmarks/profile_step.py on synthetic input (the GPU runs use them)."""

from conftest import load_benchmark

profile_step = load_benchmark("profile_step")


def frame(filename, line=1, name="f"):
    return {"filename": filename, "line": line, "name": name}


def test_interval_union_merges_overlaps():
    assert profile_step.merged([(5, 7), (0, 2), (1, 3)], 0.0) == [(0, 3), (5, 7)]
    assert profile_step.union([(5, 7), (0, 2), (1, 3)]) == 5
    assert profile_step.merged([(0, 1), (1.5, 2)], 1.0) == [(0, 2)]


def test_site_is_the_innermost_frame_outside_torch():
    torch_frame = frame(profile_step.TORCH_DIR + "nn/functional.py", 10, "linear")
    ds = frame("/tmp/site/deepspeed/runtime/zero/stage3.py", 412, "_partition")
    assert profile_step.site([torch_frame, ds]) == "runtime/zero/stage3.py:412 (_partition)"
    # a package in an environment whose path names torch (e.g. /opt/torch/.venv) is not torch
    image = frame("/opt/torch/.venv/lib/python3.12/site-packages/transformers/modeling_utils.py", 5, "f")
    assert profile_step.site([torch_frame, image]) == "site-packages/transformers/modeling_utils.py:5 (f)"
    graph = frame("/tmp/torchinductor_root/ab/cabc.py", 99, "call")
    assert profile_step.site([torch_frame, graph, ds]) == "compiled graph cabc.py"
    assert profile_step.site([torch_frame]).startswith("torch")
    assert profile_step.site([]).startswith("unknown")


def test_live_at_peak_replays_allocations_and_frees():
    a = [frame("/src/llmpar/model.py", 5, "forward")]
    b = [frame("/tmp/site/deepspeed/runtime/zero/stage3.py", 7, "gather")]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": a},
        {"action": "alloc", "addr": 2, "size": 300, "frames": b},
        {"action": "free_requested", "addr": 1, "size": 100, "frames": a},  # not yet returned
        {"action": "alloc", "addr": 3, "size": 50, "frames": a},  # the peak: 450 live
        {"action": "free_completed", "addr": 1, "size": 100, "frames": a},
        {"action": "free_completed", "addr": 2, "size": 300, "frames": b},
        {"action": "alloc", "addr": 4, "size": 200, "frames": a},  # 250 live
    ]
    r = profile_step.live_at_peak(trace, top=1)
    assert (r["peak_bytes"], r["peak_event"], r["blocks_live"]) == (450, 3, 3)
    assert r["sites"] == [{"site": "runtime/zero/stage3.py:7 (gather)", "bytes": 300, "blocks": 1}]
    assert r["other_bytes"] == 150  # the model's two blocks, beyond the top site


def test_device_shares_separates_compute_nccl_and_idle(tmp_path):
    def x(name, ts, dur, cat="kernel", **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [x("gemm", 0, 40), x("ncclDevKernel_SendRecv", 30, 30, stream=20),  # NCCL alone 40-60
              x("gemm", 80, 20),  # idle 60-80
              x("PP:0F0", 0, 40, cat="gpu_user_annotation"), x("PP:0F0", -5, 10, cat="user_annotation")]
    trace = tmp_path / "trace.json"
    trace.write_text(__import__("json").dumps({"traceEvents": events}))
    d = profile_step.device_shares(trace)
    assert (d["compute"], d["nccl_only"], round(d["idle"], 9)) == (0.6, 0.2, 0.2)
    assert d["timeline"]["t0_us"] == 0 and d["timeline"]["nccl_ms"] == [(0.03, 0.06, "ncclDevKernel_SendRecv", 20)]
    assert d["timeline"]["actions"] == {"host_ms": [("0F0", -0.005, 0.005)], "device_ms": [("0F0", 0.0, 0.04)]}
