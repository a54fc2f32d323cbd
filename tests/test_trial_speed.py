"""The trial-speed benchmark's measuring parts (no timings): the per-sample-loop baseline computes what it claims."""

from __future__ import annotations

import numpy as np
import pytest

from bench.trial_speed import (
    Recipe,
    demo_relations,
    gather_teachers,
    run_baseline,
    training_span,
    write_back,
)


def _vectorised(
    knowledge: np.ndarray, seen: np.ndarray, table: np.ndarray, rows: np.ndarray, *, demo_teacher: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The same teachers as one gather and one mean over the (N x R) table, -1 entries masked out."""
    neighbours = table[rows]
    valid = neighbours >= 0
    safe = np.maximum(neighbours, 0)
    sums = (knowledge[safe] * valid[..., None]).sum(axis=1)
    if demo_teacher:
        fetched = valid.sum(axis=1)
        return sums / np.maximum(fetched, 1)[:, None], fetched > 0
    holders = (seen[safe] & valid).sum(axis=1)
    teacher = np.where(holders[:, None] > 0, sums / np.maximum(holders, 1)[:, None], 0.0)
    return teacher, holders > 0


@pytest.mark.parametrize("demo_teacher", [False, True])
def test_per_sample_gather_equals_vectorised_gather_and_mean(demo_teacher: bool) -> None:
    rng = np.random.default_rng(0)
    samples, classes, neighbours = 60, 10, 16
    table = rng.integers(0, samples, size=(samples, neighbours))
    table[rng.random(table.shape) < 0.1] = -1  # padding of small classes
    table[5] = -1  # a sample with no neighbour at all
    seen = rng.random(samples) < 0.5
    knowledge = np.where(seen[:, None], rng.normal(size=(samples, classes)), 0.0).astype(np.float32)
    rows = rng.permutation(samples)[:24]
    rows[0] = 5
    teacher, mask = gather_teachers(knowledge, seen, table, rows, demo_teacher=demo_teacher)
    expected, expected_mask = _vectorised(knowledge, seen, table, rows, demo_teacher=demo_teacher)
    np.testing.assert_allclose(teacher, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask, expected_mask)
    assert teacher.dtype == np.float32 and not mask[0] and not teacher[0].any()


@pytest.mark.parametrize("demo_teacher", [False, True])
def test_zero_knowledge_gives_zero_teachers(demo_teacher: bool) -> None:
    """Nothing written back yet: the demo distils towards a zero vector, ours trains CE only."""
    table = np.tile(np.arange(1, 17), (20, 1))
    knowledge = np.zeros((20, 10), np.float32)
    teacher, mask = gather_teachers(knowledge, np.zeros(20, bool), table, np.arange(4), demo_teacher=demo_teacher)
    assert not teacher.any()
    assert mask.all() if demo_teacher else not mask.any()


def test_write_back_then_gather_sees_the_new_logits() -> None:
    knowledge, seen = np.zeros((4, 3), np.float32), np.zeros(4, bool)
    write_back(knowledge, seen, np.array([1, 2]), np.array([[1, 2, 3], [3, 2, 1]], np.float32))
    table = np.array([[1, 2], [0, 2], [0, 1], [1, 3]])
    teacher, mask = gather_teachers(knowledge, seen, table, np.array([0, 3]), demo_teacher=False)
    np.testing.assert_allclose(teacher, [[2, 2, 2], [1, 2, 3]])
    assert mask.all()


def test_demo_relations_stay_within_the_class_and_skip_the_sample_itself() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 30)
    vectors = np.where(rng.random((90, 64)) < 0.5, 1.0, -1.0).astype(np.float32)
    table = demo_relations(vectors, labels, neighbours=16, seed=0)
    assert table.shape == (90, 16) and (table >= 0).all()
    assert (labels[table] == labels[:, None]).all()
    assert (table != np.arange(90)[:, None]).all()
    small = demo_relations(vectors[:5], np.zeros(5, np.int64), neighbours=16, seed=0)
    assert (small[:, :4] >= 0).all() and (small[:, 4:] == -1).all()


def test_training_span_runs_from_first_report_to_last_done() -> None:
    history = [
        {"trial_time_s": 3.0, "done": False},
        {"trial_time_s": 4.0, "done": False},
        {"trial_time_s": 9.0, "done": True},
        {"trial_time_s": 11.5, "done": True},
    ]
    assert training_span({"history": history}) == pytest.approx(8.5)
    assert training_span({"history": history[:2]}) is None


def test_baseline_epoch_on_digits_learns() -> None:
    result = run_baseline(Recipe(dataset="digits", devices=2))
    assert result.samples > 1000 and result.relation_s is not None
    assert result.maua > 0.2  # chance is 0.1
