"""The manual (docs/, MkDocs) builds strictly: a broken link or anchor, or a page left out of
the navigation, fails the build; the READMEs' links lead to files that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"


def _build(top: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` in a folder holding mkdocs.yml and docs/."""
    return subprocess.run([str(MKDOCS), "build", "--strict", "-d", str(site)], cwd=top,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_manual_builds_strictly_in_both_languages(tmp_path: Path) -> None:
    built = _build(REPO, tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "architecture.html").is_file()
    spanish = (tmp_path / "site" / "es" / "routing.html").read_text(encoding="utf-8")
    assert "Enrutar" in spanish


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    with open(tmp_path / "docs" / "rules.md", "a", encoding="utf-8") as page:
        page.write("\nSee [the engines](how-it-works.md#no-such-section).\n")
    built = _build(tmp_path, tmp_path / "site")
    assert built.returncode != 0
    assert "no-such-section" in built.stdout + built.stderr


def test_the_readmes_link_to_files_that_exist() -> None:
    for readme in (REPO / "README.md", REPO / "README.es.md"):
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme.read_text(encoding="utf-8"))
        local = [link for link in links if "://" not in link]
        assert local, f"{readme.name} links to the manual"
        missing = [link for link in local if not (REPO / link).exists()]
        assert missing == [], f"{readme.name}: {missing}"


def test_every_page_is_in_the_navigation() -> None:
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.name for p in DOCS.glob("*.md") if not p.name.endswith(".es.md")}
    assert pages == set(re.findall(r"(?m):\s*([\w-]+\.md)\s*$", config))
