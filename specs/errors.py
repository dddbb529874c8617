"""The error every spec or input file problem becomes: one readable line per problem."""

from __future__ import annotations


class SpecError(Exception):
    """A spec file that cannot be used; `lines` are `path.to.field: problem (got X; hint)`."""

    def __init__(self, source: str, lines: list[str]):
        self.source = source
        self.lines = lines
        super().__init__(f"{source}: " + "; ".join(lines))

    def render(self) -> str:
        n = len(self.lines)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  {line}" for line in self.lines)])
