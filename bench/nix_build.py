#!/usr/bin/env python3
"""Benchmark `mvmctl build --flake` against plain `nix build`, offline (the test harness).

    .venv/bin/python bench/nix_build.py [--runs 5]

1. cold: the seed's hello flake (against the nixpkgs stand-in) with nothing of it in
   /nix/store and an empty mvm image store: `mvmctl build --flake`, then, cold again,
   plain `nix build` of the same image output and of its rootfs derivation alone;
2. cache hit: `mvmctl build --flake` of the unchanged flake (target: <= 1.5 s), next to
   `nix eval` of the output path, which is what a hit costs nix.

Cold means: every path in the flake's build closure is deleted from the store first
(they are not GC roots; nothing else uses them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e import nixfixture  # noqa: E402


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    secs = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return secs, proc.stdout


def forget(installable: str, overrides: list[str], env: dict[str, str]) -> None:
    """Delete the build closure of ``installable`` from the store (a cold start)."""
    drv = subprocess.run(["nix", "eval", "--raw", f"{installable}.drvPath", *overrides], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    paths = subprocess.run(["nix-store", "--query", "--requisites", "--include-outputs", drv], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    valid = [p for p in paths if os.path.exists(p)]
    # a path goes only together with everything that refers to it (e.g. other test images)
    referrers = subprocess.run(["nix-store", "--query", "--referrers-closure", *valid], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
    deleted = subprocess.run(["nix-store", "--delete", "--ignore-liveness", *sorted(set(valid) | set(referrers))],
                             env=env,
                             capture_output=True, text=True)
    if deleted.returncode != 0:
        print("  nix-store --delete:", deleted.stderr.strip().splitlines()[-1:])
    left = [p for p in paths if os.path.exists(p) and not p.endswith(".drv") and "-source" not in p]
    if left:
        print(f"  note: {len(left)} paths are still alive (in use elsewhere), e.g. {left[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from mvm._proc import DEFAULT_RUNNER
    from mvm.images.kernel import ensure_kernel
    from mvm.images.nix import host_system

    system = host_system()
    cache = Path(os.environ.get("MVM_TEST_CACHE", Path.home() / ".cache" / "mvm-tests"))
    kernel = ensure_kernel(cache / "kernels", DEFAULT_RUNNER)
    with tempfile.TemporaryDirectory(prefix="mvm-bench-nix-") as tmp:
        scratch = Path(tmp)
        nixpkgs = nixfixture.write_nixpkgs(scratch / "nixpkgs", kernel.root, kernel.version)
        url = nixfixture.mvm_flake_url(scratch)
        overrides = nixfixture.override_args(url, nixpkgs)
        flake = scratch / "hello"
        flake.mkdir()
        (flake / "flake.nix").write_text(nixfixture.seed_flake(system))
        env = {**os.environ, "NIX_CONFIG": nixfixture.NIX_CONFIG, "MVM_HOME": str(scratch / "mvm"),
               "NO_COLOR": "1"}
        env.pop("MVM_CACHE", None)
        image = f"{flake}#packages.{system}.default"
        mvmctl = [sys.executable, "-m", "mvm"]

        forget(image, overrides, env)
        cold, out = timed([*mvmctl, "build", "--flake", str(flake), *overrides, "--json"], env)
        result = json.loads(out)
        assert result["built"], result

        forget(image, overrides, env)
        nix_cold, _ = timed(["nix", "build", "--no-link", image, *overrides], env)
        forget(image, overrides, env)
        nix_rootfs, _ = timed(["nix", "build", "--no-link", f"{image}.rootfs", *overrides], env)
        nix_build_rest, _ = timed(["nix", "build", "--no-link", image, *overrides], env)

        hits = []
        for _ in range(args.runs):
            secs, out = timed([*mvmctl, "build", "--flake", str(flake), *overrides, "--json"], env)
            assert json.loads(out)["built"] is False
            hits.append(secs)
        evals = [timed(["nix", "eval", "--raw", f"{image}.outPath", *overrides], env)[0] for _ in range(args.runs)]
        py = [timed([sys.executable, "-c", "import mvm.cli.app"], env)[0] for _ in range(args.runs)]

    rootfs_mb = result["sizes"]["rootfs.ext4"] / 2**20
    print(f"seed hello flake on the nixpkgs stand-in ({system}), rootfs {rootfs_mb:.0f} MiB")
    print(f"cold   mvmctl build --flake             {cold:6.2f} s  (nix build + import into the image store)")
    print(f"cold   nix build <image>                {nix_cold:6.2f} s")
    print(f"cold   nix build <image>.rootfs         {nix_rootfs:6.2f} s  (then the rest of the image: "
          f"{nix_build_rest:.2f} s)")
    print(f"hit    mvmctl build --flake  median     {statistics.median(hits):6.2f} s  "
          f"(min {min(hits):.2f}, max {max(hits):.2f}, n={len(hits)}; target <= 1.5 s)")
    print(f"       of which nix eval      median    {statistics.median(evals):6.2f} s")
    print(f"       of which python + mvm import     {statistics.median(py):6.2f} s")


if __name__ == "__main__":
    main()
