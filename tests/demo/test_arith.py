"""demo.arith: the graded math domain's splits are disjoint and every gold solution is right; the table's paired
interval is computed from per-problem answers."""

from __future__ import annotations

import random

import pytest

from demo.arith import ArithSizes, build_arith, half_width, kind_of, make_problem, paired_difference
from demo.corpus import check_math_answer


def test_splits_are_disjoint_and_every_gold_solution_checks() -> None:
    sizes = ArithSizes(train=400, heldout=100, problems=50, probe=16)
    splits = build_arith(seed=0, sizes=sizes)
    questions = [r["question"] for records in splits.values() for r in records]
    assert len(questions) == len(set(questions)) == 566
    assert all(check_math_answer(r["answer"]) for records in splits.values() for r in records)
    assert build_arith(seed=0, sizes=sizes) == splits, "seeded"


def test_every_kind_is_drawn_and_named() -> None:
    rng = random.Random(0)
    kinds = {kind_of(make_problem(rng)["question"]) for _ in range(300)}
    assert kinds == {"add", "sub", "times", "chain", "groups"}


def test_paired_difference_counts_only_changed_answers() -> None:
    same = "1010101010" * 10
    assert paired_difference(same, same) == (0.0, 0.0)
    better = "1" * 10 + same[10:]  # 5 more right out of 100
    mean, ci = paired_difference(better, same)
    assert mean == pytest.approx(5.0) and 0.0 < ci < half_width(0.5, 100)
    assert half_width(0.5, 2500) == pytest.approx(1.96, abs=0.01)
