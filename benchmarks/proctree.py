"""Run a command and report its wall time and the peak memory of its whole process tree.

Ray starts worker processes outside the command's direct children (a raylet, workers, a GCS server), so
`/usr/bin/time` under-counts: this samples the RSS of every process started after the command that
descends from it or from the Ray processes it spawned, every 0.2 s, and reports the peak of the sum.

    python benchmarks/proctree.py -- fedspec simulate --clients 20
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(command: list[str], interval: float = 0.2, *, output=None) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak tree RSS in bytes); `output` (a file) takes the command's stdout and
    stderr, which otherwise go to this process's."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=output, stderr=output)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(interval)
    return child.returncode, time.monotonic() - started, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    code, seconds, peak = measure(command)
    print(f"exit code {code}; wall {seconds:.1f} s; peak memory of the process tree {peak / 2**30:.2f} GiB",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
