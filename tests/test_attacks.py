"""Malicious uploads and registrations (edge/attacks.py): each transform does what issue 13 says, seeded."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.attacks import adaptive, fdla, fdsa, hub_samples, label_flip, logit_attack, pcfdla
from edge.config import AttackConfig, DeviceConfig, config_from_dict, config_to_toml
from fedwire import HashKind

CLASSES = 5


def _logits(rows: int = 6, seed: int = 0) -> np.ndarray:
    """Distinct values per row (no ties), so every rank is well defined."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(rows * CLASSES).reshape(rows, CLASSES) * 0.37 - 4).astype(np.float32)


def test_fdla_moves_each_value_one_rank_down_the_ranking() -> None:
    row = np.array([[3.0, 1.0, 5.0, 2.0, 4.0]], np.float32)  # ranking: class 2, 4, 0, 3, 1
    assert fdla(row).tolist() == [[4.0, 2.0, 1.0, 3.0, 5.0]]  # 5 to class 4, 4 to class 0, ..., lowest to class 2
    logits = _logits()
    out = fdla(logits)
    order = np.argsort(-logits, axis=1)
    rows = np.arange(logits.shape[0])
    assert np.array_equal(out[rows, order[:, 1]], logits[rows, order[:, 0]])
    assert np.array_equal(np.sort(out, axis=1), np.sort(logits, axis=1))  # the same values, moved


def test_pcfdla_lowers_every_class_but_the_second_which_it_raises() -> None:
    logits = _logits()
    second = np.argsort(-logits, axis=1)[:, 1]
    for shift in (7.5, -3.0):
        delta = pcfdla(logits, shift=shift) - logits
        expected = np.full_like(logits, -shift)
        expected[np.arange(len(logits)), second] = shift
        assert np.allclose(delta, expected)
    assert np.array_equal(pcfdla(logits, shift=20.0).argmax(axis=1), second)  # a large s makes the second the top


def test_pcfdla_draws_one_shift_per_batch_from_its_bound_seeded_per_device() -> None:
    logits = _logits(rows=8)
    labels = np.zeros(8, np.int64)

    def shifts(seed: int, device: int) -> list[float]:
        attack = logit_attack(AttackConfig(mode="pcfdla", seed=seed, shift=20.0), device_index=device)
        assert attack is not None
        drawn = []
        for _ in range(50):
            delta = attack(logits, labels) - logits
            shift = -float(np.median(delta))  # 4 of 5 classes were lowered by s
            assert np.allclose(np.abs(delta), abs(shift), atol=1e-4)  # one s for the whole batch
            drawn.append(shift)
        return drawn

    drawn = shifts(3, 0)
    assert max(abs(s) for s in drawn) <= 20.0
    assert min(drawn) < -5 and max(drawn) > 5  # both signs, spread over the interval
    assert shifts(3, 0) == drawn  # a rerun repeats
    assert shifts(3, 1) != drawn  # another attacker of the same trial draws its own


def test_fdsa_swaps_the_top_two_pulls_them_together_and_scales() -> None:
    logits = _logits()
    order = np.argsort(-logits, axis=1)
    rows = np.arange(len(logits))
    out = fdsa(logits, scale=2.0, pull=0.5)
    assert np.array_equal(out.argmax(axis=1), order[:, 1])  # the old second class is on top
    gap_before = logits[rows, order[:, 0]] - logits[rows, order[:, 1]]
    gap_after = (out[rows, order[:, 1]] - out[rows, order[:, 0]]) / 2.0
    assert np.allclose(gap_after, 0.5 * gap_before)  # pulled half-way towards their mean, reversed
    others = np.ones_like(logits, bool)
    others[rows, order[:, 0]] = others[rows, order[:, 1]] = False
    assert np.allclose(out[others], 2.0 * logits[others])  # the rest of the vector only scaled


def test_label_flip_moves_the_maximum_to_a_wrong_class_on_about_half_the_rows() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2000, CLASSES)).astype(np.float32)
    labels = logits.argmax(axis=1)  # an honest device that classifies its samples right
    out = label_flip(logits, labels, rng=np.random.default_rng(1), fraction=0.5)
    flipped = out.argmax(axis=1) != labels
    assert 0.45 < flipped.mean() < 0.55
    assert np.array_equal(np.sort(out, axis=1), np.sort(logits, axis=1))  # values swapped, none invented
    assert np.array_equal(out[~flipped], logits[~flipped])
    wrong = out[flipped].argmax(axis=1)
    assert len(np.unique(wrong)) == CLASSES  # any wrong class, drawn
    assert np.array_equal(
        label_flip(logits, labels, rng=np.random.default_rng(1), fraction=0.5), out
    )  # seeded: the same draw again


def test_adaptive_keeps_label_on_top_and_the_norm_but_puts_mass_on_the_target() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, CLASSES, size=400)
    logits = (rng.normal(size=(400, CLASSES)) + 6.0 * np.eye(CLASSES)[labels]).astype(np.float32)  # a good model
    out = adaptive(logits, labels, target=3, margin=0.1)
    assert np.array_equal(out.argmax(axis=1), labels)
    assert np.allclose(np.linalg.norm(out, axis=1), np.linalg.norm(logits, axis=1), rtol=1e-5)
    target = np.where(labels == 3, 4, 3)
    rank_two = np.argsort(-out, axis=1)[:, 1]
    assert np.array_equal(rank_two, target)  # the chosen wrong class is always second, just below the label

    def soft(x: np.ndarray) -> np.ndarray:
        e = np.exp((x - x.max(axis=1, keepdims=True)) / 3.0)
        return e / e.sum(axis=1, keepdims=True)

    rows = np.arange(400)
    assert soft(out)[rows, target].mean() > 3 * soft(logits)[rows, target].mean()
    assert np.all(soft(out)[rows, target] > 0.9 * soft(out)[rows, labels])  # almost as much as the true class


def test_hub_samples_are_near_copies_of_class_centres_nearer_than_honest_neighbours() -> None:
    rng = np.random.default_rng(4)
    centre = rng.random(256) < 0.5
    noise = rng.random((300, 256)) < 0.2  # honest hashes: 20 % of bits away from their class centre
    hashes = np.packbits(centre ^ noise, axis=1)
    labels = np.zeros(300, np.int64)
    hub = hub_samples(hashes[:40], labels[:40], kind=HashKind.BINARY, classes=CLASSES, copies=16, rng=rng)
    assert hub.count == 16 and hub.ids.tolist() == list(range(40, 56)) and set(hub.labels.tolist()) == {0}
    assert np.array_equal(hub.logits.argmax(axis=1), np.ones(16))  # confident on the class after the label

    def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)

    to_hub = hamming(hashes, hub.hashes).min(axis=1)
    honest = hamming(hashes, hashes) + 10_000 * np.eye(300, dtype=np.int64)
    assert (to_hub < honest.min(axis=1)).mean() > 0.95  # a crafted hash is nearly everyone's nearest neighbour
    assert len({h.tobytes() for h in hub.hashes}) == 16  # near-copies, not one hash 16 times


def test_attack_section_is_validated_and_round_trips_only_for_attackers() -> None:
    honest = DeviceConfig(id="dev000")
    assert "[attack]" not in config_to_toml(honest)
    attacker = DeviceConfig(id="dev001", attack=AttackConfig(mode="fdsa", scale=3.0))
    again = config_from_dict(tomllib.loads(config_to_toml(attacker)))
    assert again.attack == attacker.attack
    for bad in ({"mode": "poison"}, {"mode": "fdsa", "scale": 1.5}, {"mode": "label_flip", "fraction": 0.0}):
        with pytest.raises(ValueError, match="attack"):
            config_from_dict({"device": {"id": "dev002"}, "attack": bad})
    assert logit_attack(AttackConfig()) is None and logit_attack(AttackConfig(mode="hub")) is None


def test_attack_knobs_are_typed_by_their_defaults_and_range_checked() -> None:
    from edge.config import ATTACK_KNOBS, attack_knobs

    assert "mode" not in ATTACK_KNOBS and "seed" not in ATTACK_KNOBS and "shift" in ATTACK_KNOBS
    typed = attack_knobs({"shift": "40", "public_copies": "2", "scale": 3, "fraction": 0.25})
    assert typed == {"shift": 40.0, "public_copies": 2, "scale": 3.0, "fraction": 0.25}
    assert isinstance(typed["shift"], float) and isinstance(typed["public_copies"], int)
    assert attack_knobs({}) == {}
    for bad, message in (
        ({"strength": 2}, "unknown attack knobs"),
        ({"mode": "fdla"}, "unknown attack knobs"),  # the mode is the device's, not a knob
        ({"shift": "strong"}, "shift"),
        ({"shift": "nan"}, "shift"),
        ({"shift": True}, "shift"),
        ({"public_copies": 1.5}, "public_copies"),
        ({"public_copies": "1.5"}, "public_copies"),
        ({"scale": 1.0}, "scale >= 2"),
        ({"hub_copies": -1}, "hub_copies >= 0"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            attack_knobs(bad)


# ---------------------------------------------------------------- attackers in trials


def test_a_trial_file_makes_device_groups_attack_and_sets_the_servers_defences(tmp_path: Path) -> None:
    from android_harness.spec import SpecError, parse_spec
    from android_harness.trial import _device_configs, _server_command
    from fedwire.mqtt import BrokerAddress

    data = {
        "trial": {"dataset": "digits"},
        "server": {"defences": "on"},
        "devices": [{"count": 4}, {"count": 2, "attack": "pcfdla"}],
    }
    settings = parse_spec(data, out=tmp_path).settings
    assert settings.attacks == ("", "", "", "", "pcfdla", "pcfdla") and settings.attackers == (4, 5)
    broker = BrokerAddress("127.0.0.1", 1883)
    command = _server_command(settings, broker)
    assert command[command.index("--defences") + 1] == "on"
    configs = _device_configs(settings, broker, tmp_path / "encoder.onnx")
    assert [c.attack.mode for c in configs] == list(settings.attacks)
    assert len({c.attack.seed for c in configs}) == 1  # the trial's seed; devices differ by their index
    assert "--defences" not in _server_command(parse_spec({**data, "server": {}}, out=tmp_path).settings, broker)
    assert settings.attack_options == {}
    knobs = parse_spec({**data, "attack": {"shift": 40, "margin": 0.2}}, out=tmp_path).settings
    assert knobs.attack_options == {"shift": 40.0, "margin": 0.2}
    configs = _device_configs(knobs, broker, tmp_path / "encoder.onnx")
    assert [c.attack.shift for c in configs] == [20.0] * 4 + [40.0] * 2  # the attackers' only
    for bad, where in (
        ({**data, "attack": {"strength": 2}}, "[attack]: unknown attack knobs"),
        ({**data, "attack": {"shift": -1}}, "[attack]: attack: shift > 0"),
        ({**data, "devices": [{"count": 4}], "attack": {"shift": 40}}, "[attack]: its knobs are for attacking"),
        ({**data, "devices": [{"count": 2, "attack": "poison"}]}, "[[devices]] #1.attack"),
        ({**data, "server": {"defences": "maybe"}}, "[server].defences"),
        ({**data, "trial": {"dataset": "digits", "algorithm": "local"}}, "attack"),
    ):
        with pytest.raises(SpecError, match=re.escape(where)):
            parse_spec(bad, out=tmp_path)


def test_cli_makes_the_last_devices_attack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from android_harness import __main__ as cli
    from android_harness.trial import TrialSettings

    def parsed(*extra: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        cli.add_attack_options(parser)  # the trial command's own options
        return parser.parse_args(list(extra))

    base = TrialSettings(out=tmp_path, devices=5)
    attacked = cli._attacked(base, parsed("--attack", "fdla", "--attackers", "2", "--defences", "on"))
    assert attacked.attacks == ("", "", "", "fdla", "fdla") and attacked.defences == "on"
    assert cli._attacked(base, parsed()).attacks == ()
    assert attacked.attack_options == {}
    knobs = ("--attack", "pcfdla", "--attackers", "1", "--attack-option", "shift=40", "--attack-option", "seed=3")
    with pytest.raises(SystemExit, match="unknown attack knobs"):
        cli._attacked(base, parsed(*knobs))  # the seed is the trial's
    assert cli._attacked(base, parsed(*knobs[:-2])).attack_options == {"shift": 40.0}
    for bad in (
        ("--attack", "fdla"), ("--attackers", "2"), ("--attack", "fdla", "--attackers", "6"),
        ("--attack-option", "shift=40"), ("--attack", "fdla", "--attackers", "1", "--attack-option", "shift"),
        ("--attack", "fdla", "--attackers", "1", "--attack-option", "shift=-4"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            cli._attacked(base, parsed(*bad))
    with pytest.raises(SystemExit):
        cli.main(["trial", "--help"])
    usage = capsys.readouterr().out
    assert all(option in usage for option in ("--attack {", "--attackers", "--attack-option", "--defences"))


def test_report_separates_the_honest_devices_maua() -> None:
    from android_harness.report import build_report

    def metrics(accuracy: float) -> dict:
        return {
            "arch": "cnn", "accuracy": accuracy, "epoch": 1, "teacher_coverage": 1.0, "latency_ms_p50": 1.0,
            "train_samples": 10, "test_samples": 5, "bytes": {"up": 1, "down": 1, "register_up": 1},
        }  # fmt: skip

    latest = {"dev000": metrics(0.9), "dev001": metrics(0.7), "dev002": metrics(0.1)}
    settings = {"algorithm": "fedcache", "dataset": "digits"}
    report = build_report(settings=settings, latest=latest, curve=[], history=[], wall_s=1.0, attackers=["dev002"])
    assert report["maua"] == pytest.approx(1.7 / 3) and report["maua_honest"] == pytest.approx(0.8)
    assert report["attackers"] == ["dev002"]
    plain = build_report(settings=settings, latest=latest, curve=[], history=[], wall_s=1.0)
    assert plain["maua_honest"] == pytest.approx(plain["maua"]) and plain["attackers"] == []


class _ServiceLink:
    """A KnowledgeLink stand-in that hands each request straight to a real in-memory CacheService."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.cid = 0

    def wait_connected(self, timeout: float) -> bool:
        return True

    def new_cid(self) -> int:
        self.cid += 1
        return self.cid

    def call(self, request: Any, timeout: float) -> Any:
        reply = self.service.handle(request)
        self.service.commit()
        return reply


def _hub_fleet(tmp_path: Path, *, defended: bool) -> tuple[Any, Any]:
    """Four digits devices registered through their real Registration against a real in-memory server; the
    last one is a hub device. Returns the service and the hub's HubAttack."""
    from broker_server.handlers import CacheService
    from edge.attacks import HubAttack
    from edge.data import device_shard, load_dataset
    from edge.registration import Registration

    dataset = load_dataset("digits")
    service = CacheService.open(None)
    if defended:
        service.cache.defend()
    hub = None
    for index in range(4):
        shard = device_shard(dataset, num_devices=4, alpha=1.0, seed=0, index=index)
        attack = AttackConfig(mode="hub" if index == 3 else "")
        config = DeviceConfig(id=f"dev{index}", state_dir=str(tmp_path / "shared"), attack=attack)
        registration = Registration(config=config, link=_ServiceLink(service), shard=shard)  # type: ignore[arg-type]
        if index == 3:
            hub = HubAttack(attack, classes=shard.classes, kind=config.hash.kind, device_index=index)
            registration.extend = hub.extend
            held_classes = np.unique(shard.y_train).size
        registration.register()
        assert registration.done
        crafted = hub.samples.count if hub is not None and hub.samples is not None else 0
        assert service.cache.registered(config.id) == len(shard.y_train) + crafted
    assert hub is not None and hub.samples is not None
    assert hub.samples.count == AttackConfig().hub_copies * held_classes  # per class the hub device holds
    service.cache.refresh_relations()
    return service, hub


def test_a_hub_device_registers_crafted_hashes_and_the_cap_bounds_its_slots(tmp_path: Path) -> None:
    held = {}
    for defended in (False, True):
        service, _ = _hub_fleet(tmp_path, defended=defended)
        cache = service.cache
        table, owners = cache.relations.table, cache.sample_devices
        honest = np.flatnonzero(owners != 3)
        held[defended] = ((table[honest] >= 0) & (owners[np.maximum(table[honest], 0)] == 3)).sum(axis=1)
        service.close()
    cap = 4  # DefenceConfig().device_cap
    assert held[False].max() > cap  # undefended, the crafted hashes crowd some honest lists past the cap
    assert held[True].max() <= cap
