"""The Functions host's output binding, for calling function `main`s outside the host."""

from __future__ import annotations

from typing import Any

import azure.functions as func


class Collector(func.Out):
    """An output binding: whatever the function `set()`s."""

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, val: Any) -> None:
        self.value = val

    def get(self) -> Any:
        return self.value

    def messages(self) -> list[str]:
        """Queue messages as the host would write them (one value or a list of them)."""
        if self.value is None:
            return []
        return list(self.value) if isinstance(self.value, list | tuple) else [self.value]
