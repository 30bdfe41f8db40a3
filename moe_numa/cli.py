"""The `moe-numa` command, assembled from `COMMANDS`: each names the module whose
`add_arguments(subparser)` declares a subcommand's flags and whose `run(args)` runs it
(a new subcommand is one line there). Flag names follow llama.cpp's where one exists."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass

from .errors import MoeNumaError


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model (`model_options` reads them)."""
    p.add_argument("--backend", choices=("engine", "reference"), default=None,
                   help="engine (the NUMA engine) or reference (the numpy oracle)")
    p.add_argument("--numa-expert-map", metavar="FILE",
                   help="YAML expert map (see docs/expert-maps.md), or a strategy: contiguous, round-robin, split")
    p.add_argument("--replica-budget", metavar="B",
                   help="memory for expert replicas, placed by the map or the rebalancer: a fraction of the "
                        "expert bytes (0.05 or 5%%) or a size (2GiB); default: what the map places")
    p.add_argument("--numa-nodes", type=int, metavar="N",
                   help="split the CPUs into N virtual nodes (default: the machine's real nodes)")
    p.add_argument("--threads-per-node", "-t", type=int, metavar="T", help="threads per node (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default 4096)")
    p.add_argument("--weights-cache", metavar="DIR",
                   help="engine: keep each node's placed weights in DIR (a tmpfs such as /dev/shm), one file per "
                        "node; a restart maps them instead of copying the model again (rebuilt when stale)")
    p.add_argument("--mmap", action="store_true",
                   help="engine, one node: map the GGUF's plain tensor ranges copy-on-write and never copy them "
                        "(as llama.cpp's mmap): the least memory traffic, but decode reads 4 KiB pages, slower. "
                        "By default a one-node load of a large file maps it, returns, and copies it into "
                        "hugepage memory behind the first tokens")
    p.add_argument("--no-mmap", action="store_true",
                   help="engine: copy the weights into node memory before the model is ready (the default on "
                        "several nodes, and for files under 512 MiB)")
    p.add_argument("--check-tensors", action="store_true",
                   help="check every block while loading (Inf/NaN scales), naming the first bad one")
    for short, long, what in (("-ctk", "--cache-type-k", "keys"), ("-ctv", "--cache-type-v", "values")):
        p.add_argument(short, long, choices=("f32", "f16", "q8_0"), default=None, type=str.lower,
                       help=f"KV-cache type of the {what}, as llama.cpp's (default f16; the reference: f32; "
                            "MLA's latent cache takes -ctk for both)")


def model_options(args) -> dict:
    opts = {}
    if args.ctx_size:
        opts["n_ctx"] = args.ctx_size
    if args.check_tensors:
        opts["check_tensors"] = True
    for name in ("cache_type_k", "cache_type_v"):
        if getattr(args, name, None):
            opts[name] = getattr(args, name)
    from .api import DEFAULT_BACKEND
    backend = args.backend or DEFAULT_BACKEND
    if backend == "engine":
        opts["progress"] = True          # placing a large model takes a while: show it on stderr
        if args.numa_expert_map:
            opts["expert_map"] = args.numa_expert_map
        if args.numa_nodes:
            opts["numa_nodes"] = args.numa_nodes
        if args.threads_per_node:
            opts["threads_per_node"] = args.threads_per_node
        if args.replica_budget is not None:
            opts["replica_budget"] = args.replica_budget
        if args.weights_cache:
            opts["weights_cache"] = args.weights_cache
        if args.mmap and args.no_mmap:
            raise SystemExit("--mmap and --no-mmap contradict each other")
        if args.mmap:
            opts["zero_copy"] = True
        elif args.no_mmap:
            opts["zero_copy"] = False
    elif (args.numa_expert_map or args.numa_nodes or args.threads_per_node or args.replica_budget is not None
          or args.weights_cache or args.mmap or args.no_mmap):
        raise SystemExit("--numa-expert-map, --numa-nodes, --threads-per-node, --replica-budget, "
                         "--weights-cache, --mmap and --no-mmap need --backend engine")
    return {"backend": backend, **opts}


# ---------------------------------------------------------------- the commands defined here

def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("-m", "--model", help="GGUF file (default: the embedded small model)")
    g.add_argument("-p", "--prompt", help="prompt text")
    g.add_argument("-f", "--file", help="read the prompt from a file")
    g.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    g.add_argument("--temp", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("-s", "--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt with the model's chat template")
    add_engine_flags(g)


def run_generate(args) -> int:
    from . import load
    from .default_model import default_model_path
    path = args.model or str(default_model_path())
    model = load(path, **model_options(args))
    prompt = args.prompt
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompt = f.read()
    if prompt is None:
        prompt = "Hello! Tell me about NUMA."
    if args.chat:
        if not model.chat_template:
            raise SystemExit(f"{path} has no tokenizer.chat_template; drop --chat")
        prompt = [{"role": "user", "content": prompt}]
    stream = model.generate(prompt, max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                            repeat_last_n=args.repeat_last_n, seed=args.seed, stop=args.stop or (), stream=True)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = model.last_stats
    print(f"[{model.backend.name}] prompt {s.prompt_tokens} tokens at {s.prompt_tps:.1f} tok/s; "
          f"generated {s.generated_tokens} tokens at {s.decode_tps:.1f} tok/s; finish: {s.finish_reason}",
          file=sys.stderr)
    model.close()
    return 0


def add_inspect_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("model")
    i.add_argument("--json", action="store_true")


def run_inspect(args) -> int:
    from .gguf_file import GGUFModelFile, check_supported_types
    from .model_info import format_info, model_info
    from .models import load_model
    gguf = GGUFModelFile(args.model)
    check_supported_types(gguf, "reference")    # shows any file we can read; types the engine lacks are marked
    _, cfg, _ = load_model(gguf)
    info = model_info(gguf, cfg)
    if args.json:
        print(json.dumps(info.__dict__, indent=2))
    else:
        print(format_info(info, args.model))
    return 0


def add_make_test_model_arguments(t: argparse.ArgumentParser) -> None:
    from .testing import PRESETS, QTYPES
    t.add_argument("output")
    t.add_argument("--preset", default="qwen3moe", choices=sorted(PRESETS))
    t.add_argument("--type", default="f32", choices=sorted(QTYPES))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split", type=int, default=0, metavar="N", help="split into files of N tensors")


def run_make_test_model(args) -> int:
    from .testing import make_test_model
    path = make_test_model(args.output, args.preset, args.type, seed=args.seed, split_max_tensors=args.split)
    print(path)
    return 0


def add_topology_arguments(tp: argparse.ArgumentParser) -> None:
    tp.add_argument("--numa-nodes", type=int, help="show N virtual nodes instead")


def run_topology(args) -> int:
    from .numa.topology import topology
    print(topology(args.numa_nodes).describe())
    return 0


def add_map_arguments(mp: argparse.ArgumentParser) -> None:
    mp.add_argument("-m", "--model", required=True)
    mp.add_argument("--nodes", type=int, required=True)
    mp.add_argument("--strategy", choices=("contiguous", "round-robin", "whole", "split", "hybrid"), default=None,
                    help="whole/split/hybrid minimise the projected per-token critical path of --profile; "
                         "default: hybrid with a profile, split (every expert over all nodes) without")
    mp.add_argument("--profile", metavar="JSON", help="routing profile from `moe-numa profile`")
    mp.add_argument("--replica-budget", metavar="B", help="memory for replicas (hybrid): 0.05, 5%%, 2GiB")
    mp.add_argument("-o", "--output", help="file to write (default: stdout)")


def run_map(args) -> int:
    from .engine.plan import expert_blocks
    from .gguf_file import GGUFModelFile
    from .models import load_model
    from .numa.expert_map import make_map
    from .numa.profile import Profile, make_profile_map
    gguf = GGUFModelFile(args.model)
    _, cfg, w = load_model(gguf)
    meta = {"name": cfg.name, "arch": cfg.arch, "n_layer": cfg.n_layer}
    if args.strategy in ("contiguous", "round-robin") and not args.profile:
        emap, proj = make_map(cfg.n_expert, args.nodes, args.strategy, model=meta), {}
    else:
        strategy = args.strategy or ("hybrid" if args.profile else "split")
        if strategy not in ("whole", "split", "hybrid"):
            raise SystemExit(f"--strategy {strategy} does not take a profile (whole, split or hybrid do)")
        moe = [i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)]
        slots = 0
        if args.replica_budget:
            from .engine.backend import parse_budget
            exps = sum(t.nbytes for t in gguf if "_exps" in t.name)
            copy = exps // max(1, len(moe) * cfg.n_expert)
            slots = parse_budget(args.replica_budget, exps) // max(1, copy)
        profile = Profile.load(args.profile) if args.profile else None
        emap, proj = make_profile_map(profile, cfg.n_expert, args.nodes, moe, expert_blocks(w), strategy, slots,
                                      model=meta)
    text = emap.dump()
    if proj:
        base, chosen = proj["mean"]
        text += (f"# projected per-token critical path (busiest node's work, whole experts): contiguous "
                 f"{base:.3f}, this map {chosen:.3f} ({base / max(chosen, 1e-9):.2f}x)\n")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------- the command table

@dataclass(frozen=True)
class Command:
    """A subcommand: `module.<add>(subparser)` declares its flags, `module.<run>(args)` runs it."""
    name: str
    module: str
    help: str
    add: str = "add_arguments"
    run: str = "run"


COMMANDS = (
    Command("generate", __name__, "generate text from a prompt", "add_generate_arguments", "run_generate"),
    Command("inspect", __name__, "architecture, quant types and bytes by tensor class",
            "add_inspect_arguments", "run_inspect"),
    Command("make-test-model", __name__, "write a small random-weight GGUF model",
            "add_make_test_model_arguments", "run_make_test_model"),
    Command("topology", __name__, "print the NUMA nodes, CPUs and memory detected",
            "add_topology_arguments", "run_topology"),
    Command("map", __name__, "write a YAML expert map for a model", "add_map_arguments", "run_map"),
    Command("profile", "moe_numa.numa.profile", "record routed-token counts and co-selection over prompts"),
    Command("serve", "moe_numa.server", "OpenAI-compatible HTTP server, concurrent requests batched"),
    Command("check-placement", "moe_numa.numa.check", "check where the engine's pages and threads really are"),
    Command("bench-kernels", "moe_numa.bench.kernels", "kernel bandwidth benchmark (bench/kernels.py)"),
    Command("bench-load", "moe_numa.bench.load", "load time: copy, mapped, weights-cache restart, llama.cpp's first token"),
    Command("bench-attention", "moe_numa.bench.attention",
            "attention block time at context depths 0..4096 per KV-cache type (bench/attention.py)"),
    Command("bench", "moe_numa.bench.bench",
            "ours vs llama.cpp's llama-bench, same file and threads (bench/bench.py)"),
    Command("project", "moe_numa.bench.project",
            "projected tok/s on 2-8 sockets per placement mode (bench/project.py)"),
    Command("bench-serve", "moe_numa.bench.serve",
            "server load: ours vs llama.cpp's llama-server, same file, threads and --parallel (bench/serve.py)"),
    Command("make-bench-model", "moe_numa.bench.bench",
            "write the random-weight benchmark models (bench/bench.py)",
            "add_make_bench_model_arguments", "run_make_bench_model"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-numa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        module = importlib.import_module(c.module)
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        getattr(module, c.add)(p)
        p.set_defaults(func=getattr(module, c.run))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MoeNumaError, FileNotFoundError, ValueError) as e:
        print(f"moe-numa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
