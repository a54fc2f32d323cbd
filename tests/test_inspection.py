"""`python broker_server/main.py inspect`: the harness's read-only view of a server's durable state."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import broker_server
from broker_server import STORE_FILENAME, CacheService
from fedwire import Update
from tests.test_handlers import REGISTERED, hello, logits_for, register, samples_of

MAIN = Path(broker_server.__file__).resolve().parent / "main.py"
REPO = MAIN.parent.parent


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(MAIN), "inspect", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_inspect_prints_each_devices_versions_and_logit_digests_without_writing(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    ids = samples_of(0)[0]
    some = ids[[5, 2, 9]]
    logits = logits_for(some.size, 3)
    with CacheService.open(data_dir / "state", neighbours=4) as service:
        for number in range(2):
            service.handle(hello(f"dev{number}"))
            service.handle(register(f"dev{number}", number))
        service.handle(Update(device="dev0", cid=3, ids=some, logits=logits, version=6))
        service.commit()
        service.handle(Update(device="dev1", cid=4, ids=ids, logits=logits_for(REGISTERED, 4), version=1))
    database = (data_dir / "state" / STORE_FILENAME).read_bytes()

    done = inspect("--data-dir", str(data_dir), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["classes"], report["samples"], report["with_knowledge"]) == (4, 2 * REGISTERED, some.size)
    dev0, dev1 = report["devices"]["dev0"], report["devices"]["dev1"]
    order = np.argsort(some)
    assert dev0["registered"] == REGISTERED and dev0["ids"] == some[order].tolist()
    assert dev0["versions"] == [6, 6, 6]
    assert dev0["digests"] == [hashlib.sha256(row.astype("<f4").tobytes()).hexdigest() for row in logits[order]]
    assert dev1["registered"] == REGISTERED and dev1["ids"] == []  # its update was never committed
    assert (data_dir / "state" / STORE_FILENAME).read_bytes() == database

    only = json.loads(inspect("--data-dir", str(data_dir), "--json", "--logits", "--device", "dev0").stdout)
    assert list(only["devices"]) == ["dev0"]
    np.testing.assert_array_equal(np.array(only["devices"]["dev0"]["logits"], np.float32), logits[order])

    summary = inspect("--data-dir", str(data_dir))
    assert summary.returncode == 0 and "dev0: model m, registered 40 of 48, 3 holding knowledge" in summary.stdout


def test_inspect_without_state_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = inspect("--data-dir", str(tmp_path / "nothing"), "--json")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no state store" in done.stderr
