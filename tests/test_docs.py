"""docs/DEVELOPING.md's module map names every source file of the tree, and nothing
that is gone."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("moe_numa", "cython_kernels", "bench")
SUFFIXES = (".py", ".pyx", ".pxi", ".c", ".h", ".cpp", ".json", ".jinja", ".txt")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *DIRS], capture_output=True, text=True)
    if out.returncode:     # not a git checkout (an sdist): walk the tree
        return [p.relative_to(ROOT) for d in DIRS for p in (ROOT / d).rglob("*") if p.is_file()]
    return [Path(line) for line in out.stdout.splitlines()]


def test_module_map_matches_the_tree():
    text = (ROOT / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    section = text[text.index("## Module map"):text.index("## Conventions")]
    block = section[section.index("```"):section.rindex("```")]
    named = set(re.findall(r"[\w.-]+\.(?:py|pyx|pxi|c|h|cpp|json|jinja|txt)\b", block)) - {"llama.cpp"}
    files = [p for p in _tracked() if p.suffix in SUFFIXES and "__pycache__" not in p.parts
             and p.name != "__init__.py" or p == Path("moe_numa/__init__.py")]
    missing = sorted(str(p) for p in files if p.name not in named)
    assert not missing, f"not in the module map of docs/DEVELOPING.md: {missing}"
    names = {p.name for p in files}
    gone = sorted(n for n in named if n not in names and n not in ("setup.py", "pyproject.toml"))
    assert not gone, f"in the module map but not in the tree: {gone}"
