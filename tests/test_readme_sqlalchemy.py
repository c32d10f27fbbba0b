"""The README's "With SQLAlchemy" example, executed: its files, with the walk-through's
`pyproject.toml` and a `conftest.py` building its app, become a project whose test passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import Server
from tests.test_readme_walkthrough import FENCE, FILE, README, project_env
from tests.test_readme_walkthrough import write_project as write_walkthrough

CONFTEST = """\
import pytest

from blog import create_app
from pglayer import Database

pytest_plugins = ["pglayer.testing"]


@pytest.fixture
def pglayer_app(pglayer_settings):
    return create_app(Database(pglayer_settings))
"""


def section() -> str:
    text = README.read_text()
    start = text.index("### With SQLAlchemy")
    return text[start : text.index("\n### ", start + 1)]


def write_project(root: Path) -> set[str]:
    written = write_walkthrough(root)  # for its pyproject.toml
    for name in written:
        (root / name).unlink()
    (root / "pyproject.toml").write_text(written["pyproject.toml"])
    (root / "conftest.py").write_text(CONFTEST)
    files = set()
    for _, body in FENCE.findall(section()):
        match = FILE.match(body)
        if match:
            (root / match.group(1)).parent.mkdir(parents=True, exist_ok=True)
            (root / match.group(1)).write_text(body)
            files.add(match.group(1))
    return files


def run(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    return result.returncode, result.stdout[-5000:] + result.stderr[-3000:]


def test_the_sqlalchemy_examples_test_passes(tmp_path: Path, server: Server) -> None:
    assert write_project(tmp_path) == {"migrations/0001_authors.sql", "blog.py", "test_blog.py"}
    code, out = run(tmp_path, "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
                    env=project_env(server))  # fmt: skip
    assert code == 0, out
    assert "1 passed" in out


def test_the_sqlalchemy_example_passes_mypy_strict(tmp_path: Path) -> None:
    write_project(tmp_path)
    code, out = run(tmp_path, "mypy", "--strict", "--no-incremental", "blog.py")
    assert code == 0, out
