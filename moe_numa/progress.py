"""Progress bars (tqdm) behind the `(done, total)` callbacks that loading and
model writing report to."""
from __future__ import annotations

from typing import Callable


def progress_bar(desc: str, unit: str = "it", **tqdm_kwargs) -> Callable[[int, int], None]:
    """A `(done, total)` callback drawing a tqdm bar on stderr, closed when done == total.
    `unit="B"` shows bytes scaled to KiB/MiB/GiB."""
    from tqdm import tqdm
    if unit == "B":
        tqdm_kwargs = {"unit_scale": True, "unit_divisor": 1024, **tqdm_kwargs}
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return report
