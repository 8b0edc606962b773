"""The one exception type for expected failures; only the CLI prints it."""

from __future__ import annotations


class MedpretrainError(Exception):
    """An expected failure with a user-facing message and a hint on how to fix it.

    `str(err)` is a single line: "<message> — <hint>". Unexpected failures are not wrapped in this
    type: they are bugs and keep their traceback.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message.strip()
        self.hint = hint.strip()
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.message} — {self.hint}" if self.hint else self.message
        return " ".join(text.split())  # one line, whatever the parts contained
