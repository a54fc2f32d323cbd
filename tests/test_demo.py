"""The demo end to end on digits: two real trials (FedCache, local) on one capped split, its table and its page."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from pathlib import Path

import pytest

from android_harness.demo import add_demo_parser, closing_lines, device_gains, run_demo
from android_harness.report import maua_by_epoch

DEVICES = 3
EPOCHS = 2
CAP = 60


def _args(out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(
        ["demo", "--out", str(out), "--dataset", "digits", "--devices", str(DEVICES), "--epochs", str(EPOCHS),
         "--archs", "cnn", "--max-samples", str(CAP), "--eval-every", str(EPOCHS), "--timeout", "300"]
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict], str, str]:
    out = tmp_path_factory.mktemp("demo")
    capture = pytest.MonkeyPatch()
    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)  # not a terminal: progress must come as plain lines
    try:
        status = run_demo(_args(out))
    finally:
        capture.undo()
    assert status == 0, stdout.getvalue()
    reports = {m: json.loads((out / m / "report.json").read_text()) for m in ("fedcache", "local")}
    return out, reports, stdout.getvalue(), stderr.getvalue()


def test_both_methods_ran_on_the_same_capped_split_with_the_same_models(demo: tuple) -> None:
    _, reports, _, _ = demo
    fedcache, local = reports["fedcache"], reports["local"]
    assert fedcache["algorithm"] == "fedcache" and local["algorithm"] == "local"
    for report in reports.values():
        assert report["epochs"] == EPOCHS and len(report["devices"]) == DEVICES
        assert all(d["train_samples"] == CAP for d in report["devices"])  # train.max_samples through a real trial
    assert [(d["id"], d["arch"], d["test_samples"]) for d in fedcache["devices"]] == [
        (d["id"], d["arch"], d["test_samples"]) for d in local["devices"]
    ]
    assert fedcache["bytes"]["down"] > 0 and local["bytes"]["up"] == local["bytes"]["down"] == 0
    # Before any training both start from the same weights on the same test splits: equal epoch-0 MAUA.
    assert maua_by_epoch(fedcache)[0] == maua_by_epoch(local)[0]
    assert [e for e, _ in maua_by_epoch(fedcache)] == [0, EPOCHS]  # evaluated before training and after the last


def test_closing_lines_are_the_table_the_gain_and_one_page(demo: tuple) -> None:
    out, reports, stdout, stderr = demo
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"page: {out / 'demo.html'}"
    table = lines[-5:-1]
    assert table == closing_lines(reports)
    assert table[0].split()[:2] == ["method", "MAUA"] and table[0].split()[-1] == "wall"
    assert table[1].startswith("fedcache") and f"{reports['fedcache']['maua']:.4f}" in table[1] and "KiB" in table[1]
    assert table[2].startswith("local") and "0 (no traffic)" in table[2]
    gain = 100 * (reports["fedcache"]["maua"] - reports["local"]["maua"])
    assert table[3].startswith(f"FedCache - local: {gain:+.2f} MAUA points after {EPOCHS} epochs")
    assert "\r" not in stdout and "\r" not in stderr  # a log gets whole lines, no carriage-return redraws
    assert re.search(r"fedcache device-epochs: \d+/\d+", stderr) and "== 2/2 local" in stderr


def test_the_page_puts_both_methods_side_by_side(demo: tuple) -> None:
    out, reports, _, _ = demo
    page = (out / "demo.html").read_text()
    for method, report in reports.items():
        assert f"{report['maua']:.4f}" in page
        assert f'href="{method}/report.html"' in page and (out / method / "report.html").exists()
    for device, arch, gain in device_gains(reports):
        assert f'<td class="text">{device}</td><td class="text">{arch}</td>' in page and f"{gain:+.2f}" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3  # both MAUA curves, per-device gains, FedCache's bytes
    assert all(base64.b64decode(image).startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "imports" in page and "first_report" in page  # the start-up table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fedcache"]["maua"] == reports["fedcache"]["maua"]
    assert [tuple(p) for p in summary["local"]["maua_by_epoch"]] == maua_by_epoch(reports["local"])
