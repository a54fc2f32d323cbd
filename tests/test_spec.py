"""Trial files: the shipped scenarios parse into what they say; bad files fail early, naming the key."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest

from android_harness import __main__ as cli
from android_harness.__main__ import SCENARIOS
from android_harness.spec import SpecError, load_spec, parse_spec
from android_harness.trial import _device_configs, _server_command
from fedwire.mqtt import BrokerAddress

SHIPPED = ("steady", "flaky_links", "server_crash", "broker_restart", "late_joiners", "secure_mixed")
MINIMAL = {"trial": {"dataset": "digits"}, "devices": [{"count": 2}]}


def _with(**changes: object) -> dict:
    """MINIMAL with top-level tables replaced (a fresh copy each time)."""
    return {"trial": dict(MINIMAL["trial"]), "devices": [dict(g) for g in MINIMAL["devices"]]} | changes


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_parses_and_states_its_invariants(name: str, tmp_path: Path) -> None:
    path = SCENARIOS / f"{name}.toml"
    spec = load_spec(path, out=tmp_path)
    assert spec.settings.dataset == "digits" and spec.settings.out == tmp_path
    assert spec.description
    comments = path.read_text()
    assert "Invariants checked" in comments and "acknowledged_updates_present" in comments
    assert (spec.faults is None) == (name in ("steady", "late_joiners"))


def test_scenarios_map_onto_settings_and_fault_plan(tmp_path: Path) -> None:
    late = load_spec(SCENARIOS / "late_joiners.toml", out=tmp_path).settings
    assert late.devices == 4 and late.start_after_s == (0.0, 0.0, 4.0, 8.0) and late.late_joiners == (2, 3)
    assert late.archs == ("cnn", "cnn", "cnn", "resnet8")
    flaky = load_spec(SCENARIOS / "flaky_links.toml", out=tmp_path)
    assert flaky.settings.netns is True
    assert flaky.faults is not None and flaky.faults.loss == 0.3
    assert flaky.faults.offline_fractions == tuple((i, 0.3) for i in range(4))
    assert flaky.faults.touches_links and flaky.faults.has_outages
    crash = load_spec(SCENARIOS / "server_crash.toml", out=tmp_path).faults
    assert crash is not None and crash.server_kill_at_s == (2.0,) and crash.server_down_s == 3.0


def test_groups_outages_server_and_broker_keys(tmp_path: Path) -> None:
    data = _with(
        devices=[
            {"count": 2, "arch": "resnet8", "backend": "executorch"},
            {"count": 1, "outages": [[1, 2.5], [10, 1]], "start_after_s": 3},
        ],
        server={"neighbours": 8},
        broker={"url": "mqtt://10.0.0.5:1884"},
    )
    spec = parse_spec(data, out=tmp_path)
    settings = spec.settings
    assert settings.archs == ("resnet8", "resnet8", "cnn")
    assert settings.backends == ("executorch", "executorch", "torch")
    assert settings.neighbours == 8 and settings.broker_url == "mqtt://10.0.0.5:1884"
    assert spec.faults is not None and spec.faults.outages == ((2, 1.0, 2.5), (2, 10.0, 1.0))
    assert parse_spec(_with(), out=tmp_path).faults is None  # no faults asked for: a steady trial


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(trial={"dataset": "digits", "epoch": 3}), "[trial]: unknown key(s) ['epoch']"),
        (_with(trial={"dataset": "cifar"}), "[trial].dataset: 'cifar' is not one of"),
        (_with(trial={"dataset": "digits", "epochs": 0}), "[trial].epochs: 0 must be >= 1"),
        (_with(trial={"dataset": "digits", "alpha": "high"}), "[trial].alpha: 'high' is not a number"),
        (_with(trial={"dataset": "digits", "algorithm": "sgd"}), "[trial].algorithm: 'sgd' is not one of"),
        (_with(trial={"dataset": "digits", "algorithm": "local"}, faults={"loss": 0.1}), "a networked algorithm"),
        (_with(devices=[{"count": 1, "target": "ssh"}]), "python -m android_harness flash"),
        (_with(devices=[{"count": 1, "target": "adb:emulator-5554"}]), "ssh/adb targets are run with"),
        (_with(devices=[{"count": 1, "target": "cloud"}]), "[[devices]] #1.target: 'cloud' is not one of"),
        (_with(devices=[{"count": 1, "backend": "tflite"}]), "[[devices]] #1.backend"),
        (_with(devices=[{"count": 1}, {"count": 1, "colour": 1}]), "[[devices]] #2: unknown key(s) ['colour']"),
        (_with(devices=[{"arch": "cnn"}]), "[[devices]] #1.count: required"),
        (_with(devices=[{"count": 1, "outages": [[5]]}]), "[[devices]] #1.outages: [5] is not"),
        (_with(devices=[{"count": 1, "offline_fraction": 1.5}]), "[[devices]] #1.offline_fraction"),
        (_with(devices=[{"count": 1, "start_after_s": 2}]), "at least one device must start at 0"),
        (_with(devices=[{"count": 1, "target": "netns"}, {"count": 1}]), "all groups must share one target"),
        (_with(devices=[]), "at least one device group is required"),
        (_with(faults={"loss": 1.0}), "[faults].loss: 1.0 is not a drop probability"),
        (_with(faults={"server_kill_at_s": ["soon"]}), "[faults].server_kill_at_s"),
        (_with(faults={"kill": 1}), "[faults]: unknown key(s) ['kill']"),
        (_with(server={"neighbors": 8}), "[server]: unknown key(s) ['neighbors']"),
        (_with(broker={"url": "http://x"}), "[broker].url: unsupported broker URL scheme"),
        (_with(broker={"url": "mqtt://h:1"}, faults={"broker_restart_at_s": [1]}), "cannot restart an external"),
        (_with(devices=[{"count": 1, "target": "netns"}], broker={"url": "mqtt://h:1"}), "private broker"),
        ({"devices": [{"count": 1}]}, "[trial]: this table is required"),
        (_with(extra={"x": 1}), "the top level: unknown key(s) ['extra']"),
    ],
)
def test_bad_specs_are_rejected_naming_the_key(data: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(data, out=tmp_path)
    assert message in str(caught.value)


def test_load_spec_names_the_file_on_bad_toml_and_bad_keys(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[trial\n")
    with pytest.raises(SpecError, match=r"broken\.toml: not valid TOML"):
        load_spec(broken, out=tmp_path)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[trial]\ndataset = "digits"\n[[devices]]\ncount = 1\nspeed = 3\n')
    with pytest.raises(SpecError, match=r"unknown\.toml: \[\[devices\]\] #1: unknown key"):
        load_spec(unknown, out=tmp_path)
    assert tomllib.loads(unknown.read_text())["devices"][0]["speed"] == 3  # valid TOML, rejected by the spec


def test_server_section_reaches_the_server_command_line(tmp_path: Path) -> None:
    settings = parse_spec(_with(server={"neighbours": 8}), out=tmp_path).settings
    command = _server_command(settings, BrokerAddress("127.0.0.1", 1883))
    assert command[command.index("--neighbours") + 1] == "8"
    assert "--neighbours" not in _server_command(parse_spec(_with(), out=tmp_path).settings, BrokerAddress("h", 1))


def test_scenario_command_prints_verdicts_and_fails_on_a_failed_invariant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = []
    fake = {
        "algorithm": "fedcache", "maua": 0.5, "epochs": 1, "wall_s": 1.0,
        "bytes": {"register_up": 0, "up": 0, "down": 0}, "bytes_per_device_per_epoch": {"up": 0, "down": 0},
        "invariants": {"table_equals_replay": {"ok": True, "detail": "fine"},
                       "acknowledged_updates_present": {"ok": False, "detail": "3 missing"}},
    }  # fmt: skip
    monkeypatch.setattr(cli, "run_trial", lambda settings, faults: ran.append((settings, faults)) or fake)
    assert cli.main(["scenario", "server_crash", "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    assert "PASS table_equals_replay" in printed and "FAIL acknowledged_updates_present: 3 missing" in printed
    assert "FAIL: 1 of 2 invariants hold" in printed
    assert ran[0][1] is not None and ran[0][1].server_kill_at_s == (2.0,)
    fake["invariants"]["acknowledged_updates_present"]["ok"] = True
    assert cli.main(["trial", "--spec", str(SCENARIOS / "steady.toml"), "--out", str(tmp_path)]) == 0
    assert "PASS: 2 of 2 invariants hold" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="shipped scenarios: broker_restart, flaky_links"):
        cli.main(["scenario", "no_such_scenario"])


def test_partition_reaches_every_device_config_from_the_file_and_the_command_line(tmp_path: Path) -> None:
    assert parse_spec(_with(), out=tmp_path).settings.partition == "dirichlet"
    chosen = parse_spec(_with(trial={"dataset": "digits", "partition": "dirichlet-per-class"}), out=tmp_path)
    assert chosen.settings.partition == "dirichlet-per-class"
    configs = _device_configs(chosen.settings, BrokerAddress("h", 1), tmp_path / "encoder.onnx")
    assert [c.data.partition for c in configs] == ["dirichlet-per-class"] * 2
    with pytest.raises(SpecError, match=r"\[trial\]\.partition: 'iid' is not one of"):
        parse_spec(_with(trial={"dataset": "digits", "partition": "iid"}), out=tmp_path)
    parser = argparse.ArgumentParser()
    cli._add_trial_options(parser, epochs=1, devices=2)
    flagged = cli._settings(parser.parse_args(["--partition", "dirichlet-per-class"]), algorithm="local", out=tmp_path)
    assert flagged.partition == "dirichlet-per-class"
    assert cli._settings(parser.parse_args([]), algorithm="local", out=tmp_path).partition == "dirichlet"
