#!/usr/bin/env python3
"""Benchmark the Nix front end offline (the test harness): builds, then boots.

    .venv/bin/python bench/nix_build.py [--runs 5] [--boot-runs 5] [--no-build] [--no-boot]

Builds (next to plain nix):
1. cold: the seed's hello flake (against the nixpkgs stand-in) with nothing of it in
   /nix/store and an empty mvm image store: `mvmctl build --flake`, then, cold again,
   plain `nix build` of the same image output and of its rootfs derivation alone;
2. cache hit: `mvmctl build --flake` of the unchanged flake (target: <= 1.5 s), next to
   `nix eval` of the output path, which is what a hit costs nix.
Cold means: every path in the flake's build closure is deleted from the store first
(they are not GC roots; nothing else uses them).

Boots (interleaved in one run, so drift hits all alike; templates off, every boot cold):
- floor: bare QEMU booting an image's kernel + initrd to a busybox init (bench/run.py's),
  for the Debian image (cloud kernel) and for the Nix image (the stand-in's generic kernel,
  whose ext4 and crc32c the initrd loads from .ko.xz);
- `mvmctl up examples/hello` -> first HTTP 200 (Debian-built hello);
- `mvmctl up --flake <seed hello>` -> first HTTP 200 (Nix-built hello, nixpkgs' shapes:
  PVH vmlinux from the bzImage, checked-hash .pyc), and the same flake against a stand-in
  whose Python has unchecked-hash .pyc, which isolates what checked hashes cost;
- each with the guest's boot timeline (python_ready, init_imported, services_started).
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
sys.path.insert(0, str(ROOT / "bench"))

import run as benchrun  # noqa: E402  (bench/run.py: the floor and the guest timeline)
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
    ap.add_argument("--boot-runs", type=int, default=5)
    ap.add_argument("--no-build", action="store_true", help="skip the build figures")
    ap.add_argument("--no-boot", action="store_true", help="skip the boot figures")
    ap.add_argument("--json", type=Path, default=None, help="also write the boot results here")
    args = ap.parse_args()
    cache = Path(os.environ.get("MVM_TEST_CACHE", Path.home() / ".cache" / "mvm-tests"))
    if not args.no_build:
        builds(cache, args.runs)
    if not args.no_boot:
        boots(cache, args.boot_runs, args.json)


def builds(cache: Path, runs: int) -> None:
    from mvm.builders.nix import host_system

    system = host_system()
    kernel = nixfixture.ensure_standin_kernel(cache)
    with tempfile.TemporaryDirectory(prefix="mvm-bench-nix-") as tmp:
        scratch = Path(tmp)
        nixpkgs = nixfixture.write_nixpkgs(scratch / "nixpkgs", kernel)
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
        for _ in range(runs):
            secs, out = timed([*mvmctl, "build", "--flake", str(flake), *overrides, "--json"], env)
            assert json.loads(out)["built"] is False
            hits.append(secs)
        evals = [timed(["nix", "eval", "--raw", f"{image}.outPath", *overrides], env)[0] for _ in range(runs)]
        py = [timed([sys.executable, "-c", "import mvm.cli.app"], env)[0] for _ in range(runs)]

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


def up_to_first_200(env: dict[str, str], target: list[str]) -> tuple[float, dict[str, float]]:
    """bench/run.py's up -> first 200 of ``target``, with the guest's boot timeline."""
    phases: list[dict[str, float]] = []
    secs = benchrun.up_to_first_200(env, phases, target=tuple(target))
    return secs, phases[0]


def boots(cache: Path, runs: int, json_out: Path | None) -> None:
    from mvm.builders.nix import host_system

    system = host_system()
    kernel = nixfixture.ensure_standin_kernel(cache)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mvm-bench-boot-") as tmp:
        scratch = Path(tmp)
        env = {**os.environ, "NIX_CONFIG": nixfixture.NIX_CONFIG, "MVM_HOME": str(scratch / "mvm"),
               "MVM_CACHE": str(cache), "MVM_TEMPLATES": "off", "NO_COLOR": "1"}
        url = nixfixture.mvm_flake_url(scratch)
        flake = scratch / "hello"
        flake.mkdir()
        (flake / "flake.nix").write_text(nixfixture.seed_flake(system))
        targets: dict[str, list[str]] = {"debian": [str(ROOT / "examples" / "hello")]}
        images: dict[str, dict[str, object]] = {}
        for variant, pyc in (("nix", "checked-hash"), ("nix_unchecked", "unchecked-hash")):
            nixpkgs = nixfixture.write_nixpkgs(scratch / f"nixpkgs-{variant}", kernel, pyc=pyc)
            targets[variant] = ["--flake", str(flake), *nixfixture.override_args(url, nixpkgs)]
        for variant, target in targets.items():
            print(f"preparing: building {variant} hello ...", file=sys.stderr)
            out = subprocess.run([sys.executable, "-m", "mvm", "build", *target, "--json"], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"build of {variant} failed:\n{out.stderr}")
            images[variant] = json.loads(out.stdout)
        floor_rootfs = benchrun.floor_rootfs(scratch)
        floors = {}
        for variant in ("debian", "nix"):
            image = images[variant]
            floors[variant] = (Path(str(image["path"])) / str(image["kernel"]),
                               Path(str(image["path"])) / str(image["initrd"]))
            benchrun.boot_floor(*floors[variant], floor_rootfs)  # warm the page cache
        samples: dict[str, list[float]] = {}
        phases: dict[str, list[dict[str, float]]] = {}
        for i in range(runs):  # interleaved, so drift hits every figure alike
            print(f"run {i + 1}/{runs}", file=sys.stderr)
            for variant in ("debian", "nix"):
                samples.setdefault(f"floor_{variant}", []).append(benchrun.boot_floor(*floors[variant], floor_rootfs))
            for variant, target in targets.items():
                secs, marks = up_to_first_200(env, target)
                samples.setdefault(f"up_{variant}", []).append(secs)
                phases.setdefault(variant, []).append(marks)
    for key, values in samples.items():
        results[key] = benchrun.summary(values)
    for variant, marks in phases.items():
        for phase in benchrun.PHASES:
            values = [m[phase] for m in marks if phase in m]
            if values:
                results[f"guest_{phase}_{variant}"] = benchrun.summary(values)

    def row(label: str, key: str, note: str = "") -> None:
        r = results[key]
        print(f"{label:58} {r['median']:7.2f} {r['min']:7.2f} {r['max']:7.2f}  {note}")

    fd, fn = results["floor_debian"]["median"], results["floor_nix"]["median"]
    ud, un = results["up_debian"]["median"], results["up_nix"]["median"]
    print(f"\nboot, TCG, 1 vCPU, n={runs} (median, min, max in seconds)")
    print(f"{'figure':58} {'median':>7} {'min':>7} {'max':>7}")
    row("floor, Debian cloud kernel + initrd (ext4 built in)", "floor_debian")
    row("floor, stand-in generic kernel + initrd (ext4 .ko.xz)", "floor_nix")
    row("mvmctl up examples/hello -> first 200 (Debian-built)", "up_debian",
        f"{ud / fd:.2f}x its floor")
    row("mvmctl up --flake seed hello -> first 200 (Nix-built)", "up_nix",
        f"{un / fn:.2f}x its floor, {un / ud:.2f}x the Debian-built")
    row("  same, stand-in Python with unchecked-hash .pyc", "up_nix_unchecked",
        f"{results['up_nix_unchecked']['median'] / fn:.2f}x its floor")
    print("\nguest boot timeline (seconds since the guest kernel started, median)")
    print(f"  {'phase':20} {'debian':>8} {'nix':>8} {'nix, unchecked .pyc':>20}")
    for phase in benchrun.PHASES:
        cells = [results.get(f"guest_{phase}_{v}") for v in ("debian", "nix", "nix_unchecked")]
        print(f"  {phase:20} " + " ".join(f"{c['median']:8.2f}" if c else f"{'-':>8}" for c in cells[:2])
              + (f" {cells[2]['median']:20.2f}" if cells[2] else ""))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
