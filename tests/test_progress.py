"""A trial's progress in a log is plain lines, not a stream of carriage returns."""

from __future__ import annotations

import pytest

from android_harness.progress import PlainProgress, progress_bar


def test_plain_progress_prints_whole_lines_at_most_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    bar = PlainProgress(total=6, desc="fedcache device-epochs", every_s=3600.0)
    bar.update(2)
    bar.set_postfix(maua="0.5000")
    bar.update(1)
    assert capsys.readouterr().err == ""  # the interval has not passed
    bar.close()
    err = capsys.readouterr().err
    assert err == "fedcache device-epochs: 3/6 maua 0.5000 (0 s)\n"
    assert "\r" not in err


def test_a_log_gets_plain_lines_and_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(progress_bar(total=1, desc="x", enabled=True), PlainProgress)  # pytest's stderr is no tty
    quiet = progress_bar(total=1, desc="x", enabled=False)
    quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""
