"""The moe-numa command: generate (default model and a given file), inspect, map, topology, errors."""
import json

import yaml

from moe_numa.cli import main


def test_generate_on_a_model(make_model, capsys):
    assert main(["generate", "-m", str(make_model("qwen3moe", "q8_0")), "-p", "Hello", "-n", "5",
                 "--temp", "0", "--numa-nodes", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "[engine] prompt" in err and "generated" in err


def test_generate_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_NUMA_CACHE", str(tmp_path))
    assert main(["generate", "-p", "Hi", "-n", "3", "--seed", "1", "--chat"]) == 0
    assert list(tmp_path.glob("default/*.gguf"))
    assert "finish:" in capsys.readouterr().err


def test_inspect(make_model, capsys):
    path = make_model("deepseek-v3", "q4_k_m")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("architecture:    deepseek2", "experts:         16, top-4", "Q4_K", "routed_experts",
                 "shared_expert", "weight bytes read per generated token"):
        assert text in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_per_token"] < sum(info["bytes_by_class"].values())


def test_map_and_topology(make_model, tmp_path, capsys):
    out = tmp_path / "m.yaml"
    assert main(["map", "-m", str(make_model("qwen2moe")), "--nodes", "3", "--strategy", "round-robin",
                 "-o", str(out)]) == 0
    m = yaml.safe_load(out.read_text())
    assert m["nodes"] == [0, 1, 2] and m["experts"][1] == "1,4,7" and m["model"]["arch"] == "qwen2moe"
    assert main(["topology", "--numa-nodes", "2"]) == 0
    assert "node 1:" in capsys.readouterr().out


def test_make_test_model(tmp_path, capsys):
    assert main(["make-test-model", str(tmp_path / "t.gguf"), "--preset", "qwen2moe", "--type", "q6_k"]) == 0
    assert (tmp_path / "t.gguf").exists()


def test_errors_are_reported_not_raised(make_model, tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [0]\nexperts: {0: 0-5}\n")
    assert main(["generate", "-m", str(make_model("qwen3moe", "q8_0")), "-p", "x",
                 "--numa-expert-map", str(bad)]) == 2
    assert "experts: expert(s) 6-7 missing" in capsys.readouterr().err


def test_pass_through_subcommands_take_flags(capsys):
    assert main(["check-placement", "--preset", "qwen2moe", "--type", "q8_0", "--numa-nodes", "2"]) == 0
    assert "routed_experts" in capsys.readouterr().out


def test_every_command_has_its_flags_in_the_one_parser(capsys):
    """The parser is assembled from the modules' add_arguments: each subcommand's --help
    lists that module's own flags (no pass-through argument lists)."""
    import pytest
    from moe_numa.cli import COMMANDS
    flags = {"generate": "--n-predict", "inspect": "--json", "make-test-model": "--preset",
             "topology": "--numa-nodes", "map": "--strategy", "check-placement": "--compare-reference",
             "bench-kernels": "--gemv-mib", "bench": "--noise-threshold", "make-bench-model": "--force"}
    assert {c.name for c in COMMANDS} >= set(flags)
    for name, flag in flags.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0 and flag in capsys.readouterr().out, name
    with pytest.raises(SystemExit):
        main(["bench-kernels", "--no-such-flag"])


def test_inspect_counts_nextn_layers_apart(make_model, capsys):
    """GLM-4.5's NextN layer is stored but never run: it is its own class and not read per token."""
    from moe_numa.gguf_file import GGUFModelFile
    from moe_numa.model_info import model_info
    from moe_numa.models import load_model
    gguf = GGUFModelFile(make_model("glm4moe", "q8_0"))
    _, cfg, _ = load_model(gguf)
    info = model_info(gguf, cfg)
    nextn = sum(t.nbytes for t in gguf if t.name.startswith(f"blk.{cfg.n_layer}."))
    assert nextn > 0 and info.bytes_by_class["nextn"] == nextn
    others = sum(b for c, b in info.bytes_by_class.items() if c not in ("nextn", "embeddings", "routed_experts"))
    assert info.bytes_per_token < others + info.bytes_by_class["routed_experts"]
    assert main(["inspect", str(gguf.path)]) == 0 and "nextn" in capsys.readouterr().out


def test_inspect_shows_the_type_mix(make_model, tmp_path, capsys):
    """Tensor count and bytes per type, overall and per class, add up to the file's tensors;
    a type only the reference runs is marked."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, quants

    from moe_numa.gguf_file import GGUFModelFile
    from gguf_edit import rewrite_gguf

    src = make_model("deepseek-v3", "q4_k_m")
    w = GGUFModelFile(src).tensor("blk.1.attn_q_b.weight").dequantize()
    path = rewrite_gguf(src, tmp_path / "mix.gguf",
                        replace_tensors={"blk.1.attn_q_b.weight": (quants.quantize(w, Q.Q5_1), Q.Q5_1)})
    g = GGUFModelFile(path)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    mix = info["type_mix"]
    assert set(mix) == {t.qtype.name for t in g} >= {"Q4_K", "Q6_K", "F32", "Q5_1"}
    for q, v in mix.items():
        assert v["tensors"] == sum(t.qtype.name == q for t in g)
        assert v["bytes"] == sum(t.nbytes for t in g if t.qtype.name == q)
    assert list(mix) == sorted(mix, key=lambda q: -mix[q]["bytes"])
    for c, b in info["bytes_by_class"].items():
        assert sum(v["bytes"] for v in info["type_mix_by_class"][c].values()) == b
    assert info["type_mix_by_class"]["attention"]["Q5_1"] == {"tensors": 1, "bytes": int(np.prod(w.shape) // 32 * 24)}
    from moe_numa import kernels
    assert info["engine_unsupported"] == sorted(q for q in mix if not kernels.is_supported(q))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "type mix:" in out and "routed_experts" in out and "Q4_K x" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("Q5_1"))
    assert line.split()[1] == "1"
    assert ("reference backend only" in line) == ("Q5_1" in info["engine_unsupported"])
