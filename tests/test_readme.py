"""The README stays a user's page: short, install first, every link pointing at a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short_and_starts_with_install():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    assert any(line.startswith("## Install in ComfyUI") for line in lines[:60])


def test_every_relative_link_of_the_readme_and_docs_exists():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
