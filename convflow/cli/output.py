"""What commands print besides their results: errors on stderr, the exit codes commands end with, and
text tables aligned by column."""

from __future__ import annotations

import sys
from collections.abc import Iterable

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2  # a pipelines file with mistakes; argparse exits with it too, on a bad command line
EXIT_BLOCKED = 3  # the data checks blocked the run: nothing was trained, production is unchanged


def print_error(message: str) -> None:
    print(message, file=sys.stderr)


def fail(message: str, code: int = EXIT_FAILED) -> int:
    """Print `message` on stderr; return `code`, for the command that failed to exit with."""
    print_error(message)
    return code


def table_lines(rows: list[dict[str, str]], header: dict[str, str], indent: str = "") -> list[str]:
    """`rows` of display strings under `header` (row key: column title), two spaces between columns:
    a column of numbers (or "-" where one is missing) right-aligned, any other left-aligned."""
    widths = {key: max(len(cell) for cell in (title, *(row[key] for row in rows))) for key, title in header.items()}
    align = {key: ">" if _numbers(row[key] for row in rows) else "<" for key in header}
    return [
        indent + "  ".join(f"{cells[key]:{align[key]}{widths[key]}}" for key in header).rstrip()
        for cells in (header, *rows)
    ]


def _numbers(cells: Iterable[str]) -> bool:
    present = [cell for cell in cells if cell not in ("", "-")]
    return all(_is_number(cell) for cell in present)


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return False
    return True
