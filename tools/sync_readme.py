"""Regenerate the settings table in README.md from the settings object (`make readme`)."""

from __future__ import annotations

import re
from pathlib import Path

from mf_worker.cli import settings_markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- settings-table:[^\n]*-->\n).*?(\n<!-- /settings-table -->)", re.S)

text = README.read_text(encoding="utf-8")
new, count = BLOCK.subn(lambda m: m.group(1) + settings_markdown_table() + m.group(2), text)
if count != 1:
    raise SystemExit("README.md: settings-table markers not found")
README.write_text(new, encoding="utf-8")
