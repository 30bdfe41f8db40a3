"""GGUF files made the way published releases are made, cached.

A tiny random Hugging Face model per architecture (``transformers``' own model classes,
saved with ``save_pretrained`` next to a truncated real tokenizer), converted by
llama.cpp's ``convert_hf_to_gguf.py`` (run with its own ``gguf-py``), then quantized by
``llama-quantize``, with an importance matrix from ``llama-imatrix`` for the IQ types,
and split by ``llama-gguf-split``. The files hold whatever those tools write: the
converter's tensor layouts (Qwen2-MoE's 2-D ``ffn_gate_inp_shexp``, DeepSeek's split
``attn_k_b``/``attn_v_b``) and llama-quantize's per-tensor type mixes and fallbacks.

Needs ``torch`` (``pip install torch==2.13.0``, the CPU wheel), ``transformers`` and
a llama.cpp build (:func:`moe_numa.bench.llama_cpp.find_or_build`); :func:`available`
says whether they are there. Everything lands under ``$MOE_NUMA_CACHE/hf_models``
(default ``~/.cache/moe_numa``), keyed by a hash of the recipe, built once under a lock::

    path = gguf_file("deepseek-v3", "Q4_K_M")      # converter F32 -> llama-quantize
    path = gguf_file("qwen2moe", "bf16")           # the converter's own BF16 file
    first = split_file("qwen3moe", "Q4_K_M")       # ...-00001-of-0000N.gguf

Dimensions: hidden 256 and expert FFN 256, so the 256-wide K/IQ blocks apply to the
expert tensors, while DeepSeek's ``attn_k_b`` (rows of qk_nope = 64) falls back as in
real DeepSeek files (Q4_K_M -> Q5_0, IQ types -> IQ4_NL ...).

Two deliberate additions to the converter run, both because llama.cpp needs what the
converter leaves out for models this small: the tokenizer's pre-tokenizer name is given
(the converter recognises tokenizers by the hash of a test encoding, which a truncated
vocabulary changes; the splitting regex is the real one), and a V2-Lite style model
gets ``deepseek2.attention.q_lora_rank = 0`` (llama.cpp only infers "no q LoRA" from
the layer counts of the real V2-Lite).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoeNumaError

#: bump when a recipe changes in a way the hash of its fields does not see
RECIPE_VERSION = 1

#: the converter's own output types
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: llama-quantize file types of the issue-10 matrix
QUANTIZE_TYPES = ("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                  "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S",
                  "IQ1_M")
#: quantized with an importance matrix (llama-quantize refuses IQ1/IQ2 without one; releases use
#: one for every IQ type)
IMATRIX_TYPES = tuple(q for q in QUANTIZE_TYPES if q.startswith("IQ"))



def text_path() -> Path:
    """bench/data/tokenizer_text.txt, the text the importance matrix and the tests' prompts come from."""
    import moe_numa.bench
    return Path(moe_numa.bench.__file__).resolve().parent / "data" / "tokenizer_text.txt"


@dataclass(frozen=True)
class HFRecipe:
    """One architecture's tiny HF model: the transformers config and the vocabulary."""
    arch: str                       # our name (test preset name)
    gguf_arch: str                  # what the converter writes as general.architecture
    hf_class: str                   # transformers model class
    vocab: str                      # "qwen3", "qwen2" or "deepseek-v3"
    config: dict = field(default_factory=dict)
    extra_config: dict = field(default_factory=dict)   # keys the config class drops but the converter reads
    n_tokens: int = 6000            # regular BPE tokens kept
    pre: str = ""                   # tokenizer.ggml.pre (default: the vocabulary's own)
    extra_tokens: tuple = ()        # added special tokens the converter looks up by name

    def key(self) -> str:
        blob = json.dumps([RECIPE_VERSION, self.arch, self.hf_class, self.vocab, self.config,
                           self.extra_config, self.n_tokens, self.pre, list(self.extra_tokens)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_COMMON = dict(hidden_size=256, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)

RECIPES: dict[str, HFRecipe] = {
    "qwen2moe": HFRecipe(
        "qwen2moe", "qwen2moe", "Qwen2MoeForCausalLM", "qwen2",
        dict(_COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
             moe_intermediate_size=256, shared_expert_intermediate_size=512, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
             qkv_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3moe": HFRecipe(
        "qwen3moe", "qwen3moe", "Qwen3MoeForCausalLM", "qwen3",
        dict(_COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             intermediate_size=512, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # DeepSeek-V2-Lite style: no q LoRA, softmax gating, two shared experts, one dense layer
    "deepseek-v2-lite": HFRecipe(
        "deepseek-v2-lite", "deepseek2", "DeepseekV2ForCausalLM", "deepseek-v3",
        dict(_COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
             moe_intermediate_size=256, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
             first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64, n_group=1, topk_group=1, topk_method="greedy",
             norm_topk_prob=False, routed_scaling_factor=1.0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # DeepSeek-V3 style: q LoRA, sigmoid gating with groups and the score-correction bias
    "deepseek-v3": HFRecipe(
        "deepseek-v3", "deepseek2", "DeepseekV3ForCausalLM", "deepseek-v3",
        dict(_COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512,
             moe_intermediate_size=256, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
             first_k_dense_replace=1, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64,
             qk_rope_head_dim=32, v_head_dim=64, n_group=4, topk_group=2, norm_topk_prob=True,
             routed_scaling_factor=2.5, rope_interleave=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        extra_config={"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
    # GLM-4.5 style: sigmoid gating with the score bias, partial RoPE, q/k norms, qkv bias, a dense layer
    "glm4moe": HFRecipe(
        "glm4moe", "glm4moe", "Glm4MoeForCausalLM", "qwen3",
        dict(_COMMON, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             intermediate_size=512, moe_intermediate_size=256, n_routed_experts=16, n_shared_experts=1,
             num_experts_per_tok=4, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
             routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
        pre="glm4", extra_tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")),
}

ARCHS = tuple(RECIPES)


class HFModelError(MoeNumaError):
    """A step of the HF -> GGUF pipeline failed; the message names the step."""


# ----------------------------------------------------------------------------- environment

def cache_root() -> Path:
    return Path(os.environ.get("MOE_NUMA_CACHE") or Path.home() / ".cache" / "moe_numa") / "hf_models"


def missing() -> str | None:
    """Why the pipeline cannot run here (a missing package or llama.cpp build), or None."""
    for mod in ("torch", "transformers", "safetensors"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod!r} is not installed (pip install torch==2.13.0 transformers)"
    try:
        _build(allow_build=False)
    except Exception as e:
        return f"no llama.cpp build with llama-imatrix and llama-gguf-split: {e}"
    return None


def available() -> bool:
    return missing() is None


def _build(allow_build: bool = True):
    from moe_numa.bench import llama_cpp as lc
    return lc.find_or_build(allow_build=allow_build, log=lambda *a: None,
                            extra_targets=("llama-imatrix", "llama-gguf-split"))


@contextlib.contextmanager
def _lock(name: str):
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd, what: str, env=None, cwd=None) -> str:
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace", env=env, cwd=cwd)
    if p.returncode != 0:
        raise HFModelError(f"{what} failed (exit {p.returncode}):\n" + "\n".join(p.stdout.splitlines()[-30:]))
    return p.stdout


# ----------------------------------------------------------------------------- the HF model

def _tokenizer_files(recipe: HFRecipe, out: Path):
    """Write tokenizer.json / tokenizer_config.json of the truncated real vocabulary; (size, VocabSpec)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moe_numa.tokenizer import SUPPORTED_PRE_TOKENIZERS, pre_tokenizer_regexes
    from .vocab import TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, deepseek_v3_vocab, qwen2_vocab

    spec = (deepseek_v3_vocab(recipe.n_tokens) if recipe.vocab == "deepseek-v3"
            else qwen2_vocab(recipe.n_tokens, flavor=recipe.vocab))
    vocab = {t: i for i, t in enumerate(spec.tokens)}
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated")
              for rx in pre_tokenizer_regexes(SUPPORTED_PRE_TOKENIZERS[recipe.pre or spec.pre])]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=ty == TOKEN_TYPE_CONTROL, normalized=False)
             for t, ty in zip(spec.tokens, spec.token_types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
    for t in recipe.extra_tokens:
        spec.tokens.append(t)
        spec.token_types.append(TOKEN_TYPE_CONTROL)
        added.append(AddedToken(t, special=True, normalized=False))
    tok.add_tokens(added)
    name = lambda i: None if i is None else spec.tokens[i]  # noqa: E731
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name(spec.bos_id), eos_token=name(spec.eos_id),
                                   pad_token=name(spec.pad_id))
    fast.chat_template = spec.chat_template
    fast.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=spec.add_bos, add_eos_token=spec.add_eos)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    if len(fast) != spec.n_vocab:
        raise HFModelError(f"{recipe.arch}: the HF tokenizer has {len(fast)} tokens, the vocabulary {spec.n_vocab}")
    return spec.n_vocab, spec


def _init_weights(model, seed: int) -> None:
    """Random weights at scales that give lively logits and routing (HF's 0.02 init gives
    near-ties everywhere): fan-in scaled matrices, norms near 1, small biases."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            if t.ndim == 1 and "norm" in name:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:                              # biases, e_score_correction_bias
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t.shape[-1]
                gain = 1.0
                if "embed_tokens" in name:
                    gain = fan_in ** 0.5
                elif "lm_head" in name:
                    gain = 4.0
                elif name.endswith("mlp.gate.weight"):
                    gain = 2.0
                t.copy_(torch.randn(t.shape, generator=g) * (gain / fan_in ** 0.5))


def hf_model_dir(arch: str, seed: int = 0) -> Path:
    """The saved HF model directory (config.json, model.safetensors, tokenizer files)."""
    recipe = _recipe(arch)
    out = cache_root() / "hf" / f"{arch}-s{seed}-{recipe.key()}"
    if (out / "config.json").is_file():
        return out
    with _lock("hf"):
        if (out / "config.json").is_file():
            return out
        import torch
        import transformers
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            n_vocab, spec = _tokenizer_files(recipe, tmp)
            cfg_cls = getattr(transformers, recipe.hf_class.replace("ForCausalLM", "Config"))
            cfg = cfg_cls(vocab_size=n_vocab, bos_token_id=spec.bos_id, eos_token_id=spec.eos_id,
                          pad_token_id=spec.pad_id, architectures=[recipe.hf_class], **recipe.config)
            torch.manual_seed(seed)
            model = getattr(transformers, recipe.hf_class)(cfg).to(torch.float32)
            _init_weights(model, seed)
            model.save_pretrained(str(tmp), safe_serialization=True)
            if recipe.extra_config:
                p = tmp / "config.json"
                c = json.loads(p.read_text())
                c.update(recipe.extra_config)
                p.write_text(json.dumps(c, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _recipe(arch: str) -> HFRecipe:
    if arch not in RECIPES:
        raise KeyError(f"no HF recipe for {arch!r}; have {', '.join(RECIPES)}")
    return RECIPES[arch]


# ----------------------------------------------------------------------------- conversion

# Runs convert_hf_to_gguf.py with its own gguf-py, naming the pre-tokenizer (see the module doc).
_DRIVER = r"""
import runpy, sys
src, pre, q_lora_zero = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.path[0:0] = [src + "/gguf-py", src]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
if q_lora_zero:
    import conversion.deepseek as ds
    orig = ds.DeepseekV2Model.set_gguf_parameters
    def set_gguf_parameters(self):
        orig(self)
        if self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)
    ds.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _gguf_dir(arch: str, seed: int) -> Path:
    from moe_numa.bench import llama_cpp as lc
    return cache_root() / "gguf" / f"{arch}-s{seed}-{_recipe(arch).key()}-{lc.TAG}"


def _atomic(path: Path, make) -> Path:
    """Make `path` once (under a lock, through a temporary name)."""
    if path.is_file():
        return path
    with _lock("gguf"):
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            make(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def converted(arch: str, outtype: str = "f32", seed: int = 0) -> Path:
    """convert_hf_to_gguf.py's file of the HF model, `--outtype outtype` (f32/f16/bf16/q8_0)."""
    outtype = outtype.lower()
    if outtype not in CONVERTER_TYPES:
        raise KeyError(f"convert_hf_to_gguf.py writes {', '.join(CONVERTER_TYPES)}, not {outtype!r}")
    recipe = _recipe(arch)
    out = _gguf_dir(arch, seed) / f"{arch}-{outtype}.gguf"
    if out.is_file():
        return out
    hf = hf_model_dir(arch, seed)
    build = _build()
    src = build.source_dir

    def make(tmp: Path):
        pre = recipe.pre or ("deepseek-v3" if recipe.vocab == "deepseek-v3" else "qwen2")
        q_lora_zero = "1" if recipe.gguf_arch == "deepseek2" and recipe.config.get("q_lora_rank") is None else "0"
        env = dict(os.environ, NO_LOCAL_GGUF="1")      # the driver puts the tree's gguf-py first itself
        _run([sys.executable, "-c", _DRIVER, src, pre, q_lora_zero, hf, "--outtype", outtype,
              "--outfile", tmp], f"convert_hf_to_gguf.py {arch} --outtype {outtype}", env=env)

    return _atomic(out, make)


def imatrix(arch: str, seed: int = 0) -> Path:
    """llama-imatrix over bench/data/tokenizer_text.txt on the F32 file."""
    out = _gguf_dir(arch, seed) / f"{arch}-imatrix.gguf"
    if out.is_file():
        return out
    f32 = converted(arch, "f32", seed)
    build = _build()

    def make(tmp: Path):
        _run([build.path("llama-imatrix"), "-m", f32, "-f", text_path(), "-o", tmp, "-c", "128", "-t", "2",
              "--no-ppl", "-ngl", "0"], f"llama-imatrix {arch}")

    return _atomic(out, make)


def quantized(arch: str, qtype: str, seed: int = 0) -> Path:
    """llama-quantize's `qtype` file (Q4_K_M, IQ2_XXS, ...) from the converter's F32 file."""
    qtype = qtype.upper()
    if qtype not in QUANTIZE_TYPES:
        raise KeyError(f"{qtype!r} is not one of {', '.join(QUANTIZE_TYPES)}")
    out = _gguf_dir(arch, seed) / f"{arch}-{qtype}.gguf"
    if out.is_file():
        return out
    f32 = converted(arch, "f32", seed)
    imat = imatrix(arch, seed) if qtype in IMATRIX_TYPES else None
    build = _build()

    def make(tmp: Path):
        cmd = [build.path("llama-quantize")] + (["--imatrix", imat] if imat else []) + [f32, tmp, qtype, "2"]
        _run(cmd, f"llama-quantize {arch} {qtype}")

    return _atomic(out, make)


def gguf_file(arch: str, qtype: str, seed: int = 0) -> Path:
    """A converter type (lower case: f32, f16, bf16, q8_0) or a llama-quantize type (upper: Q4_K_M ...)."""
    if qtype in CONVERTER_TYPES:
        return converted(arch, qtype, seed)
    return quantized(arch, qtype, seed)


def split_file(arch: str, qtype: str = "Q4_K_M", seed: int = 0, max_tensors: int = 16) -> Path:
    """`llama-gguf-split --split-max-tensors` of a quantized file; the path of part 1."""
    src = gguf_file(arch, qtype, seed)
    d = _gguf_dir(arch, seed) / f"split-{qtype}-{max_tensors}"
    done = d / "done"
    if not done.is_file():
        with _lock("gguf"):
            if not done.is_file():
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                build = _build()
                _run([build.path("llama-gguf-split"), "--split", "--split-max-tensors", str(max_tensors), src,
                      d / arch], f"llama-gguf-split {arch} {qtype}")
                done.write_text("")
    parts = sorted(d.glob(f"{arch}-00001-of-*.gguf"))
    if not parts:
        raise HFModelError(f"llama-gguf-split wrote no {arch}-00001-of-*.gguf in {d}")
    return parts[0]
