"""The README's walk-through, executed: its files become a project whose tests must pass.

Every fenced block under "Use it in your app" that starts with a `file:` comment is written
to that path; the `pglayer serve ...` block is run and answered; the `pytest` block runs the
project's own tests through `pglayer.testing`. (The `pip install` line is what this
environment already has.)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.S)
FILE = re.compile(r"^(?:#|--) file: (\S+)\n")


def walkthrough() -> str:
    text = README.read_text()
    start = text.index("## Use it in your app")
    return text[start : text.index("\n## ", start + 1)]


def blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(walkthrough())]


def write_project(root: Path) -> dict[str, str]:
    written = {}
    for _, body in blocks():
        match = FILE.match(body)
        if match:
            path = root / match.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written[match.group(1)] = body
    return written


def commands() -> list[list[str]]:
    return [shlex.split(line) for lang, body in blocks() if lang == "sh"
            for line in body.splitlines() if line.strip()]  # fmt: skip


def project_env(server: Server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLAYER_")}
    env.pop("DATABASE_URL", None)
    env["PGLAYER_TEST_DATABASE_URL"] = server.admin_url
    env.update(extra)
    return env


def test_the_walkthrough_names_every_file_it_needs(tmp_path: Path) -> None:
    written = write_project(tmp_path)
    assert set(written) == {
        "migrations/0001_notes.sql", "notes.py", "pyproject.toml", "conftest.py", "test_notes.py"
    }  # fmt: skip
    assert [c[:2] for c in commands()] == [["pip", "install"], ["pglayer", "serve"], ["pytest"]]


def test_the_walkthroughs_tests_pass(tmp_path: Path, server: Server) -> None:
    write_project(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=project_env(server),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout


def test_the_walkthroughs_serve_command_serves_the_app(
    tmp_path: Path, server: Server, db_url: str
) -> None:
    write_project(tmp_path)
    serve = next(c for c in commands() if c[:2] == ["pglayer", "serve"])
    port = free_port()
    command = [str(Path(sys.executable).with_name("pglayer")), *serve[1:], "--port", str(port)]
    env = project_env(server, DATABASE_URL=db_url)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        created = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                created = httpx.post(f"http://127.0.0.1:{port}/notes", json={"body": "x"})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        if created is None:
            pytest.fail(proc.stdout.read() if proc.stdout else "serve exited")
        assert created.status_code == 201, created.text
        listed = httpx.get(f"http://127.0.0.1:{port}/notes").json()
        assert [n["body"] for n in listed["items"]] == ["x"]
    finally:
        proc.send_signal(signal.SIGTERM)  # our own child, by its PID
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_the_walkthroughs_app_passes_mypy_strict(tmp_path: Path) -> None:
    write_project(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "notes.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
