"""Tables that fit a narrow terminal: headers wrap at spaces, cells are never cut or folded, and a table wider than
the terminal is printed as several, each led by its name column."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

EDGES = 3
"""Characters a column takes besides its text: a space either side and a border."""


class FoldingTable:
    """Rows of text cells under named columns; the first column names the row and leads every part."""

    def __init__(self, title: str, columns: list[str], left: tuple[str, ...] = ()):
        self.title, self.columns, self.left = title, columns, left
        self.rows: list[list[str] | None] = []  # None: a section line

    def add_row(self, *cells: str) -> None:
        """Append a row of cells, one per column."""
        self.rows.append(list(cells))

    def add_section(self) -> None:
        """A line between the rows so far and the next ones."""
        self.rows.append(None)

    def widths(self, width: int) -> list[int]:
        """Each column's width: its widest cell or its header, where all of them fit `width`; else its widest cell
        or its header's longest word (the header wraps at spaces)."""
        cells = [r for r in self.rows if r is not None]
        widest = [max(len(r[i]) for r in cells) if cells else 0 for i in range(len(self.columns))]
        whole = [max(len(col), w) + EDGES for col, w in zip(self.columns, widest, strict=True)]
        if sum(whole) + 1 <= width:
            return whole
        return [
            max([len(word) for word in col.split()] + [w]) + EDGES for col, w in zip(self.columns, widest, strict=True)
        ]

    def parts(self, width: int) -> list[list[int]]:
        """Column indices of each printed part: the first column, then as many columns as fit `width`."""
        widths = self.widths(width)
        parts: list[list[int]] = []
        for i in range(1, len(self.columns)):
            if not parts or sum(widths[j] for j in parts[-1]) + widths[i] + 1 > width:
                parts.append([0])
            parts[-1].append(i)
        return parts or [[0]]

    def tables(self, width: int) -> list[Table]:
        """The rich tables that show every cell within `width` columns."""
        out = []
        widths = self.widths(width)
        for n, part in enumerate(self.parts(width)):
            table = Table(title=self.title if n == 0 else f"{self.title} (continued)")
            for i in part:
                name = self.columns[i]
                table.add_column(name, justify="left" if i == 0 or name in self.left else "right",
                                 width=widths[i] - EDGES)  # fmt: skip
            for row in self.rows:
                if row is None:
                    table.add_section()
                else:
                    table.add_row(*(row[i] for i in part))
            out.append(table)
        return out

    def print(self, console: Console) -> None:
        """Print the table, in as many parts as `console`'s width needs."""
        for table in self.tables(console.width):
            console.print(table)
