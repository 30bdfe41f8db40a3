"""Config dataclasses built from GGUF metadata, for each architecture."""
import math

import pytest

from moe_numa.gguf_file import GGUFModelFile
from moe_numa.layers.moe import GATING_SIGMOID, GATING_SOFTMAX
from moe_numa.models import load_model
from moe_numa.testing import PRESETS


def config(make_model, preset, **overrides):
    _, cfg, _ = load_model(GGUFModelFile(make_model(preset)), **overrides)
    return cfg


def test_qwen3moe_config(make_model):
    spec, cfg = PRESETS["qwen3moe"], config(make_model, "qwen3moe")
    a = cfg.attention
    assert (cfg.arch, cfg.hidden, cfg.n_layer) == ("qwen3moe", spec.hidden, spec.n_layer)
    assert (a.n_head, a.n_head_kv, a.head_dim) == (spec.n_head, spec.n_head_kv, spec.head_dim)
    assert a.n_head * a.head_dim != cfg.hidden          # Qwen3's q width differs from hidden
    assert a.rope.neox and a.rope.n_dims == spec.head_dim and a.rope.base == spec.rope_base
    assert a.kq_scale == pytest.approx(1 / math.sqrt(spec.head_dim))
    r = cfg.router
    assert (r.n_expert, r.n_used, r.gating, r.norm_weights) == (spec.n_expert, spec.n_used, GATING_SOFTMAX, True)
    assert cfg.expert_ff == spec.expert_ff
    assert cfg.n_vocab > 6000


def test_qwen2moe_config(make_model):
    spec, cfg = PRESETS["qwen2moe"], config(make_model, "qwen2moe")
    assert cfg.router.norm_weights is False and cfg.router.gating == GATING_SOFTMAX
    assert cfg.shared_ff == spec.shared_ff
    assert cfg.attention.n_head * cfg.attention.head_dim == cfg.hidden


def test_deepseek_v3_config(make_model):
    spec, cfg = PRESETS["deepseek-v3"], config(make_model, "deepseek-v3")
    a, r = cfg.attention, cfg.router
    assert cfg.split_kv_b and a.q_lora_rank == spec.q_lora_rank and a.kv_lora_rank == spec.kv_lora_rank
    assert (a.qk_nope_dim, a.qk_rope_dim, a.v_head_dim) == (spec.qk_nope, spec.qk_rope, spec.v_head)
    assert not a.rope.neox and a.rope.ext_factor == 1.0
    assert a.rope.freq_scale == pytest.approx(1 / spec.yarn[0])
    # YaRN with mscale_all_dim == 1: rope magnitude 1, softmax scale (1 + 0.1 ln f)^2 / sqrt(q_head).
    assert a.rope.magnitude == pytest.approx(1.0)
    f = spec.yarn[0]
    assert a.kq_scale == pytest.approx((1 + 0.1 * math.log(f)) ** 2 / math.sqrt(spec.qk_nope + spec.qk_rope), rel=1e-6)
    assert (r.gating, r.norm_weights, r.weights_scale) == (GATING_SIGMOID, True, spec.weights_scale)
    assert (r.n_groups, r.n_groups_used, r.group_rule) == (spec.n_groups, spec.n_groups_used, "top2_sum")
    assert cfg.n_dense_lead == 1 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    assert cfg.n_shared == spec.n_shared and cfg.dense_ff == spec.dense_ff


def test_deepseek_v2_lite_config(make_model):
    spec, cfg = PRESETS["deepseek-v2-lite"], config(make_model, "deepseek-v2-lite")
    a = cfg.attention
    assert not cfg.split_kv_b and a.q_lora_rank == 0
    assert cfg.router.gating == GATING_SOFTMAX and not cfg.router.norm_weights
    assert cfg.router.n_groups == 0 and cfg.n_shared == 2
    # mscale == mscale_all_dim (0.707): the YaRN magnitude cancels in the rope op.
    assert a.rope.magnitude == pytest.approx(1.0)
    f = spec.yarn[0]
    assert a.kq_scale == pytest.approx((1 + 0.1 * 0.707 * math.log(f)) ** 2 / math.sqrt(spec.qk_nope + spec.qk_rope),
                                       rel=1e-5)


def test_group_rule_override(make_model):
    assert config(make_model, "deepseek-v3", group_rule="max").router.group_rule == "max"


def test_glm4moe_config(make_model):
    spec, cfg = PRESETS["glm4moe"], config(make_model, "glm4moe")
    a, r = cfg.attention, cfg.router
    assert cfg.arch == "glm4moe" and cfg.n_layer == spec.n_layer and cfg.n_nextn == 1   # block_count 4
    assert (a.n_head, a.n_head_kv, a.head_dim) == (spec.n_head, spec.n_head_kv, spec.head_dim)
    assert a.rope.neox and a.rope.n_dims == spec.rope_dims < a.head_dim        # partial rotary
    assert a.kq_scale == pytest.approx(1 / math.sqrt(spec.head_dim))
    assert (r.gating, r.norm_weights, r.weights_scale) == (GATING_SIGMOID, True, pytest.approx(2.5))
    assert cfg.n_dense_lead == 1 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(2)
    assert cfg.shared_ff == spec.expert_ff and cfg.dense_ff == spec.dense_ff
    _, _, w = load_model(GGUFModelFile(make_model("glm4moe")))
    assert len(w.layers) == spec.n_layer                     # the NextN layer is not loaded
    assert w.layers[1].ffn.probs_bias is not None and w.layers[1].attn.bq is not None
    assert w.layers[0].ffn_norm.name == "blk.0.post_attention_norm.weight"
    assert w.layers[0].attn.q_norm is not None


def test_glm4moe_without_qk_norm_and_refusals(make_model, tmp_path):
    from gguf import GGUFValueType

    from moe_numa.errors import UnsupportedError
    from moe_numa.testing import make_test_model, variant
    air = make_test_model(tmp_path / "air.gguf", spec=variant("glm4moe", qk_norm=False, n_nextn=0))
    _, cfg, w = load_model(GGUFModelFile(air))               # GLM-4.5-Air: no q/k norms
    assert cfg.n_nextn == 0 and w.layers[0].attn.q_norm is None and w.layers[0].attn.k_norm is None
    mrope = make_test_model(tmp_path / "v.gguf", spec=variant(
        "glm4moe", extra={"glm4moe.rope.dimension_sections": ([8, 12, 12, 0], GGUFValueType.ARRAY, GGUFValueType.INT32)}))
    with pytest.raises(UnsupportedError, match="M-RoPE"):
        load_model(GGUFModelFile(mrope))
