"""The examples run as a user would run them: a fresh process, a fresh store, output checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_saves_finds_and_applies_the_best_model(tmp_path: Path) -> None:
    env = {**os.environ, "FRACSTORE_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("saved relaxation-pinn@") == 3
    assert "best by val_error: relaxation-pinn@" in result.stdout
    error = float(re.search(r"max error of the loaded model on new inputs: (\S+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert error < 0.05
    assert (tmp_path / "store" / "fracstore.msgpack").is_file()
