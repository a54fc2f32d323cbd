"""Relations are kept in the store: a restart reuses those still exact and rebuilds only classes that grew."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import broker_server.relations as relations_module
from broker_server import CacheService
from broker_server.store import MemoryStore, SqliteStore, StateStore
from fedwire import Fetch, HelloAck, RegisterAck
from tests.test_handlers import CLASSES, hello, register


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_store_keeps_the_newest_committed_relation(kind: str, tmp_path: Path) -> None:
    store: StateStore = MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "s.sqlite3")
    rows = np.array([1, 4, 6], np.int64)
    first = np.array([[4, 6], [1, 6], [1, 4]], np.int64)
    store.save_relation(label=2, rows=rows, neighbour_rows=first)
    store.save_relation(label=2, rows=rows, neighbour_rows=first[:, ::-1])  # the later one wins
    store.commit()
    ((stored_rows, stored_table),) = store.load_relations().values()
    np.testing.assert_array_equal(stored_rows, rows)
    np.testing.assert_array_equal(stored_table, first[:, ::-1])
    store.close()


def _register_devices(service: CacheService, numbers: range) -> None:
    for number in numbers:
        device = f"dev{number}"
        assert isinstance(service.handle(hello(device)), HelloAck)
        assert isinstance(service.handle(register(device, number)), RegisterAck)


def test_restart_reuses_stored_relations_and_rebuilds_only_grown_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with CacheService.open(data, neighbours=4) as service:
        _register_devices(service, range(2))
        service.handle(Fetch(device="dev0", cid=9, ids=np.arange(7, 7 + 3 * 40, 3, dtype=np.uint32)))
        service.commit()
        table = service.cache.relations.table.copy()
    assert (table >= 0).all()

    built: list[int] = []
    real_build = relations_module.build_class_neighbours

    def counting_build(hashes: np.ndarray, **kwargs: object) -> np.ndarray:
        built.append(len(hashes))
        return real_build(hashes, **kwargs)

    monkeypatch.setattr(relations_module, "build_class_neighbours", counting_build)
    with CacheService.open(data, neighbours=4) as service:
        assert built == []  # every class came back from the store
        np.testing.assert_array_equal(service.cache.relations.table, table)
        _register_devices(service, range(2, 3))  # a late device adds rows to (some) classes
        service.commit()
        grown = set(np.unique(service.cache.labels[table.shape[0] :]).tolist())
    with CacheService.open(data, neighbours=4) as service:
        assert len(built) == len(grown)  # only the classes that gained rows were rebuilt
        assert not service.cache.relations.dirty
    with CacheService.open(data, neighbours=5) as service:  # another R: nothing stored fits
        assert len(built) == len(grown) + CLASSES
