"""Start-up time of the command line: wall time of `python -m erasekit ARGS` (a fresh process each run) for
--help, a command's --help and an argument error, with erasekit's source taken from each folder given: the
main checkout (before the heavy imports were deferred) and this tree (after). A measurement, not a test.

Usage: python benchmarks/startup.py --before /work/main/src [--after src] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {"--help": ["--help"], "erase --help": ["erase", "--help"],
         "argument error": ["generate", "--steps", "0", "--out", "x"]}


def wall_times(src: Path, argv: list[str], repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "erasekit", *argv], env=env, capture_output=True, text=True)
        if done.returncode not in (0, 2) or "Traceback" in done.stderr:
            raise SystemExit(f"{src}: erasekit {' '.join(argv)} failed: {done.stderr[-500:]}")
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="a src folder with the old erasekit")
    parser.add_argument("--after", default=str(HERE.parent / "src"), help="a src folder with the new erasekit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(HERE / "results" / "startup.json"))
    args = parser.parse_args()
    rows = {}
    for name, argv in CASES.items():
        before, after = (wall_times(Path(src).resolve(), argv, args.repeats) for src in (args.before, args.after))
        rows[name] = {"before_median_s": round(statistics.median(before), 3), "before_s": before,
                      "after_median_s": round(statistics.median(after), 3), "after_s": after,
                      "ratio": round(statistics.median(before) / statistics.median(after), 1)}
        print(f"{name}: before {rows[name]['before_median_s']} s, after {rows[name]['after_median_s']} s "
              f"(median of {args.repeats}), {rows[name]['ratio']}x")
    Path(args.out).write_text(json.dumps({"repeats": args.repeats, "python": sys.version.split()[0], **rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
