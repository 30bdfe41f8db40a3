"""The projection to real sockets (bench/project.py): every mode at 2, 4 and 8
nodes, memory per mode, the default (split) against whole placement, and the
calibration command runs (its numbers are timings: read them on a quiet machine)."""
import numpy as np
import pytest

from moe_numa.bench import project as P
from moe_numa.cli import main


def test_projection_covers_every_mode_and_node_count():
    shape = P.MODELS["deepseek-v3-q4_k_m"]
    trace = P.synthetic_trace(shape.n_expert, shape.n_used, tokens=512, skew=1.0)
    rows = P.project(shape, P.SERVERS[1], trace, nodes=(2, 4, 8))
    assert {(r["mode"], r["nodes"]) for r in rows} == {(m, n) for m in P.MODES for n in (2, 4, 8)}
    by = {(r["mode"], r["nodes"]): r for r in rows}
    for n in (2, 4, 8):
        assert by[("copy per node", n)]["memory_x"] == n and by[("split", n)]["memory_x"] == 1.0
        assert 1.0 <= by[("hybrid + replicas", n)]["memory_x"] <= 1.06
        # the default (split) loses nowhere to whole placement, decode or prefill
        assert by[("split", n)]["decode_tps"] >= by[("whole", n)]["decode_tps"]
        assert by[("split", n)]["prefill_tps"] >= 0.99 * by[("whole", n)]["prefill_tps"]
        assert by[("hybrid", n)]["decode_tps"] >= by[("whole", n)]["decode_tps"] - 1e-9
    assert by[("split", 4)]["decode_tps"] >= 1.2 * by[("whole", 4)]["decode_tps"]
    # pages spread over the sockets cost llama.cpp the link
    assert by[("llama.cpp distribute", 8)]["decode_tps"] < by[("whole", 8)]["decode_tps"]


def test_uniform_routing_still_leaves_whole_placement_waiting():
    """Issue 12's numbers: top-8 of many experts, uniform: the busiest node holds ~1.26x the mean at 2
    nodes, ~1.7x at 4, ~2.5x at 8."""
    from moe_numa.numa.profile import LayerPlacement, critical_path
    trace = P.synthetic_trace(256, 8, tokens=4000, skew=0.0)
    for n, want in ((2, 1.26), (4, 1.7), (8, 2.5)):
        pl = LayerPlacement([(e * n // 256,) for e in range(256)], [False] * 256)
        assert critical_path(trace, pl, n) / (8 / n) == pytest.approx(want, rel=0.06)


def test_project_command(capsys):
    assert main(["project", "--model-preset", "qwen3-30b-a3b-q4_k_m", "--nodes", "2,4"]) == 0
    out = capsys.readouterr().out
    assert out.count("| hybrid + replicas |") == 2 * len(P.SERVERS) and "assumed:" in out


def test_calibration_runs(make_model, capsys):
    assert main(["project", "--calibrate", "-m", str(make_model("qwen3moe", "q8_0")), "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    for mode in ("whole", "split", "hybrid"):
        assert f"| {mode} |" in out
    assert "split experts' extra time per byte" in out


def test_split_overhead_is_measured_per_model(make_model):
    """The split penalty the projection uses comes from timing the model's own down type at the
    whole and the split row length: a finite, non-negative share (down is a third of an expert)."""
    path = str(make_model("qwen3moe", "q8_0"))
    from moe_numa import kernels
    ovh = P.measure_split_overhead(path, 2, kernels.available_cpus()[0])
    assert 0.0 <= ovh < 1.0


def test_balance_benchmark_runs(make_model, capsys):
    from moe_numa.bench import balance
    assert balance.parse_layout("2x1:split") == (2, 1, "split")
    with pytest.raises(SystemExit, match="expected NODESxTHREADS:MAP"):
        balance.parse_layout("two:split")
    path = str(make_model("qwen3moe", "q8_0"))
    assert balance.main(["-m", path, "--layouts", "1x1:contiguous,2x1:split", "--tests", "tg2", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 2 node(s) x 1 thread(s), split |" in out and "imbalance" in out


def test_balance_benchmark_paired_runs_both_layouts_in_one_process(make_model, capsys):
    from moe_numa.bench import balance
    path = str(make_model("qwen3moe", "q8_0"))
    assert balance.main(["-m", path, "--layouts", "1x1:contiguous,2x1:split", "--tests", "tg2,pp8", "-r", "2",
                         "--paired"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 2 node(s) x 1 thread(s), split |"))
    assert len(row.split("|")) == 2 + 1 + 2 * 4      # layout + four cells per test
    assert "Paired in one process (2 rounds" in out

