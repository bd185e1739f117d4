"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem the user can fix; printed as one line, without traceback."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}: {self.fix}" if self.fix else self.problem


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM, raised like KeyboardInterrupt (cleanup code that catches BaseException runs);
    the exit code is 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT, note: str = ""):
        self.signum, self.note = int(signum), note
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        name = signal.Signals(self.signum).name
        return f"interrupted ({name})" + (f": {self.note}" if self.note else "")
