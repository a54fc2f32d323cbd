"""The comparison benchmark's arithmetic: MAUA against cumulative bytes, bytes to a target and speed-ups."""

from __future__ import annotations

from pathlib import Path

from bench.comparison import Outcome, bytes_curve, bytes_to_target, comparison_rows, default_target, plot


def _metrics(device: str, t: float, accuracy: float, up: int, down: int) -> dict:
    return {
        "device": device,
        "trial_time_s": t,
        "accuracy": accuracy,
        "bytes": {"up": up, "down": down, "register_up": 9},
    }


def test_curve_starts_once_every_device_reported_and_sums_latest_totals() -> None:
    history = [
        _metrics("b", 2.0, 0.4, 10, 20),
        _metrics("a", 1.0, 0.2, 0, 0),  # out of order on purpose: the curve follows trial time
        _metrics("a", 3.0, 0.6, 100, 50),
        _metrics("b", 4.0, 0.8, 30, 40),
    ]
    curve = bytes_curve(history, devices=2)
    assert curve == [(30, (0.2 + 0.4) / 2), (180, (0.6 + 0.4) / 2), (220, (0.6 + 0.8) / 2)]
    assert bytes_to_target(curve, 0.5) == 180
    assert bytes_to_target(curve, 0.71) is None


def _outcome(method: str, maua: float, curve: list[tuple[int, float]]) -> Outcome:
    return Outcome(
        method=method,
        maua=maua,
        training_bytes=curve[-1][0] if curve else 0,
        register_bytes=2048,
        wall_s=1.0,
        curve=curve,
    )


def test_rows_give_speed_up_against_the_costliest_method_and_plot_is_written(tmp_path: Path) -> None:
    outcomes = [
        _outcome("cheap", 0.8, [(1024, 0.5), (2048, 0.8)]),
        _outcome("costly", 0.7, [(4096, 0.6), (8192, 0.7)]),
        _outcome("local", 0.4, []),
    ]
    target = default_target(outcomes)
    assert target == 0.7  # the lowest final MAUA of the methods that communicate
    rows = {row[0]: row for row in comparison_rows(outcomes, target=target, devices=2, epochs=2)}
    assert rows["costly"][5] == "8.0" and rows["costly"][6] == "1.0x"
    assert rows["cheap"][5] == "2.0" and rows["cheap"][6] == "4.0x"
    assert rows["local"][5] == "no traffic" and rows["local"][6] == "-"
    assert rows["cheap"][4] == "2.0"  # registration shown apart
    path = tmp_path / "comparison.png"
    plot(outcomes, target=target, path=path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_method_reaches_its_own_final_maua_despite_summation_order() -> None:
    from bench.comparison import bytes_to_target

    curve = [(100, 0.25), (300, 0.5338871087705184)]
    assert bytes_to_target(curve, 0.5338871087705185) == 300  # the report summed the same accuracies in another order
    assert bytes_to_target(curve, 0.54) is None
