"""How `make test` spreads the suite over pytest-xdist workers.

A work unit is a test module, so module-scoped fixtures (a control plane process, a fresh
database) start once; the package tests are one unit, so the session's .deb builds run once.
The longest units go first, so the slowest worker does not start its load last.
"""

from __future__ import annotations

from typing import Any

import pytest

PACKAGING = "tests/packaging/"
FIRST = (PACKAGING, "tests/e2e/")


def work_unit(nodeid: str) -> str:
    if nodeid.startswith(PACKAGING):
        return PACKAGING
    return nodeid.split("::", 1)[0]


def order(items: list[pytest.Item]) -> None:
    """Stable: the package tests, then the end-to-end tests, then the rest as collected."""

    def rank(item: pytest.Item) -> int:
        for index, prefix in enumerate(FIRST):
            if item.nodeid.startswith(prefix):
                return index
        return len(FIRST)

    items.sort(key=rank)


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByModule(config, log)
