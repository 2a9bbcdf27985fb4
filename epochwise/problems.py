"""Problems with user input, reported as ``path:line: reason`` before anything is written or paid for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with an input file. ``line`` is 1-based; ``None`` means the whole file."""

    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"


class UserError(Exception):
    """A failure the user can fix (bad input, a missing key): shown as its message, never a traceback.

    Inside a flow run, Prefect still logs the full traceback to the run's log in its API; the CLI only
    keeps it off the console (`epochwise.cli.common.quiet_user_errors`).
    """


class InputError(UserError):
    """Raised when input files have problems; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], *, limit: int = 50) -> None:
        self.problems = problems
        shown = "\n".join(str(p) for p in problems[:limit])
        more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(f"{len(problems)} problem(s) in the input:\n{shown}{more}")


def display_path(path: Path | str) -> str:
    """The path as the user would type it: relative to the working directory when below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)
