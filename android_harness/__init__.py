"""Drives FedCache from outside: local trials of broker, server and device processes, and their reports."""

from android_harness.trial import TrialSettings, run_trial

__all__ = ["TrialSettings", "run_trial"]
