"""Real VMs for tests: the handle, the factory and the pool behind the pytest plugin.

:mod:`mvm.pytest_plugin` wires these to pytest (fixtures, scopes, ``--mvm-keep``, reports);
nothing here imports pytest, so a test runner of another kind can use them too. Like the
CLI, this module uses only the public API (``mvm``).

Fast start: unless ``MVM_TEMPLATES`` says otherwise, the pool makes a template once per
image and shape (``mvm.template_create``; a second pool, an xdist worker, waits for the
first one's and reuses it), and every VM after that is restored from it in a fraction of a
second instead of booted. ``MVM_TEMPLATES=off`` boots every VM cold; ``restore`` restores
templates that exist but makes none.

Ownership, so that nothing outlives a killed run: while a pool has VMs, it holds an
``flock`` on ``$STATE/pytest/<token>.lock`` and lists them in ``<token>.json`` (a name is
written there *before* its ``up``); with its last VM gone, both files go. A new pool first
sweeps: a lock file nobody holds belongs to a process that died (SIGKILL, out of memory, a
killed xdist worker) without tearing down, and that process's VMs are brought down. The
kernel drops an ``flock`` when its holder dies, so a reused pid cannot fool the sweep.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mvm

log = logging.getLogger(__name__)

#: Guest names and labels become VM names: at most this many characters of them are kept.
LABEL_MAX = 24
HEALTH_TIMEOUT = mvm.HEALTH_TIMEOUT
OWNERS_DIR = "pytest"
#: The format of a pool's ownership record (``<token>.json`` in OWNERS_DIR); a sweep reads
#: only its ``vms``, ``pid`` and ``worker``, so older records are still understood.
OWNER_SCHEMA = 1


class FixtureVM(mvm.VM):
    """The library's :class:`mvm.VM`, with what a test reaches for: ``url`` and
    ``host_port``; a health wait whose error points at ``--mvm-keep``; a ``restart`` that
    keeps its host ports and waits."""

    def host_port(self, guest_port: int, proto: str = "tcp") -> int:
        """The host port that forwards to ``guest_port`` (picked free when the VM started)."""
        for port in self.info(ask_guest=False).ports:
            if port.guest_port == guest_port and port.proto == proto:
                return port.host_port
        raise mvm.UsageError(f"{self.name} forwards no host port to guest port {guest_port}/{proto}",
                             hint=f"start it with ports=[{guest_port}], or add one with vm.forward('{guest_port}')")

    def url(self, guest_port: int, path: str = "") -> str:
        """``http://127.0.0.1:<host port>`` (plus ``path``) for a guest's TCP port."""
        return f"http://127.0.0.1:{self.host_port(guest_port)}{path}"

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT,
                     on_change: Callable[[mvm.GuestStatus], None] | None = None) -> mvm.GuestStatus:
        try:
            return super().wait_healthy(timeout, on_change)
        except (mvm.HealthTimeout, mvm.ServiceFailed) as exc:  # the VM goes at teardown, unlike `up --wait`'s
            exc.hint = ("the fixture brings the VM down after the test; `pytest --mvm-keep` keeps a failed "
                        "test's VMs running to inspect them")
            raise

    def restart(self, *, wait: bool = True, wait_timeout: float = HEALTH_TIMEOUT,
                progress: Any = None) -> FixtureVM:
        """Down and up again with the same image, ports (the same host ports, asked for
        again by number), volumes and env; unlike :meth:`mvm.VM.restart`, waits until it is
        healthy again unless ``wait=False``."""
        super().restart(progress=progress)
        if wait:
            self.wait_healthy(wait_timeout)
        return self

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the console and of the services' logs, as text; of a VM the
        test brought down itself, the logs its ``down`` kept."""
        return "\n".join(line.text for line in mvm.logs(self.name, lines=lines, layout=self.layout))


@dataclass(frozen=True)
class Kept:
    """A VM left running for debugging (``--mvm-keep``), and how to reach it."""

    name: str
    why: str
    urls: list[str]
    state: Path | None  #: the state dir, when it is not the one ``mvmctl`` uses by default

    def describe(self) -> str:
        env = f"MVM_STATE={self.state} " if self.state else ""
        lines = [f"kept VM {self.name} ({self.why})"]
        lines += [f"  port:   {url}" for url in self.urls]
        lines += [f"  shell:  {env}mvmctl console {self.name}",
                  f"  logs:   {env}mvmctl logs {self.name}",
                  f"  remove: {env}mvmctl down {self.name}"]
        return "\n".join(lines)


def sanitize(label: str) -> str:
    """``label`` as the start of a VM name: a-z, 0-9 and '-', at most LABEL_MAX characters."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:LABEL_MAX].strip("-")
    return cleaned or "vm"


def source(spec: str | os.PathLike[str], flake: str | None) -> tuple[str, str | None]:
    """(path, flake) for ``mvm.build``/``mvm.up``: a dir or file with an ``mvm.toml`` is a
    spec; a dir with only a ``flake.nix``, or a flake reference (``github:o/r#attr``,
    ``.#attr``), is a flake."""
    if flake is not None:
        return ".", flake
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file() or (path / "mvm.toml").is_file():
        return text, None
    if (path / "flake.nix").is_file():
        return ".", str(path.resolve())
    if "#" in text or ":" in text.split("/", 1)[0]:
        return ".", text
    return text, None  # the build says what is missing


class Pool:
    """The VMs one process starts for its tests, with their images and templates (built and
    made once per pool), and the ownership record that lets a later pool clean up after
    this process if it is killed (see the module docstring)."""

    def __init__(self, layout: mvm.paths.Layout | None = None, *, worker: str | None = None) -> None:
        self.layout = layout or mvm.paths.Layout.default()
        self.worker = sanitize(worker) if worker else None
        self.token = secrets.token_hex(3)
        self.notes: list[str] = []  #: what the pool did that the user should hear about
        self._count = 0
        self._vms: list[str] = []
        self._images: dict[tuple[str, str | None, tuple[str, ...]], mvm.BuildResult] = {}
        self._cold: dict[tuple[str, int | None, int | None], bool] = {}
        self._owners = self.layout.state / OWNERS_DIR
        self._fd: int | None = None  #: the held lock, while the pool has VMs
        self.sweep()

    # -- ownership ------------------------------------------------------------------------

    def _own(self) -> int:
        """Create and lock this pool's lock file (again if a sweep removed it meanwhile).
        A pool holds it only while it has VMs, so a run between tests leaves nothing."""
        lock = self._owners / f"{self.token}.lock"
        while True:
            self._owners.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # another pool removed the empty dir just now
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    self._write()
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _write(self) -> None:
        self._write_record(self._owners / f"{self.token}.json",
                           {"pid": os.getpid(), "worker": self.worker, "argv": sys.argv, "started_at": time.time(),
                            "vms": self._vms})

    @staticmethod
    def _write_record(path: Path, record: dict[str, object]) -> None:
        """An ownership record, whole or not at all (written aside, then renamed). (This
        module sees only mvm's public API, so not through mvm._atomic.)"""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({**record, "schema_version": OWNER_SCHEMA}))
        os.replace(tmp, path)

    def sweep(self) -> list[str]:
        """Bring down the VMs of pools whose process died; returns their names."""
        removed: list[str] = []
        if not self._owners.is_dir():
            return removed
        for lock in sorted(self._owners.glob("*.lock")):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive
                try:
                    if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                        continue  # its pool let go of it and took a new one meanwhile
                except FileNotFoundError:
                    continue  # its pool let go of it (no VMs left)
                removed += self._sweep_one(lock)
            finally:
                os.close(fd)
        try:
            self._owners.rmdir()
        except OSError:
            pass  # live pools' records are there
        return removed

    def _sweep_one(self, lock: Path) -> list[str]:
        record_path = lock.with_suffix(".json")
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        removed, left = [], []
        for name in record.get("vms") or []:
            try:
                mvm.down(name, layout=self.layout, keep_logs=False)
            except mvm.VMNotFound:
                continue
            except mvm.MvmError as exc:
                left.append(name)
                self.notes.append(f"could not remove VM {name} left by a killed test run: {exc.message}")
                continue
            removed.append(name)
            worker = f", xdist worker {record['worker']}" if record.get("worker") else ""
            self.notes.append(f"removed VM {name}, left running by a test run that was killed "
                              f"(pid {record.get('pid')}{worker})")
        if left:  # a later run tries again
            self._write_record(record_path, {**record, "vms": left})
        else:
            record_path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        return removed

    def close(self) -> None:
        """Bring down what is still owned, then drop the ownership record."""
        errors = []
        for name in reversed(list(self._vms)):
            try:
                self.stop(name)
            except mvm.MvmError as exc:
                errors.append(exc)
        if errors:  # the record stays: the next pool's sweep tries again
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise errors[0]

    def _disown(self) -> None:
        """No VMs left: remove the record and the lock (in that order, still holding it)."""
        if self._fd is None:
            return
        (self._owners / f"{self.token}.json").unlink(missing_ok=True)
        (self._owners / f"{self.token}.lock").unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        try:
            self._owners.rmdir()
        except OSError:
            pass  # other pools' records are there

    # -- images, templates, VMs -----------------------------------------------------------

    def image(self, path: str, flake: str | None, nix_args: Sequence[str] = ()) -> mvm.BuildResult:
        """The built image of a spec or flake, built (or found in the cache) once per pool."""
        key = (os.path.abspath(path) if flake is None else path, flake, tuple(nix_args))
        if key not in self._images:
            self._images[key] = mvm.build(path, flake=flake, nix_args=nix_args, layout=self.layout)
        return self._images[key]

    def cold(self, image: mvm.BuildResult, path: str, flake: str | None, nix_args: Sequence[str],
             cpus: int | None, memory: int | None, health_timeout: float) -> bool:
        """Whether to boot cold: makes the template once per image and shape (MVM_TEMPLATES=auto),
        and boots cold when none can be made (then no background maker is started either).
        The template waits for its services no longer than the test would (``health_timeout``):
        a guest not healthy by then gets one without its services' state, and boots cold."""
        if (os.environ.get("MVM_TEMPLATES") or "auto") != "auto":
            return False  # off: up boots cold anyway; restore: up restores what exists; else up refuses it
        key = (image.key, cpus, memory)
        if key not in self._cold:
            try:
                mvm.template_create(path, flake=flake, nix_args=nix_args, cpus=cpus, memory=memory,
                                    layout=self.layout, health_timeout=health_timeout)
                self._cold[key] = False
            except mvm.MvmError as exc:
                log.warning("no template for %s, booting cold: %s", image.name, exc.message)
                self._cold[key] = True
        return self._cold[key]

    def new_name(self, label: str) -> str:
        self._count += 1
        worker = f"-{self.worker}" if self.worker else ""
        return f"{sanitize(label)}{worker}-{self.token}-{self._count}"

    def claim(self, name: str) -> None:
        """Record ``name`` as this pool's before its ``up`` starts."""
        self._vms.append(name)
        if self._fd is None:
            self._fd = self._own()  # writes the record
        else:
            self._write()

    def release(self, name: str) -> None:
        """Forget ``name`` (it is down, or kept on purpose)."""
        if name in self._vms:
            self._vms.remove(name)
            if self._vms:
                self._write()
            else:
                self._disown()

    def stop(self, name: str) -> None:
        """Bring a VM down, logs and all (nothing of it stays), and forget it. Without a
        writable volume nothing of the guest outlives it, so it is quit at once (0.05 s)
        instead of powered off by the guest (0.6 s, which syncs volumes)."""
        vm = FixtureVM(name, self.layout)
        try:
            graceful = any(v.mode == "rw" for v in vm.info(ask_guest=False).volumes)
        except mvm.VMNotFound:
            graceful = False  # the test brought it down itself: the down below drops the logs it kept
        except mvm.MvmError:  # an unreadable record: the careful way
            graceful = True
        try:
            vm.down(timeout=None if graceful else 0.0, keep_logs=False)
        except mvm.VMNotFound:
            pass
        self.release(name)

    def keep(self, name: str, why: str) -> Kept | None:
        """Leave a VM running and disown it (no sweep will take it); None if it is gone."""
        vm = FixtureVM(name, self.layout)
        try:
            info = vm.info(ask_guest=False)
        except mvm.VMNotFound:
            self.release(name)
            return None
        self.release(name)
        state = self.layout.state if self.layout.state != mvm.paths.Layout.default().state else None
        urls = [f"{'http://' if p.proto == 'tcp' else ''}{p.host_ip}:{p.host_port} -> guest {p.guest_port}/{p.proto}"
                for p in info.ports]
        return Kept(name=name, why=why, urls=urls, state=state)


@dataclass
class VMFactory:
    """What the ``mvm_vm`` fixtures return: call it to start a VM. :meth:`finish` brings
    down every VM it started (or keeps them, for ``--mvm-keep``)."""

    pool: Pool
    owner: str  #: the test (or module, or session) the VMs belong to
    vms: list[FixtureVM] = field(default_factory=list)
    failed: bool = False  #: a test that used these VMs failed

    def __call__(
        self,
        spec: str | os.PathLike[str] = ".",
        *,
        ports: Sequence[int | str] = (),
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        name: str | None = None,
        wait_healthy: bool = True,
        health_timeout: float = HEALTH_TIMEOUT,
        cpus: int | None = None,
        memory: int | None = None,
        flake: str | None = None,
        nix_args: Sequence[str] = (),
    ) -> FixtureVM:
        """Start a VM of ``spec`` (a dir or file with an ``mvm.toml``, or a flake) and return
        its handle. ``ports`` are guest ports (``8080``): each gets a free host port, see
        :meth:`FixtureVM.url`; a ``"HOST:GUEST"`` string pins one. ``name`` is a label: the
        VM's name adds the xdist worker and a unique suffix. With ``wait_healthy``, returns
        once every service runs and every health check is healthy."""
        path, flake = source(spec, flake)
        image = self.pool.image(path, flake, nix_args)
        cold = self.pool.cold(image, path, flake, nix_args, cpus, memory, health_timeout)
        vm = FixtureVM(self.pool.new_name(name or image.name), self.pool.layout)
        self.pool.claim(vm.name)
        self.vms.append(vm)
        mvm.up(path, flake=flake, nix_args=nix_args, name=vm.name, cpus=cpus, memory=memory,
               ports=[str(p) for p in ports], env=dict(env or {}), volumes=volumes, layout=self.pool.layout,
               cold=cold)
        if wait_healthy:
            vm.wait_healthy(health_timeout)
        return vm

    def finish(self, keep: bool = False) -> list[Kept]:
        """Bring every VM down (logs and all); with ``keep``, leave them running and say how
        to reach them instead. Raises the first error once all were tried."""
        kept: list[Kept] = []
        errors: list[mvm.MvmError] = []
        for vm in reversed(self.vms):
            try:
                if keep:
                    if (k := self.pool.keep(vm.name, f"{self.owner} failed")) is not None:
                        kept.append(k)
                else:
                    self.pool.stop(vm.name)
            except mvm.MvmError as exc:
                errors.append(exc)
        self.vms.clear()
        if errors:
            raise errors[0]
        return kept
