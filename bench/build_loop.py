#!/usr/bin/env python3
"""The edit loop: a rebuild after changing one shipped file, and after changing a service
command, next to a cold build of the same spec (package layer not cached, .deb cache and
kernel warm), all in one run.

Target (issue 10): each rebuild ≤ 10 % of the cold build.
Usage: .venv/bin/python bench/build_loop.py [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = """name = "loop"
packages = ["curl"]
files = {{ "/app/page.html" = "page.html" }}

[services.web]
command = "{command}"
"""


def build(spec_dir: Path, env: dict[str, str]) -> float:
    exe = Path(sys.executable).with_name("mvmctl")
    started = time.monotonic()
    subprocess.run([str(exe), "build", str(spec_dir)], env=env, check=True, capture_output=True)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    warm = Path(os.environ.get("MVM_CACHE", Path.home() / ".cache" / "mvm"))
    cold_builds, file_edits, command_edits = [], [], []
    with tempfile.TemporaryDirectory(prefix="mvm-loop-") as tmp:
        work = Path(tmp)
        spec = work / "spec"
        spec.mkdir()
        for run in range(args.runs):
            cache = work / f"cache{run}"
            cache.mkdir()
            for part in ("debs", "kernels"):  # warm: downloaded packages and the kernel
                if (warm / part).exists():
                    shutil.copytree(warm / part, cache / part, symlinks=True)
            env = {**os.environ, "MVM_HOME": str(work / f"home{run}"), "MVM_CACHE": str(cache)}
            (spec / "page.html").write_text(f"<h1>run {run}</h1>\n")
            (spec / "mvm.toml").write_text(SPEC.format(command=f"python3 -m http.server 80{run}0"))
            cold_builds.append(build(spec, env))
            (spec / "page.html").write_text(f"<h1>run {run}, edited</h1>\n")
            file_edits.append(build(spec, env))
            (spec / "mvm.toml").write_text(SPEC.format(command=f"python3 -m http.server 81{run}0"))
            command_edits.append(build(spec, env))
            shutil.rmtree(cache)
    cold = statistics.median(cold_builds)
    results = {"cold": cold_builds, "file_edit": file_edits, "command_edit": command_edits}
    print(f"cold build (package layer not cached, .debs and kernel warm): {cold:.1f} s  (n={args.runs})")
    for label, values in (("after editing a shipped file", file_edits), ("after editing a service command",
                                                                          command_edits)):
        m = statistics.median(values)
        print(f"rebuild {label}: {m:.2f} s = {m / cold * 100:.1f} % of cold (target ≤ 10 %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
