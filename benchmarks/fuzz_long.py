"""The fuzz suite's long profile: tests/test_fuzz.py with 10x the examples and random seeds.

    python3 benchmarks/fuzz_long.py            # every property, ~10x the CI examples
    python3 benchmarks/fuzz_long.py -k hostile # one property

Each property's example count and wall time are printed (Hypothesis statistics); a failure
prints the falsifying example, which `pytest tests/test_fuzz.py` then replays if it is pasted
as an ``@example``. The CI profile of the same file is derandomised and runs in well under a
minute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_fuzz.py"), "--hypothesis-profile=fuzz-long",
           "--hypothesis-show-statistics", "-W", "ignore::DeprecationWarning", *argv]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
