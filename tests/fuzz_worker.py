"""Loads GGUF files one after another (paths on stdin, one a line) and prints,
per file, START i then RESULT i {"outcome": ...}: "ok" (loaded and ran),
"error" (a MoeNumaError), or "foreign" (any other exception, with its type and
message). A crash or hang shows as a START without its RESULT; faulthandler
writes the native stack to stderr. Run by tests/test_fuzz.py."""
import faulthandler
import json
import sys

faulthandler.enable()

import moe_numa  # noqa: E402
from moe_numa.errors import MoeNumaError  # noqa: E402


def load_and_run(path: str) -> None:
    m = moe_numa.load(path, n_ctx=32, numa_nodes=1, threads_per_node=1)
    try:
        n = m.config.n_vocab
        m.logits([1 % n, 2 % n, 3 % n])
        m.generate([1 % n], max_tokens=2, temperature=0.7, seed=0)
    finally:
        m.close()


def main() -> None:
    for i, line in enumerate(sys.stdin):
        print(f"START {i}", flush=True)
        try:
            load_and_run(line.rstrip("\n"))
            res = {"outcome": "ok"}
        except MoeNumaError as e:
            res = {"outcome": "error", "message": str(e)[:300]}
        except BaseException as e:   # noqa: BLE001 - what the fuzz test is looking for
            res = {"outcome": "foreign", "type": type(e).__name__, "message": str(e)[:300]}
        print(f"RESULT {i} {json.dumps(res)}", flush=True)


if __name__ == "__main__":
    main()
