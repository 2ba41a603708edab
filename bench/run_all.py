"""Run every ``bench/bench_*.py`` in turn with this interpreter; exit non-zero if one fails.

``make bench`` calls this. Arguments after the script name are not forwarded: each benchmark
runs with its defaults (see bench/README.md for their own options).

    .venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if not scripts:
        print(f"no bench_*.py in {HERE}", file=sys.stderr)
        return 1
    failed: list[str] = []
    for script in scripts:
        print(f"=== {script.name}", flush=True)
        started = time.perf_counter()
        code = subprocess.run([sys.executable, str(script)], check=False).returncode
        seconds = time.perf_counter() - started
        if code != 0:
            failed.append(script.name)
            print(f"=== {script.name} FAILED (exit {code}) after {seconds:.0f} s\n", flush=True)
        else:
            print(f"=== {script.name} done in {seconds:.0f} s\n", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(scripts)} benchmark(s) ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
