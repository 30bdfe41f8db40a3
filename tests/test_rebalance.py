"""Hot-expert rebalancing: experts move between nodes by swapping shard slots,
node loads even out, memory stays one copy, and the model computes the same."""
import numpy as np
import pytest

import moe_numa


def skewed_map(n_expert):
    # every expert but one on node 0: routed tokens pile up there
    return {"model": {"n_expert": n_expert}, "nodes": [0, 1],
            "experts": {0: f"0-{n_expert - 2}", 1: str(n_expert - 1)}}


@pytest.mark.parametrize("preset", ["deepseek-v3", "qwen3moe"])
def test_rebalance_moves_hot_experts_and_keeps_the_output(make_model, preset):
    path = make_model(preset, "f32")
    with moe_numa.load(path, numa_nodes=2, expert_map=skewed_map(16 if preset == "deepseek-v3" else 8),
                       rebalance_every=None) as m:
        b = m.backend
        ids = list(range(20, 60))
        before = m.logits(ids)
        counts_before = [c.copy() for c in b.counters()["expert_tokens"]]
        placed_before = sum(it.nbytes for it in b.store.items.values() if it.cls == "routed_experts")
        report = m.rebalance(min_tokens=1)
        assert report, "a skewed map must trigger swaps"
        for layer, r in report.items():
            assert r["after"] < r["before"]
            lp = b.plan.layers[layer]
            load = [counts_before[layer][lp.experts[n]].sum() for n in range(2)]
            assert max(load) / np.mean(load) == pytest.approx(r["after"])
            for e_from, n_from, e_to, n_to in r["swaps"]:
                assert e_from in lp.experts[n_to] and e_to in lp.experts[n_from]
                assert b.plan.expert_map.owners(layer)[e_from] == n_to
                assert (n_to, f"L{layer}.e{e_from}.gate") in b.store.arrays
                # the slot now on n_to holds e_from's weights, bit for bit
                gguf_e = np.asarray(m.weights.layers[layer].ffn.gate_exps.raw[e_from])
                np.testing.assert_array_equal(b.store.arrays[(n_to, f"L{layer}.e{e_from}.gate")], gguf_e)
        assert sum(it.nbytes for it in b.store.items.values() if it.cls == "routed_experts") == placed_before
        assert all(int(c.sum()) == 0 for c in b.counters()["expert_tokens"])     # counters restart
        after = m.logits(ids)
        np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())


def test_automatic_rebalance(make_model):
    with moe_numa.load(make_model("qwen3moe", "f32"), numa_nodes=2, expert_map=skewed_map(8),
                       rebalance_every=64) as m:
        m.backend.forward(np.arange(40, 120, dtype=np.int32))       # 80 tokens: one rebalance
        assert len(m.backend.rebalance_log) == 1 and m.backend._since_rebalance == 0
        m.generate("Hello", max_tokens=8, temperature=0)            # below the interval: none
        assert len(m.backend.rebalance_log) == 1


def test_one_node_never_rebalances(make_model):
    with moe_numa.load(make_model("qwen3moe", "f32"), numa_nodes=1) as m:
        m.logits(list(range(40)))
        assert m.rebalance(min_tokens=1) == {}
    ref = moe_numa.load(make_model("qwen3moe", "f32"), backend="reference")
    with pytest.raises(moe_numa.MoeNumaError, match="engine"):
        ref.rebalance()
