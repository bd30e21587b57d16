"""Code, docs and comments say what the code does and why, never which tracker issue or work session
asked for it: such references go stale and mean nothing to a reader of the pack."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"\b(issue|session)s? #?\d+", re.IGNORECASE)


def test_no_file_refers_to_the_tracker():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.js", "*.toml"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    assert files, "git ls-files found nothing"
    hits = [f"{name}:{i}: {line.strip()}" for name in files if Path(ROOT, name).is_file()
            for i, line in enumerate(Path(ROOT, name).read_text(encoding="utf-8").splitlines(), 1)
            if PATTERN.search(line) and name != "tests/test_no_tracker_refs.py"]
    assert not hits, "\n".join(hits)
