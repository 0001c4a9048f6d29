"""docs/json.md names every key of every model a ``--json`` prints."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from mvm._api import models

DOC = (Path(__file__).parents[2] / "docs" / "json.md").read_text()
MODELS = [models.VMInfo, models.VMDetails, models.GuestStatus, models.ServiceStatus, models.CheckStatus,
          models.PortInfo, models.MountInfo, models.BuildResult, models.ImageInfo, models.VolumeInfo,
          models.VolumeExport,
          models.CleanupReport, models.CleanupItem, models.DoctorReport, models.BackendCheck, models.ArchCheck,
          models.IsolationCheck,
          models.ToolCheck,
          models.DiskCheck, models.VMUsage, models.ServiceUsage, models.TemplateInfo, models.DownResult,
          models.ExportInfo]


def keys(model: type[BaseModel]) -> set[str]:
    names = {f.alias or n for n, f in model.model_fields.items()}
    return names | set(model.model_computed_fields)


def test_every_key_is_documented() -> None:
    # a key counts as documented inside a code span: `key`, or `{key, other}` for a nested object
    documented = {word for span in re.findall(r"`([^`]+)`", DOC) for word in re.findall(r"[a-z_]+", span)}
    missing = {m.__name__: sorted(keys(m) - documented) for m in MODELS}
    assert not {k: v for k, v in missing.items() if v}, f"document these keys in docs/json.md: {missing}"


def test_a_dump_has_exactly_the_model_keys() -> None:
    info = models.VMInfo(name="a", status="running", dir="/x")  # type: ignore[arg-type]
    assert set(info.model_dump(mode="json")) == keys(models.VMInfo)
    report = models.CleanupReport(dry_run=True, items=[models.CleanupItem(kind="vm", path="/x", bytes=3, reason="r")])
    assert report.model_dump(mode="json")["freed_bytes"] == 3


def test_logs_json_keys_are_documented() -> None:
    from mvm.runtime.logs import LogLine

    section = DOC[DOC.index("## `logs --json`"):]
    section = section[:section.index("\n## ")]
    assert all(f"`{key}`" in section for key in LogLine("console", "x").as_json())
