"""The server load benchmark (bench/serve.py): its arithmetic and tables, and one
tiny real run against `moe-numa serve` on the default model (no timing asserted;
llama-server is not needed: --engines moe_numa)."""
from __future__ import annotations

import json

from moe_numa.bench import serve as S
from moe_numa.default_model import default_model_path


def test_percentile_and_distinct_prompts():
    assert S.percentile([4, 1, 3, 2], 50) == 2.5
    assert S.percentile([1, 2, 3, 4, 5], 100) == 5 and S.percentile([], 50) is None
    prompts = {S.prompt_for(i, r, 12) for i in range(8) for r in range(3)}
    assert len(prompts) == 24


def test_summary_targets_and_table():
    def s(eng, c, agg):
        return {"engine": eng, "concurrency": c, "agg_tps": agg, "ttft_s": [0.1, 0.2], "itl_s": [0.01, 0.03],
                "others_cpu_s": 0.0}
    runs = [{"engine": "moe_numa", "samples": [s("moe_numa", 1, 10.0), s("moe_numa", 4, 20.0), s("moe_numa", 4, 22.0),
                                               s("moe_numa", 4, 18.0)]},
            {"engine": "llama.cpp", "samples": [s("llama.cpp", 1, 12.0), s("llama.cpp", 4, 16.0)]}]
    rows = S.summarize(runs, [1, 4])
    ours4 = [r for r in rows if r["engine"] == "moe_numa" and r["concurrency"] == 4][0]
    assert ours4["agg_tps"] == 20.0 and ours4["agg_min"] == 18.0 and ours4["n"] == 3
    assert abs(ours4["itl_p50_ms"] - 20.0) < 1e-9 and abs(ours4["ttft_p50_ms"] - 150.0) < 1e-9
    t = S.targets(rows)
    assert t["scaling_4"] == 2.0 and t["scaling_4_met"]
    assert t["vs_llama_4"] == 1.25 and t["vs_llama_4_met"]
    md = S.format_markdown({"settings": {"model": "m.gguf", "threads": 2, "parallel": 4, "n_predict": 8, "reps": 3},
                            "machine": {"cpu": "x"}, "rows": rows, "targets": t})
    assert "| moe_numa | 4 | 20.0 [18.0-22.0] |" in md and "1.25x" in md and "2.00x" in md


def test_tiny_run_against_our_server(tmp_path):
    out = tmp_path / "sb"
    rc = S.main(["-m", str(default_model_path()), "--concurrency", "1,2", "-n", "6", "-r", "1",
                 "--engines", "moe_numa", "-c", "128", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out.parent / "sb.json").read_text())
    run = rep["runs"][0]
    assert run["exit_code"] == 0                     # the server stopped cleanly on SIGTERM
    for smp in run["samples"]:
        assert smp["errors"] == [] and smp["tokens"] == [6] * smp["concurrency"]   # ignore_eos: exactly -n
        assert smp["agg_tps"] > 0
    assert (out.parent / "sb.md").read_text().count("| moe_numa |") == 2
