"""docs/failure_behaviour.md is the bad-input catalogue as rendered by tests/failure_catalogue.py, so
the document lists exactly the cases the tests run; every row names its input in its message."""
from __future__ import annotations

import re
from collections import Counter

from failure_catalogue import CLI_ROWS, DOC_PATH, NODE_ROWS, ROWS, render_markdown


def test_document_equals_the_rendered_table():
    assert DOC_PATH.read_text(encoding="utf-8") == render_markdown(), (
        "docs/failure_behaviour.md is out of date: run `python tests/failure_catalogue.py`")


def test_document_has_one_table_row_per_case():
    rows = [line for line in render_markdown().splitlines() if re.match(r"\| `[^`]", line)]
    assert len(rows) == len(ROWS) >= 60
    assert len(NODE_ROWS) >= 25 and len(CLI_ROWS) + len(NODE_ROWS) == len(ROWS)


def test_rows_are_unique_and_name_their_input():
    assert not [i for i, n in Counter(row.id for row in ROWS).items() if n > 1]
    for row in ROWS:
        assert row.expect, row.id
        # the message names the input (or the file or value given for it) in a fragment the tests check
        assert any(row.named_by in fragment for fragment in row.expect), row.id
        assert row.surface == "cli" or isinstance(row.given, dict) and row.input in row.given, row.id
