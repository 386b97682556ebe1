"""Run ``dvc repro`` (passing any arguments through) and print how long each stage took.

``make run`` uses this, so every run of the main job ends with one benchmark line such as::

    stage times: prepare 3.1s, train 251.0s, evaluate 58.2s, register 12.4s; total 325.9s
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def main(argv: list[str]) -> int:
    dvc = shutil.which("dvc") or "dvc"
    start = time.monotonic()
    times: dict[str, float] = {}
    current: tuple[str, float] | None = None
    proc = subprocess.Popen(
        [dvc, "repro", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = STAGE_LINE.match(line)
        if m:
            now = time.monotonic()
            if current:
                times[current[0]] = now - current[1]
            current = (m.group(1), now)
    code = proc.wait()
    end = time.monotonic()
    if current:
        times[current[0]] = end - current[1]
    parts = ", ".join(f"{name} {sec:.1f}s" for name, sec in times.items()) or "nothing to run"
    print(f"stage times: {parts}; total {end - start:.1f}s", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
