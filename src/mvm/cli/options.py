"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
VMName = Annotated[str, typer.Argument(help="The VM's name (see `mvmctl ls`).", show_default=False)]
Ports = Annotated[
    list[str] | None,
    typer.Option(
        "-p", "--port",
        help="Forward a host port to a guest port: HOST:GUEST, IP:HOST:GUEST, optional /tcp|/udp. "
        "Binds 127.0.0.1 unless an IP is given. Repeatable.",
        show_default=False,
    ),
]
Env = Annotated[
    list[str] | None,
    typer.Option("-e", "--env", help="Set KEY=VALUE in every service's environment (overrides the spec). "
                 "Repeatable.", show_default=False),
]
Volumes = Annotated[
    list[str] | None,
    typer.Option(
        "-v", "--volume",
        help="Attach a volume. HOSTDIR:/guest/path is read-only: an image of HOSTDIR built at each up, "
        "mounted ro,nosuid,nodev,noexec (add :secret, or use a path containing 'secret', to hide it from "
        "non-service users). HOST:/guest/path:SIZE_MB is writable and persistent: created once from HOST's "
        "files, never reformatted, grown when SIZE_MB grows (see `mvmctl volume --help`). Repeatable.",
        show_default=False,
    ),
]
SpecPath = Annotated[
    str,
    typer.Argument(help="Directory holding mvm.toml (or the file itself).", show_default="."),
]
