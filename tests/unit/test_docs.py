"""Keep the user documentation true.

Runnable examples: in docs/quickstart.md, docs/api.md, docs/migration.md and docs/remote.md every fenced ``python``
or ``sh`` block is executed, in order, in a fresh folder, unless the line before it is an HTML comment:

* ``<!-- not run -->``: shown only (installation, real cloud credentials, long jobs);
* ``<!-- signature -->``: an API signature (api.md), checked against ``inspect.signature`` instead;
* ``<!-- s3 -->``: run against a moto S3 server on loopback, with ``AWS_ENDPOINT_URL`` pointing at it and the bucket
  ``my-bucket`` created, so the example's plain ``s3://my-bucket/...`` URL works unchanged.

The Python blocks of one page share one namespace (a page reads as one script). A ``sh`` block may hold only
``fracstore ...`` commands (run in-process through ``fracstore.cli.main``, each must exit 0) and ``export NAME=VALUE``
lines; a trailing backslash continues a line.

API reference: every heading of docs/api.md that is a backticked dotted name (``### `Store.save```) names something
that exists (relative to ``fracstore``, or a submodule such as ``training.Checkpointer``); every name in
``fracstore.__all__`` and every public method of ``Store`` has such a heading; every signature block matches the code.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import re
import shlex
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import fracstore
from fracstore import model_types
from fracstore.interop import LegacyFormatWarning

DOCS = Path(__file__).resolve().parents[2] / "docs"
RUNNABLE_PAGES = ("quickstart.md", "api.md", "migration.md", "remote.md")
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*(not run|signature|s3)\s*-->$")
_HEADING = re.compile(r"^#{2,6} `([A-Za-z_][\w.]*)`")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    marker: str
    text: str


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page with the marker comment that precedes each (``""`` when none)."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(previous)
        found.append(Block(page, start + 1, match.group(1), marker.group(1) if marker else "", "\n".join(body)))
        i += 1
    return found


@contextlib.contextmanager
def model_types_restored() -> Iterator[None]:
    """The docs register example model types; give the process's registry back as it was."""
    saved = dict(model_types._registry)
    try:
        yield
    finally:
        model_types._registry.clear()
        model_types._registry.update(saved)


def run_shell(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    from fracstore.cli import main

    for command in block.text.replace("\\\n", " ").splitlines():
        argv = shlex.split(command, comments=True)
        if not argv:
            continue
        where = f"{block.page}:{block.line}: {command.strip()}"
        if argv[0] == "export" and len(argv) == 2 and "=" in argv[1]:
            name, _, value = argv[1].partition("=")
            monkeypatch.setenv(name, value)
            continue
        assert argv[0] == "fracstore", f"{where}: a runnable sh block may only run fracstore (or mark it not run)"
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv[1:])
        assert code == 0, f"{where}: exit {code}\n{out.getvalue()}{err.getvalue()}"


@pytest.fixture
def s3_docs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Lazily: a moto server with ``my-bucket``, reached through the standard ``AWS_ENDPOINT_URL``."""

    def start() -> None:
        server = request.getfixturevalue("s3_location")  # reset server, dummy credentials, fresh s3fs clients
        moto = request.getfixturevalue("s3_server")
        moto.create_bucket("my-bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
        assert server.url.startswith("s3://")

    return start


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_examples_run(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_docs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    runnable = [b for b in blocks(page) if b.lang in ("python", "sh") and b.marker in ("", "s3")]
    if not runnable:
        pytest.skip(f"{page} has no runnable examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FRACSTORE_STORE", raising=False)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    s3_started = False
    with model_types_restored(), warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyFormatWarning)  # migration.md reads a .pt on purpose
        for block in runnable:
            if block.marker == "s3" and not s3_started:
                s3_docs()
                s3_started = True
            if block.lang == "sh":
                run_shell(block, monkeypatch)
                continue
            code = compile(block.text, f"{page}:{block.line}", "exec")
            exec(code, namespace)  # the documentation's own examples


# -- the API reference --------------------------------------------------------------------------------------------


def resolve(name: str) -> Any:
    """``Store.save`` -> fracstore.Store.save; ``training.Checkpointer`` -> fracstore.training.Checkpointer."""
    first, *rest = name.split(".")
    if first in fracstore.__all__:
        obj: Any = getattr(fracstore, first)
    else:
        obj = importlib.import_module(f"fracstore.{first}")
    for part in rest:
        obj = getattr(obj, part)
    return obj


def render(name: str) -> str:
    """The signature as api.md writes it: parameter names, ``*``/``**`` markers and defaults, no annotations."""
    obj = resolve(name)
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self":  # a method looked up on its class
        params = params[1:]
    out: list[str] = []
    star = False
    for p in params:
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star = f"*{text}", True
        elif p.kind is p.VAR_KEYWORD:
            text = f"**{text}"
        elif p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        if p.default is not p.empty:
            shown = repr(p.default)
            text += "=" + ("..." if " at 0x" in shown else shown)
        out.append(text)
    return f"{name}({', '.join(out)})"


def api_headings() -> list[str]:
    lines = (DOCS / "api.md").read_text(encoding="utf-8").splitlines()
    return [m.group(1) for line in lines if (m := _HEADING.match(line))]


def test_api_names_exist() -> None:
    missing = []
    for name in api_headings():
        try:
            resolve(name)
        except (AttributeError, ImportError):
            missing.append(name)
    assert not missing, f"docs/api.md documents names fracstore does not have: {missing}"


def test_api_documents_every_public_name() -> None:
    documented = set(api_headings())
    public = set(fracstore.__all__) | {f"Store.{n}" for n in dir(fracstore.Store) if not n.startswith("_")}
    assert not public - documented, f"not documented in docs/api.md: {sorted(public - documented)}"


def test_api_signatures_match_the_code() -> None:
    signatures = [b for b in blocks("api.md") if b.marker == "signature"]
    assert len(signatures) > 40
    wrong = []
    for block in signatures:
        text = " ".join(block.text.split()).replace("( ", "(").replace(" )", ")").replace(",)", ")")
        name = text.partition("(")[0]
        if text != render(name):
            wrong.append(f"api.md:{block.line}: documented {text}\n    code has   {render(name)}")
    assert not wrong, "\n".join(wrong)


def test_pages_link_to_each_other() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in sorted(p.name for p in DOCS.glob("*.md") if p.name != "index.md"):
        assert f"({page})" in index, f"docs/index.md does not link {page}"
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", page.read_text(encoding="utf-8")):
            assert (DOCS / target).exists(), f"{page.name} links to missing {target}"
