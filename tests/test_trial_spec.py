"""A trial run from a TOML file through the CLI on digits: a late joiner, a scheduled outage, every report file,
and report.html rendered by a real headless Chromium with every figure decoded."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from android_harness.plots import FIGURES, offline_spans

SPEC = """
[trial]
description = "test: late joiner and an outage"
dataset = "digits"
epochs = 8
timeout = 240

[server]
neighbours = 8

# The cut device is the slower model: a cnn that started first could be in its final (outage-exempt) epoch
# by the time the resnet8 reports, which is when the fault clock starts.
[[devices]]
count = 1
arch = "resnet8"
outages = [[0.5, 2.0]]

[[devices]]
count = 1
arch = "cnn"

[[devices]]
count = 1
arch = "cnn"
start_after_s = 2.0
"""


@pytest.fixture(scope="module")
def trial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("spec-trial")
    (root / "trial.toml").write_text(SPEC)
    out = root / "out"
    done = subprocess.run(
        [sys.executable, "-m", "android_harness", "trial", "--spec", str(root / "trial.toml"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), done


def test_late_joiner_is_launched_later_registers_and_gets_teachers(trial: tuple) -> None:
    _, report, done = trial
    assert report["late_joiners"] == {"dev002": 2.0}
    launches = report["launches"]
    assert launches["dev002"] >= launches["dev000"] + 2.0  # launched 2 s after the others were training
    late = next(d for d in report["devices"] if d["id"] == "dev002")
    assert late["bytes_register_up"] > 0 and late["teacher_coverage"] > 0 and late["epochs"] == 8
    for name in ("late_joiners_registered_and_taught", "acknowledged_updates_present", "table_equals_replay"):
        assert report["invariants"][name]["ok"], report["invariants"][name]
    assert all(r["ok"] for r in report["invariants"].values()), report["invariants"]
    assert "PASS late_joiners_registered_and_taught" in done.stdout
    assert re.search(r"^PASS: (\d+) of \1 invariants hold$", done.stdout, re.MULTILINE), done.stdout


def test_scheduled_outage_cuts_device_zero_only(trial: tuple) -> None:
    out, report, _ = trial
    events = report["faults"]["events"]
    assert [e["device"] for e in events if e["event"] == "link down"] == [0]
    spans = offline_spans(report, devices=["dev000", "dev001", "dev002"], end=1e9)
    assert len(spans["dev000"]) == 1 and not spans["dev001"] and not spans["dev002"]
    start, stop = spans["dev000"][0]
    assert 0 < stop - start < 30
    assert report["settings"]["neighbours"] == 8  # passed to the server as --neighbours 8 (test_spec.py)
    assert "usage:" not in (out / "logs" / "server.log").read_text()  # the server took its arguments


def test_report_files_timeseries_and_figures(trial: tuple) -> None:
    out, report, _ = trial
    assert {"algorithm", "maua", "maua_curve", "bytes", "devices"} <= report.keys()
    assert {"register_up", "up", "down"} <= report["bytes"].keys()
    with (out / "timeseries.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["history"]) > 3 * 8
    assert {r["device"] for r in rows} == {"dev000", "dev001", "dev002"}
    assert {"trial_time_s", "epoch", "accuracy", "bytes_up", "bytes_down", "offline_s", "outbox"} <= rows[0].keys()
    times = [float(r["trial_time_s"]) for r in rows]
    assert times == sorted(times)
    last = {r["device"]: r for r in rows}
    assert all(int(r["bytes_up"]) > 0 and int(r["done"]) == 1 for r in last.values())
    for name in FIGURES:
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "<link" not in page  # self-contained
    assert "late_joiners_registered_and_taught" in page and "dev002 (late)" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (scripts/setup-system.sh --test)")
def test_report_html_renders_every_figure_in_headless_chromium(trial: tuple, tmp_path: Path) -> None:
    out, _, _ = trial
    # A copy with a probe that records each image's decoded width once the page has loaded.
    probe = (
        "<script>window.addEventListener('load', () => { for (const img of document.images) "
        "img.setAttribute('data-natural-width', img.naturalWidth); "
        "document.body.setAttribute('data-loaded', 'yes'); });</script></body>"
    )
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe))
    base = [
        shutil.which("chromium") or "chromium",
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90).stdout
    assert 'data-loaded="yes"' in dom, dom[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == len(FIGURES) and all(w > 0 for w in widths), widths

    shot = tmp_path / "page.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri()],
        capture_output=True,
        timeout=90,
        check=True,
    )
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plotted figures, not a blank page


def test_trial_on_an_existing_broker_starts_none_of_its_own(tmp_path: Path) -> None:
    from android_harness.spec import parse_spec
    from android_harness.trial import run_trial
    from fedwire.mosquitto import MosquittoBroker

    with MosquittoBroker(data_dir=tmp_path / "external") as external:
        data = {
            "trial": {"dataset": "digits", "epochs": 2, "timeout": 120},
            "broker": {"url": external.address.url},
            "devices": [{"count": 2}],
        }
        spec = parse_spec(data, out=tmp_path / "out")
        report = run_trial(spec.settings, progress=False, faults=spec.faults)
        assert external.process is not None and external.process.poll() is None  # still the one broker
    assert not (tmp_path / "out" / "broker").exists()  # no private Mosquitto was started
    assert {d["epochs"] for d in report["devices"]} == {2} and report["bytes"]["up"] > 0
    assert "accuracy_recovered" not in report["invariants"]  # no fault plan: recovery is not claimed
    assert all(r["ok"] for r in report["invariants"].values()), report["invariants"]
