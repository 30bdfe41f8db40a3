"""One definition crosses the boundary: the C headers' enums are what Python sees
(cpdef enums, values taken from C), and the shard descriptors have the fields of
mn_engine.h's structs, one to one. A member or field added on one side only fails here."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest

from moe_numa import _native

INCLUDE = Path(__file__).resolve().parents[1] / "cython_kernels" / "include"


def header_enums() -> dict[str, dict[str, int]]:
    text = "".join((INCLUDE / h).read_text() for h in ("mn_kernels.h", "mn_engine.h"))
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for name, body in re.findall(r"enum\s+(mn_\w+)\s*\{(.*?)\}", text, flags=re.S):
        out[name] = {k: int(v) for k, v in re.findall(r"(MN_\w+)\s*=\s*(-?\d+)", body)}
    return out


def struct_fields(name: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", "", (INCLUDE / "mn_engine.h").read_text(), flags=re.S)
    body = re.search(r"typedef struct \{([^{}]*)\}\s*" + name + ";", text).group(1)
    fields = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:   # "const float *a, *b" -> a, b
            head, *rest = decl.split(",")
            fields += [re.sub(r"[*\s]", "", n) for n in [head.split()[-1]] + rest]
    return fields


ENUMS = ["mn_ggml_type", "mn_act_format", "mn_attn_kind", "mn_ffn_kind", "mn_gating", "mn_group_rule"]


@pytest.mark.parametrize("name", ENUMS)
def test_python_sees_every_member_of_each_c_enum_with_its_value(name):
    c = header_enums()[name]
    py = {m.name: int(m) for m in getattr(_native, name)}
    assert c and py == c


def test_the_header_enums_are_all_exposed():
    assert sorted(header_enums()) == sorted(ENUMS)


def test_ggml_type_ids_are_ggufs():
    for m in _native.mn_ggml_type:
        assert int(gguf.GGMLQuantizationType[m.name[3:]]) == int(m), m.name


def test_names_the_python_side_uses_come_from_the_enums():
    assert set(_native.ATTN_KINDS) == {"none", "gqa", "mla", "mla_mha"}
    assert set(_native.FFN_KINDS) == {"none", "dense", "moe"}
    from moe_numa.layers.moe import GATING_SIGMOID, GATING_SOFTMAX, GROUP_RULES
    assert set(_native.GATINGS) == {GATING_SOFTMAX, GATING_SIGMOID}
    assert set(_native.GROUP_RULES) == set(GROUP_RULES)
    from moe_numa import quants
    assert {t.act for t in quants._TABLE.values() if t.act} <= set(_native.enum_names(_native.mn_act_format, "MN_ACT_"))


@pytest.mark.parametrize("cls,struct", [("Mat", "mn_mat"), ("AttnShard", "mn_attn_layer"),
                                        ("FFNShard", "mn_ffn_layer"), ("HeadShard", "mn_head_shard")])
def test_descriptors_mirror_the_structs_field_by_field(cls, struct):
    d = getattr(_native, cls)
    derived = {c for cs in d.DERIVED.values() for c in cs}
    mirrored = [f for f in d.__slots__ if f not in d.DERIVED] + sorted(derived)
    assert sorted(mirrored) == sorted(struct_fields(struct))
    assert not set(d.DERIVED) & set(struct_fields(struct))
