"""Spreadsheet-safe CSV: a cell a spreadsheet would run as a formula is written as text.

A file name like `=HYPERLINK("http://x", "click").png`, or a reviewer's note, lands in CSV files
that people open in Excel or LibreOffice; a cell starting with =, +, -, @, tab or carriage return
is then a formula (CSV injection). Every CSV anomalens writes goes through `csv_writer`, which
prefixes such a text cell with a single quote ('), the spreadsheets' own "this is text" mark.
Numbers (also when passed as text, e.g. "-0.25" or "-inf") are left alone: they cannot run.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, TextIO

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def safe_cell(value: Any) -> Any:
    """`value` as a spreadsheet shows it without running it: text that starts like a formula gets a
    leading single quote; everything else is returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _is_number(value):
        return "'" + value
    return value


class SafeWriter:
    """`csv.writer` whose every cell goes through `safe_cell`."""

    def __init__(self, f: TextIO, **kwargs: Any) -> None:
        self._writer = csv.writer(f, **kwargs)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([safe_cell(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def csv_writer(f: TextIO, **kwargs: Any) -> SafeWriter:
    """A spreadsheet-safe `csv.writer` on `f` (same keyword arguments)."""
    return SafeWriter(f, **kwargs)
