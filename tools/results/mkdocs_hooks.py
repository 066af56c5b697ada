"""MkDocs hook: the site shows every generated table as its records and the code give it at build time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tables  # noqa: E402  (a sibling tool, not a package)

_CACHE: dict[str, str] = {}


def on_page_markdown(markdown: str, **kwargs) -> str:
    return tables.render(markdown, _CACHE)
