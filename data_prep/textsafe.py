"""Text that came from data (CSV cells, file names, labels) made safe for where it is written.

* Markdown and HTML (``report.md``, ``sweep.md``): :func:`md` escapes a value for running text
  (Markdown punctuation backslash-escaped, ``& < >`` as HTML entities, so neither bold text, links,
  images nor tags can be injected); :func:`md_code` puts it in a code span that cannot be closed
  from inside (and keeps a ``|`` from splitting a table cell); :func:`fence` gives a code fence
  longer than any backtick run of the block it encloses.
* The console: :func:`console` shows control characters (terminal escape sequences) as ``\\xNN``.
* Spreadsheets (every CSV the project writes): :func:`csv_cell` neutralises a TEXT cell that starts
  with ``=``, ``+``, ``-``, ``@``, tab or carriage return by a leading ``'`` (OWASP's CSV-injection
  rule); a cell that is a plain number (``-0.5``, ``1e-07``) stays a number.

Nothing here imports more than the standard library.
"""
from __future__ import annotations

import re

_MD_PUNCT = re.compile(r"([\\`*_\[\]|~])")  # emphasis, code, links and images ([ ]), table cells, strikethrough
_MD_START = re.compile(r"^([+\-=#>])|^(\d+)([.)])")  # a list item or a setext underline at the start of a line
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)
CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)


def console(value) -> str:
    """``value`` as text for a terminal: control characters (ANSI escapes, bidi overrides) shown as escapes."""
    return _controls(str(value))


def md(value) -> str:
    """``value`` as literal Markdown text (also safe where the Markdown is rendered as HTML): one line."""
    text = _controls(" ".join(str(value).splitlines()))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_PUNCT.sub(r"\\\1", text)
    return _MD_START.sub(lambda m: "\\" + m.group(1) if m.group(1) else m.group(2) + "\\" + m.group(3), text)


def fence(text: str, char: str = "`") -> str:
    """A code fence (``` or longer) that ``text`` cannot close."""
    runs = [len(m) for m in re.findall(f"{re.escape(char)}+", text)]
    return char * max(3, max(runs, default=0) + 1)


def md_code(value) -> str:
    """``value`` in a Markdown code span: literal (no HTML, no emphasis), one line, table-safe."""
    text = _controls(" ".join(str(value).splitlines()))
    ticks = max([len(m) for m in re.findall("`+", text)], default=0)
    bar = "`" * (ticks + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{bar}{pad}{text.replace('|', chr(92) + '|')}{pad}{bar}"


def csv_cell(value):
    """A CSV cell that a spreadsheet cannot run: text starting with = + - @ (or tab, CR) gets a leading
    ``'``; numbers, and text that is a plain number, are left as they are."""
    if isinstance(value, str) and value.startswith(CSV_TRIGGERS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(row) -> list:
    return [csv_cell(v) for v in row]
