"""The library's wheel: no shop, a small bare install, optional parts imported only on demand."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BARE = {"asyncpg", "fastapi", "orjson", "pydantic", "pydantic-settings", "tenacity"}
NEVER_BARE = ("typer", "rich", "uvicorn", "email_validator", "prometheus_client", "pglayer_shop")


def build_wheel(out: Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return zipfile.ZipFile(next(out.glob("pglayer-*.whl")))


def test_the_wheel_holds_the_library_only(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = wheel.namelist()
    assert not [n for n in names if n.startswith("pglayer_shop")]
    assert "pglayer/py.typed" in names
    assert "pglayer/_sql/0001_idempotency_keys.sql" in names
    metadata = wheel.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    required = {
        re.split(r"[<>=\[; ]", line.removeprefix("Requires-Dist: "))[0]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    }
    assert required == BARE
    scripts = wheel.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert "pglayer = pglayer._cli:main" in scripts
    assert "pglayer-shop" not in scripts


def test_a_bare_install_imports_none_of_the_extras() -> None:
    blocker = f"""
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NEVER_BARE!r}:
            raise ImportError("not in a bare install: " + name)
sys.meta_path.insert(0, Blocked())
import pglayer, pglayer.fastapi, pglayer.migrations
try:
    pglayer.fastapi.setup_metrics
except ImportError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'pglayer[prometheus]'" in result.stdout
