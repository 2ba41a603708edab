"""What the console draws: model output as sanitised HTML, and small inline-SVG bar charts.

Episode text comes from a model that users' planning notes can steer, so it is untrusted
twice over: markdown-it renders it with raw HTML off (tags come out as text) and only safe
link schemes, then nh3 (the ammonia sanitiser) keeps a short list of tags and attributes and
drops every ``on*`` attribute and ``javascript:`` URL that might remain. The page's
Content-Security-Policy is the third line: no inline script runs even if both failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

__all__ = ["Bar", "bar_chart", "render_markdown"]

_MD: Final = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
_TAGS: Final = {
    "a", "p", "br", "hr", "em", "strong", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td",
}
_ATTRIBUTES: Final = {"a": {"href", "title"}, "th": {"align"}, "td": {"align"}}


def render_markdown(text: str) -> Markup:
    """Markdown to HTML that can carry no script, style, handler or foreign embed."""
    html = _MD.render(text)
    return Markup(nh3.clean(  # noqa: S704  # nh3's output is sanitised HTML, safe to mark
        html, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow"))


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar: its label (under it), and its stacked values, bottom first."""

    label: str
    values: tuple[int, ...]


def bar_chart(bars: Sequence[Bar], *, title: str, series: Sequence[str],
              width: int = 480, height: int = 120) -> Markup:
    """A stacked bar chart as inline SVG (no script, no style element: CSS classes
    ``s0``, ``s1``… colour the series). Every number is ours; labels are escaped."""
    top = max((sum(b.values) for b in bars), default=0) or 1
    slot = width / max(len(bars), 1)
    plot = height - 16
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for i, bar in enumerate(bars):
        x = i * slot + 1
        y = float(plot)
        for k, value in enumerate(bar.values):
            h = plot * value / top
            y -= h
            if value:
                parts.append(
                    f'<rect class="s{k}" x="{x:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                    f'height="{h:.1f}"><title>{escape(bar.label)}: {escape(series[k])} '
                    f'{value}</title></rect>')
        if len(bars) <= 12 or i % 3 == 0:
            parts.append(f'<text x="{x + slot / 2:.1f}" y="{height - 3}" '
                         f'text-anchor="middle">{escape(bar.label)}</text>')
    parts.append(f'<text x="{width - 2}" y="10" text-anchor="end">max {top}</text></svg>')
    return Markup("".join(parts))  # noqa: S704  # built from numbers and escaped labels
