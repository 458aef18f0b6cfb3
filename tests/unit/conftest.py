"""Host unit tests never touch the machine's own state directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("IPVS_SYNPROXY_STATE_DIR", str(d))
    return d
