"""The documentation builds with warnings as errors, and every example in it runs.

``docs/`` is a Sphinx site. Its examples are ``.. doctest::`` / ``.. testcode::`` blocks and the
``>>>`` examples of the docstrings autodoc renders; ``sphinx-build -b doctest`` runs them all.
Both builds run in a subprocess (a fresh interpreter, as a user would run them) into a temporary
directory, never into the repository.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nlsq_stream

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.rst"

needs_sphinx = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None,
    reason="sphinx is not installed (it is in the docs extra: pip install -e '.[docs]')",
)


def _sphinx(builder: str, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "sphinx", "-W", *extra, "-b", builder, str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}",
            pytrace=False,
        )


@needs_sphinx
def test_html_builds_without_warnings(tmp_path):
    _sphinx("html", tmp_path / "html", "--keep-going", "-q")
    assert (tmp_path / "html" / "index.html").exists()


@needs_sphinx
def test_every_example_runs(tmp_path):
    _sphinx("doctest", tmp_path / "doctest", "-q")
    report = (tmp_path / "doctest" / "output.txt").read_text()
    ran = re.search(r"^\s*(\d+) tests?\b", report, re.M)
    assert ran is not None and int(ran.group(1)) > 0, report
    assert " 0 failures in tests" in report, report


_AUTO = re.compile(r"^\.\. auto(?:function|class|exception|data|module)::\s+(\S+)", re.M)


def _documented(page: Path) -> set[str]:
    return set(_AUTO.findall(page.read_text(encoding="utf-8")))


def test_api_page_documents_every_public_name():
    """Each name in ``nlsq_stream.__all__`` has an autodoc entry on the API page (a submodule:
    a section there and an ``automodule`` on some page), so the reference cannot go stale."""
    api = API_PAGE.read_text(encoding="utf-8")
    on_api = _documented(API_PAGE)
    anywhere = set().union(*(_documented(p) for p in DOCS.glob("*.rst")))
    missing = []
    for name in nlsq_stream.__all__:
        full = f"nlsq_stream.{name}"
        if type(getattr(nlsq_stream, name)).__name__ == "module":
            if full not in anywhere or full not in api:
                missing.append(full)
        elif full not in on_api:
            missing.append(full)
    assert not missing, f"not documented on docs/api.rst: {missing}"


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    pages = {p.stem for p in DOCS.glob("*.rst")} - {"index"}
    listed = set(re.findall(r"^   (\w+)$", index, re.M))
    assert pages <= listed, f"pages missing from the toctree: {sorted(pages - listed)}"


def test_readme_example_runs():
    """The README's ten-line example, run as a script in a fresh interpreter."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) <= 12, blocks
    script = blocks[0] + "\nprint('popt', [round(float(v), 2) for v in popt])\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Iteration     Total nfev" in proc.stdout
    assert "popt [2.5, 1.3, 0.5]" in proc.stdout, proc.stdout[-3000:]


def test_fault_table_names_existing_tests():
    """Every test the fault table cites (``test_x``, ``file.py::test_x``, ``test_prefix_*``)
    exists, so the table cannot point at a renamed or deleted test."""
    table = (DOCS / "faults.rst").read_text(encoding="utf-8")
    cited = {c for c, py in re.findall(r"\b(test_\w+\*?)(\.py)?", table) if not py}
    assert cited, "the fault table cites no test"
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^\s*(?:async )?def (test_\w+)", sources, re.M))
    missing = [
        c
        for c in sorted(cited)
        if not any(re.fullmatch(c.replace("*", r"\w*"), d) for d in defined)
    ]
    assert not missing, f"docs/faults.rst cites tests that do not exist: {missing}"


def test_readme_links_point_at_existing_pages():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local), links
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
