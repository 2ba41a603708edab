"""Small text helpers the prompt, the reply parser and the client share (private)."""

from __future__ import annotations

__all__ = ["clean", "inline", "one_line", "shorten"]


def clean(text: str) -> str:
    """No NUL (PostgreSQL refuses it) and no lone surrogate (not encodable as UTF-8)."""
    text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def inline(text: str, limit: int) -> str:
    """``text`` cleaned, on one line, at most ``limit`` characters."""
    return shorten(" ".join(clean(text).split()), limit)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace made one space."""
    return " ".join(text.split())


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
