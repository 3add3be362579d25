"""(d) `fedspec simulate`: wall time and peak memory of the whole process tree (driver, Ray, its workers).

A simulation worker process caches the base model (with its adapter structure) and the tokenized data once
and runs every virtual client sampled onto it (client/runtime.py), so memory follows the number of worker
processes (cores / federation.client_cpus), not the number of clients. The full run also measures the same
federation with 10 and with 40 clients to show it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from common import Row, seconds, yes_no
from proctree import measure

FEDSPEC = str(Path(sys.executable).with_name("fedspec"))


def simulate(clients: int, rounds: int, *overrides: str) -> tuple[float, float]:
    """(wall seconds, peak GiB of the process tree) of one `fedspec simulate` run in a scratch folder."""
    out = Path(tempfile.mkdtemp(prefix="fedspec-bench-"))  # the run folder goes under out/, the log beside it
    try:
        command = [FEDSPEC, "simulate", "--clients", str(clients), "--rounds", str(rounds), "--name", "bench",
                   f"run.output_dir={out}", "run.progress=false", *overrides]
        with open(out / "simulate.log", "w") as log:
            code, wall, peak = measure(command, output=log)
        if code != 0:
            tail = (out / "simulate.log").read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(command)} exited with {code}: {' / '.join(tail)}")
        return wall, peak / 2**30
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(quick: bool) -> list[Row]:
    # --quick keeps the whole table under 5 minutes on 2 cores: the same federation on the tiny model.
    model = ["model=tiny-bert"] if quick else []
    wall, peak = simulate(20, 3, *model)
    what = "tiny-bert" if quick else "MiniLM"
    rows = [Row("(d) simulate", f"`fedspec simulate --clients 20 --rounds 3{' model=tiny-bert' if quick else ''}` "
                f"({what}, PiSSA r=8, FedSVD, DP-SGD; 10 clients × 8 steps per round; 2 worker processes)",
                f"{seconds(wall)}, peak {peak:.2f} GiB", "—", "—", "whole process tree (proctree.py)", "report", "—")]
    if not quick:
        small = simulate(10, 2, "model=tiny-bert")
        large = simulate(40, 2, "model=tiny-bert")
        growth = large[1] / small[1]
        rows.append(Row("(d) simulate", "memory vs clients: tiny-bert, 2 rounds, 10 vs 40 clients",
                        f"40 clients: {seconds(large[0])}, peak {large[1]:.2f} GiB",
                        f"10 clients: {seconds(small[0])}, peak {small[1]:.2f} GiB", f"{growth:.2f}× the memory",
                        "base model loaded once per worker process", "no growth with clients (≤ 1.15×)",
                        yes_no(growth <= 1.15)))
    return rows
