"""The poisoning bench's bookkeeping: who attacks, which ids are compared, and the acceptance checks' verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.poisoning import (
    ACCEPTANCE_RUNS,
    LOCAL,
    REFERENCE,
    Row,
    Run,
    Setting,
    checks,
    difference,
    plot,
    select,
    table,
    trial_settings,
    trust_order,
)

SETTING = Setting(dataset="digits", devices=5, epochs=2, archs=("cnn", "resnet8"), max_samples=0, eval_every=1)


def _report(accuracies: list[float], *, attackers: int = 0, deviations: list[float] | None = None) -> dict[str, Any]:
    ids = [f"dev{i:03d}" for i in range(len(accuracies))]
    report: dict[str, Any] = {
        "devices": [
            {"id": name, "arch": ("cnn", "resnet8")[i % 2], "accuracy": acc}
            for i, (name, acc) in enumerate(zip(ids, accuracies, strict=True))
        ],
        "attackers": ids[len(ids) - attackers :] if attackers else [],
    }
    if deviations is not None:
        entries = {
            name: {"deviation": d, "trust": 0.0 if d > 3.5 else 1.0} for name, d in zip(ids, deviations, strict=True)
        }
        report["defences"] = {"devices": entries}
    return report


def test_the_last_devices_attack_with_the_runs_knobs_and_local_has_no_defences(tmp_path: Path) -> None:
    run = Run("x", "pcfdla", 0.4, "on", options={"shift": 40.0})
    settings = trial_settings(run, SETTING, seed=3, out=tmp_path)
    assert settings.attacks == ("", "", "", "pcfdla", "pcfdla") and settings.attackers == (3, 4)
    assert settings.attack_options == {"shift": 40.0} and settings.defences == "on" and settings.seed == 3
    assert "max_samples" not in settings.extra_train  # 0 = whole shards
    local = trial_settings(Run(LOCAL, algorithm="local"), SETTING, seed=0, out=tmp_path)
    assert local.defences is None and local.attackers == ()
    assert Run("h", "hub", 0.5).attackers(20) == 1 and Run("p", "pcfdla", 0.01).attackers(20) == 1
    assert Run("p", "pcfdla", 0.2).options == {"shift": 100.0}  # the strengthened PCFDLA unless told otherwise


def test_honest_maua_is_compared_over_the_same_device_ids() -> None:
    reference = Row(Run(REFERENCE), {0: _report([0.8, 0.8, 0.8, 0.2, 0.2])})
    attacked = Row(Run("a", "fdla", 0.4, "on"), {0: _report([0.7, 0.7, 0.7, 0.1, 0.1], attackers=2)})
    # Over dev000-dev002 the reference has 0.8: the attacked run is 10 points lower, not 10 points higher
    # than the reference's all-device mean (0.56).
    assert difference(attacked, reference) == pytest.approx(-10.0)
    assert difference(attacked, reference, arch="cnn") == pytest.approx(-10.0)


def test_checks_pass_and_fail_on_their_thresholds() -> None:
    honest = [0.8, 0.8, 0.8, 0.8, 0.8]
    rows = {
        REFERENCE: Row(Run(REFERENCE), {0: _report(honest)}),
        "none-on": Row(Run("none-on", defences="on"), {0: _report([0.8, 0.8, 0.8, 0.8, 0.79])}),
        LOCAL: Row(Run(LOCAL, algorithm="local"), {0: _report([0.75] * 5)}),
        "pcfdla-20-off": Row(Run("pcfdla-20-off", "pcfdla", 0.2), {0: _report([0.78] * 5, attackers=1)}),
        "fdla-20-on": Row(Run("fdla-20-on", "fdla", 0.2, "on"), {0: _report([0.795] * 5, attackers=1)}),
        "pcfdla-40-on": Row(Run("pcfdla-40-on", "pcfdla", 0.4, "on"), {0: _report([0.74] * 5, attackers=2)}),
        "pcfdla-20-on-e2": Row(
            Run("pcfdla-20-on-e2", "pcfdla", 0.2, "on", epochs=2),
            {0: _report(honest, attackers=1, deviations=[0.1, 0.5, 1.0, 0.2, 4.0])},
        ),
        "adaptive-20-on-e2": Row(
            Run("adaptive-20-on-e2", "adaptive", 0.2, "on", epochs=2),
            {0: _report(honest, attackers=1, deviations=[0.1, 2.5, 1.0, 0.2, 2.0])},
        ),
    }
    verdicts = {(c.number, c.text.split(":")[0]): c.passed for c in checks(rows, None)}
    assert verdicts[(1, "defences off, PCFDLA 20 %")] is False  # 2 points, not 3
    assert verdicts[(2, "defences on, fdla 20 %")] is True  # 0.5 point below
    assert verdicts[(2, "defences on, fdsa 20 %")] is None  # not run
    assert verdicts[(3, "defences on, no attack")] is True  # 0.2 point
    assert verdicts[(4, "defences on, PCFDLA 40 %")] is False  # below local
    assert verdicts[(7, "pcfdla-20-on-e2")] is True
    assert verdicts[(7, "adaptive-20-on-e2")] is False  # one honest device ranks below the attacker
    order = trust_order(rows["pcfdla-20-on-e2"].reports[0])
    assert order == {"attacker_min_deviation": 4.0, "honest_max_deviation": 1.0, "attackers_untrusted": 1}


def test_acceptance_6_is_judged_on_the_copying_attacker_beside_the_centre_copy_hub() -> None:
    def attacked(share: float, *, slots: int, crafted: float, real: float) -> dict[str, Any]:
        return {"honest_rows_with_half_or_more": share, "attacker_slots_median": 8.0, "attacker_slots_max": slots,
                "crafted_flagged": crafted, "real_flagged": real}  # fmt: skip

    hub = {
        "fetch_32_ids_us": {"off": {"p95": 100}, "on": {"p95": 140}},
        "relation_build_ratio": 1.05,
        "hub_defences_off": attacked(0.2, slots=16, crafted=0.0, real=0.0),
        "hub_defences_on": attacked(0.0, slots=4, crafted=0.95, real=0.003),
        "copies_defences_off": attacked(0.99, slots=16, crafted=0.0, real=0.0),
        "copies_defences_on": attacked(0.0, slots=4, crafted=0.94, real=0.02),  # too many real samples flagged
    }
    passing = dict(hub, copies_defences_on=attacked(0.0, slots=4, crafted=0.94, real=0.05) | {"honest_flagged": 0.0})
    assert [c.passed for c in checks({}, passing) if c.number == 6][:2] == [True, True]  # the attacker's own: no FP
    verdicts = [(c.text.split(",")[0], c.passed) for c in checks({}, hub) if c.number == 6]
    assert verdicts == [
        ("copies of public samples", True),
        ("copies of public samples", False),
        ("hub", False),  # the centre-copy hub's premise: 20 % of honest rows only
        ("hub", True),
    ]


def test_table_and_plot_cover_every_run(tmp_path: Path) -> None:
    rows = {
        REFERENCE: Row(Run(REFERENCE), {0: _report([0.8] * 5), 1: _report([0.7] * 5)}),
        "fdla-20-off": Row(Run("fdla-20-off", "fdla", 0.2), {0: _report([0.6] * 5, attackers=1)}),
    }
    text = table(rows, SETTING)
    assert "| fdla-20-off | fdla | 1 | off | 0 | 0.6000 |" in text
    assert "0.7500 ± 7.07" in text  # mean and sd (points) over the two seeds
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_runs_are_selected_by_name_and_unknown_names_are_refused() -> None:
    assert select("acceptance") == ACCEPTANCE_RUNS
    assert [r.name for r in select("local, none-off")] == [LOCAL, REFERENCE]
    with pytest.raises(ValueError, match="unknown runs"):
        select("none-off,nope")
