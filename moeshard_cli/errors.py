"""User-facing errors: one line that names the problem and the fix."""


class UserError(Exception):
    """A problem the user can fix; printed as one line, without traceback."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem}: {self.fix}" if self.fix else self.problem
