"""A dataset size counted three ways. A budget is the first N positions of a study's token stream; what it
teaches depends on how many of those positions are supervised (assistant) targets, which the data decides."""

from __future__ import annotations

from dataclasses import dataclass

SIZE_UNITS = ("tokens", "supervised", "conversations")


@dataclass(frozen=True)
class DatasetSize:
    """A budget of the first `tokens` stream positions, counted three ways: positions, the supervised targets
    among them (what the model learns from), and the conversations of which it holds a supervised target."""

    tokens: int
    supervised: int
    conversations: int

    def count(self, unit: str) -> int:
        return getattr(self, unit)


@dataclass(frozen=True)
class Budgets:
    """A grid's token budgets as the data fills them."""

    first_supervised: int | None  # the smallest budget that holds a supervised token; None: the data holds none
    sizes: dict[int, DatasetSize]  # by budget
