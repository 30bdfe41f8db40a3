"""bench/soak.py on a tiny run: it samples the process, rebalances, and writes
its table and plot (the 50,000-token run is for a quiet machine)."""
from moe_numa.bench import soak


def test_soak_smoke(make_model, tmp_path):
    res = soak.soak(str(make_model("qwen3moe", "q8_0")), tokens=400, nodes=2, rebalance=128, request=100,
                    sample=100, n_ctx=128, progress=False)
    rows = res["rows"]
    assert res["tokens"] >= 400 and len(rows) >= 4
    assert rows[-1]["rebalances"] >= 1
    assert len({r["threads"] for r in rows}) == 1 and len({r["fds"] for r in rows}) == 1
    assert all(r["rss"] > 0 and r["anon"] > 0 for r in rows)
    text = soak.markdown(res)
    assert "| tokens |" in text and "After warm-up" in text
    soak.plot(res, str(tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 1000
