"""The docs: the configuration reference is what the schema renders, and no relative link is broken."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from convflow.config.reference import REGENERATE, render_reference

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page outside code, without web addresses and in-page anchors."""
    text = INLINE_CODE.sub("", FENCED_BLOCK.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def test_configuration_reference_is_what_the_schema_renders():
    written = (REPO / "docs" / "configuration.md").read_text()

    assert written == render_reference(), (
        f"docs/configuration.md is stale: regenerate it with `{REGENERATE}` and commit it"
    )


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_points_at_a_file(page):
    missing = [target for target in _relative_links(page) if not (page.parent / target.partition("#")[0]).exists()]

    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_link_finder_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) [b](https://x.org) [c](#c) `[d](d.md)`\n```\n[e](e.md)\n```\n[f](f.md#g)\n")

    assert _relative_links(page) == ["docs/a.md", "f.md#g"]
