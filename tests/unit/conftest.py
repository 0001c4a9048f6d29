"""Unit tests never start a background template maker (MVM_TEMPLATES=restore: a template is
restored when there is one, never made behind the test's back)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_background_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVM_TEMPLATES", "restore")
