"""Failures counted by stage and cause (exception type and first message line with its numbers read
as N), each with the first case it happened on: the unreadable files of `training.prepare` and the
failed ranges of `training.sweep_infills`."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass
class Failures:
    """Exceptions by stage and cause, with a count and the first case of each."""
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, stage: str, error: BaseException, where: str) -> None:
        self.add_cause(stage, type(error).__name__, str(error), where)

    def add_cause(self, stage: str, kind: str, message: str, where: str) -> None:
        """Count one failure of exception type `kind` (its message's numbers read as N)."""
        cause = (stage, kind, _NUMBER.sub("N", message.splitlines()[0] if message else ""))
        self.counts[cause] += 1
        self.examples.setdefault(cause, where)

    def as_dict(self) -> list[dict]:
        return [{"stage": stage, "error": kind, "cause": pattern, "count": count,
                 "first": self.examples[(stage, kind, pattern)]}
                for (stage, kind, pattern), count in self.counts.most_common()]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> list[str]:
        return [f"{count:7d}  {stage}: {kind}: {pattern}\n         first: {self.examples[(stage, kind, pattern)]}"
                for (stage, kind, pattern), count in self.counts.most_common()]
