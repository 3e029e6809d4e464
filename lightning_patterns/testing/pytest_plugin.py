"""pytest plugin of lightning_patterns (entry point ``lightning_patterns`` in ``pytest11``): balance tests in a line.

Installed with the package, so any test suite can write::

    import pytest
    from lightning_patterns.testing import assert_balanced

    @pytest.mark.lp_balance("s3://bucket/train", world_sizes=[1, 8, 64], workers=[0, 4], batch_sizes=[32])
    def test_train_is_balanced(lp_dataset, lp_topologies):
        for topology in lp_topologies:
            assert_balanced(lp_dataset, topology)

- ``@pytest.mark.lp_balance(url, *, world_sizes, workers, batch_sizes, num_nodes, drop_last, min_per_class,
  shuffle, seed, storage_options)``: the dataset and the grid of jobs to check. Each of ``world_sizes``,
  ``workers``, ``batch_sizes`` and ``num_nodes`` is an int or an iterable of ints (a ``range`` too);
  ``drop_last`` a bool or an iterable of bools. Grid points whose world size is not a multiple of the node
  count are skipped.
- ``lp_dataset_url``: the marker's URL; override this fixture (in a ``conftest.py`` or the test module) for a
  dataset the tests write themselves, and omit ``url`` from the marker.
- ``lp_dataset``: the dataset's :class:`~lightning_patterns.data.shards.Manifest`, read once per test.
- ``lp_topologies``: the grid, as a list of :class:`~lightning_patterns.testing.JobTopology`.

For Hypothesis-driven searches use :mod:`lightning_patterns.testing.strategies` with ``@given`` directly. This
module imports only pytest when pytest starts; the data layers load when a fixture is first used.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lightning_patterns.data.shards.manifest import Manifest
    from lightning_patterns.testing.topology import JobTopology

__all__ = ["MARKER", "lp_dataset", "lp_dataset_url", "lp_topologies", "pytest_configure"]

MARKER = "lp_balance"
_GRID_DEFAULTS: dict[str, Any] = {
    "world_sizes": (1, 2, 8),
    "workers": (0, 2),
    "batch_sizes": (1,),
    "num_nodes": (1,),
    "drop_last": (False, True),
}
_FIXED_DEFAULTS: dict[str, Any] = {"min_per_class": None, "shuffle": False, "seed": 0, "storage_options": None}

# The contract suites are shipped code used as test classes: rewrite their asserts so failures show values.
pytest.register_assert_rewrite("lightning_patterns.testing.contracts")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``lp_balance`` marker (so ``--strict-markers`` accepts it)."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}(url=None, *, world_sizes=(1, 2, 8), workers=(0, 2), batch_sizes=(1,), num_nodes=(1,), "
        "drop_last=(False, True), min_per_class=None, shuffle=False, seed=0, storage_options=None): the dataset and "
        "the grid of jobs the lp_dataset and lp_topologies fixtures give (lightning_patterns).",
    )


def _marker(request: pytest.FixtureRequest, fixture: str) -> pytest.Mark:
    marker: pytest.Mark | None = request.node.get_closest_marker(MARKER)
    if marker is None:
        pytest.fail(
            f"The {fixture} fixture reads the @pytest.mark.{MARKER}(...) marker, but {request.node.nodeid} has none. "
            f'Add one, e.g. @pytest.mark.{MARKER}("s3://bucket/train", world_sizes=[1, 8], workers=[0, 4]).',
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(_GRID_DEFAULTS) - set(_FIXED_DEFAULTS) - {"url"})
    if unknown or len(marker.args) > 1:
        extra = f"unknown keywords {unknown}" if unknown else f"{len(marker.args)} positional arguments"
        pytest.fail(
            f"@pytest.mark.{MARKER} on {request.node.nodeid} has {extra}; it takes the dataset URL and the keywords "
            f"{sorted([*_GRID_DEFAULTS, *_FIXED_DEFAULTS])}.",
            pytrace=False,
        )
    return marker


def _values(name: str, value: Any, node: str) -> list[Any]:
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value]
    if not values:
        pytest.fail(f"@pytest.mark.{MARKER}({name}=...) on {node} is empty; give at least one value.", pytrace=False)
    return values


@pytest.fixture
def lp_dataset_url(request: pytest.FixtureRequest) -> str:
    """The dataset URL of the test's ``lp_balance`` marker; override it for a dataset the tests write."""
    marker = _marker(request, "lp_dataset_url")
    url = marker.args[0] if marker.args else marker.kwargs.get("url")
    if not isinstance(url, str) or not url:
        pytest.fail(
            f"@pytest.mark.{MARKER} on {request.node.nodeid} names no dataset URL: pass it first, e.g. "
            f'@pytest.mark.{MARKER}("s3://bucket/train"), or override the lp_dataset_url fixture.',
            pytrace=False,
        )
    return url


@pytest.fixture
def lp_dataset(request: pytest.FixtureRequest, lp_dataset_url: str) -> Manifest:
    """The manifest of the dataset at ``lp_dataset_url`` (read once per test; no shard is read)."""
    from lightning_patterns.data.shards.manifest import load_manifest

    marker = request.node.get_closest_marker(MARKER)
    options: Mapping[str, Any] | None = None if marker is None else marker.kwargs.get("storage_options")
    return load_manifest(lp_dataset_url, options)


@pytest.fixture
def lp_topologies(request: pytest.FixtureRequest) -> list[JobTopology]:
    """Every job of the marker's grid: world sizes × node counts × workers × batch sizes × ``drop_last``."""
    from lightning_patterns.testing.topology import JobTopology

    marker = _marker(request, "lp_topologies")
    node = request.node.nodeid
    grid = {name: _values(name, marker.kwargs.get(name, default), node) for name, default in _GRID_DEFAULTS.items()}
    fixed = {name: marker.kwargs.get(name, default) for name, default in _FIXED_DEFAULTS.items()}
    topologies = [
        JobTopology(
            world_size=world_size,
            num_nodes=num_nodes,
            num_workers=workers,
            batch_size=batch_size,
            drop_last=drop_last,
            min_per_class=fixed["min_per_class"],
            shuffle=fixed["shuffle"],
            seed=fixed["seed"],
        )
        for world_size, num_nodes, workers, batch_size, drop_last in itertools.product(
            grid["world_sizes"], grid["num_nodes"], grid["workers"], grid["batch_sizes"], grid["drop_last"]
        )
        if world_size % num_nodes == 0
    ]
    if not topologies:
        pytest.fail(
            f"@pytest.mark.{MARKER} on {node} gives no job: no world size in {grid['world_sizes']} is a multiple of a "
            f"node count in {grid['num_nodes']}.",
            pytrace=False,
        )
    return topologies
