"""A table that keeps every header whole at any console width: too wide for one table, it prints
as several that each repeat the first column."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table


@dataclass
class Sheet:
    """Rows of strings under named columns; rich prints it with `console.print(sheet)`."""

    title: str
    columns: list[tuple[str, str]]  # (header, "left" | "right")
    rows: list[list[str]] = field(default_factory=list)
    caption: str | None = None

    def add_row(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: a row of {len(cells)} cells for "
                             f"{len(self.columns)} columns")
        self.rows.append(list(cells))

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def table(self, keep: list[int] | None = None, title: str | None = None,
              caption: str | None = None) -> Table:
        """The rich Table of the columns `keep` (all by default)."""
        keep = list(range(len(self.columns))) if keep is None else keep
        table = Table(title=self.title if title is None else title, caption=caption)
        for i in keep:
            header, justify = self.columns[i]
            table.add_column(header, justify=justify)
        for row in self.rows:
            table.add_row(*(row[i] for i in keep))
        return table

    def groups(self, width: int) -> list[list[int]]:
        """Column indices per printed table: as many columns as fit `width` with every header
        on one line, the first column in each."""
        groups: list[list[int]] = []
        current = [0]
        for i in range(1, len(self.columns)):
            if len(current) > 1 and not headers_whole(self.table(current + [i]), width):
                groups.append(current)
                current = [0]
            current.append(i)
        groups.append(current)
        return groups

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        groups = self.groups(options.max_width)
        for n, keep in enumerate(groups, 1):
            last = n == len(groups)
            title = self.title if len(groups) == 1 else f"{self.title} ({n}/{len(groups)})"
            yield self.table(keep, title=title, caption=self.caption if last else None)


def header_lines(text: str) -> list[str]:
    """The header rows of rich tables rendered as text (rich's default box draws them with the
    heavy vertical bar, and the body with the light one)."""
    return [line for line in text.splitlines() if line.startswith("┃")]


def headers_whole(table: Table, width: int) -> bool:
    """Whether every header of `table`, printed `width` columns wide, stays on one line."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(table)
    lines = header_lines(out.getvalue())
    return len(lines) == 1 and all(str(c.header) in lines[0] for c in table.columns)
