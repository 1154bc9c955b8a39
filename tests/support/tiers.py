"""The two test tiers: `make test` runs everything; `make test-fast` leaves out the tests marked slow, ray,
deepspeed, ranks or gpu (setup.cfg describes the markers; the Makefile holds the expression).

A fixture that starts something heavy (a Ray cluster, a training run in DeepSpeed, torch.distributed ranks, a
long training loop) says so with :func:`marks_users`; tests/conftest.py then gives each of those markers to every
test that uses the fixture, directly or through another fixture. A new test of such a fixture lands in the full
tier without anyone remembering to mark it. tests/conftest.py also fails a test that is not marked ``ray`` but
leaves a Ray cluster of its own running in the test process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

_ATTRIBUTE = "_marks_its_users"


def marks_users(*markers: str) -> Callable:
    """Decorate a fixture function (below ``@pytest.fixture``): the tests that use it get these markers."""

    def decorate(function: Callable) -> Callable:
        setattr(function, _ATTRIBUTE, markers)
        return function

    return decorate


def fixture_markers(item: pytest.Item) -> set[str]:
    """The markers the fixtures of a collected test ask for (every definition in scope of each fixture name)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:  # not a python test function (a doctest, say): no fixtures to inherit from
        return set()
    found: set[str] = set()
    for name in item.fixturenames:
        for definition in info.name2fixturedefs.get(name, ()):
            found.update(getattr(definition.func, _ATTRIBUTE, ()))
    return found


def ray_running() -> bool:
    """A Ray cluster is connected to from this process (never imports ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


WEIGHTS = {"deepspeed": 3, "ray": 2, "ranks": 1, "slow": 1}
"""A test's rough cost by its heaviest marker (DeepSpeed ranks cost the most start-up), for ordering files."""


def by_weight(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items with whole test files ordered by the summed weight of their tests, heaviest first (ties and the
    tests inside a file keep their order). pytest-xdist's ``--dist loadfile --no-loadscope-reorder`` hands files
    out in this order: the long files start first instead of being the last ones left on one worker."""
    weight: dict[str, int] = {}
    for item in items:
        cost = max((WEIGHTS.get(mark.name, 0) for mark in item.iter_markers()), default=0)
        weight[item.nodeid.split("::")[0]] = weight.get(item.nodeid.split("::")[0], 0) + cost
    return sorted(items, key=lambda item: -weight[item.nodeid.split("::")[0]])
