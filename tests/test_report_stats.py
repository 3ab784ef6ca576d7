"""Routing statistics on hand-made routing decisions: label x expert counts, mutual
information (perfect mapping = log2 of the number of labels), entropy, load CV, and the
top-1 expert of a token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moekit.report import (
    entropy_bits,
    label_expert_counts,
    load_cv,
    mutual_information,
    normalised_rows,
)
from moekit.report.routing import TokenRouting


def test_counts_of_hand_made_assignments_skip_unused_slots():
    # token 0 (label 0) -> experts 2, 0; token 1 (label 1) -> expert 1 and an unused slot;
    # token 2 (label 1) -> experts 1, 2.
    ids_TK = torch.tensor([[2, 0], [1, -1], [1, 2]])
    labels_T = torch.tensor([0, 1, 1])
    counts = label_expert_counts(ids_TK, labels_T, num_labels=2, num_experts=3)
    assert counts.tolist() == [[1, 0, 1], [0, 2, 1]]


def test_counts_take_batched_shapes_and_reject_mismatched_labels():
    ids_BTK = torch.tensor([[[0], [1]], [[1], [1]]])
    labels_BT = torch.tensor([[0, 0], [1, 1]])
    assert label_expert_counts(ids_BTK, labels_BT, 2, 2).tolist() == [[1, 1], [0, 2]]
    with pytest.raises(
        ValueError, match=r"ids shape \(2, 2, 1\) does not match labels shape \(4,\)"
    ):
        label_expert_counts(ids_BTK, labels_BT.flatten(), 2, 2)


@pytest.mark.parametrize("num_labels, num_experts", [(2, 2), (5, 5), (5, 16), (4, 64)])
def test_perfect_label_to_expert_mapping_gives_log2_of_the_labels(num_labels, num_experts):
    counts = np.zeros((num_labels, num_experts))
    counts[np.arange(num_labels), np.arange(num_labels)] = 100  # label d -> expert d only
    assert mutual_information(counts) == pytest.approx(math.log2(num_labels))


def test_mapping_onto_two_experts_per_label_still_gives_log2_of_the_labels():
    # top-2 routing where each of 4 labels owns 2 of 8 experts: I = H(label) = 2 bits.
    counts = np.kron(np.eye(4), np.ones((1, 2))) * 50
    assert mutual_information(counts) == pytest.approx(2.0)


def test_independent_label_and_expert_give_zero():
    load_E = np.array([5, 1, 3, 7])
    counts = np.outer([1, 2, 10], load_E)  # every label spreads like load_E
    assert mutual_information(counts) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_a_worked_two_by_two_table():
    # p = [[3/8, 1/8], [1/8, 3/8]]: marginals 1/2 each, so
    # I = 2 * 3/8 * log2(3/2) + 2 * 1/8 * log2(1/2) = 0.75 log2 3 - 1.
    counts = np.array([[3, 1], [1, 3]])
    assert mutual_information(counts) == pytest.approx(0.75 * math.log2(3) - 1)


def test_mutual_information_ignores_empty_rows_and_columns_and_order():
    counts = np.array([[3, 1], [1, 3]])
    padded = np.zeros((4, 5))
    padded[1, 3], padded[1, 0], padded[3, 3], padded[3, 0] = 3, 1, 1, 3
    assert mutual_information(padded) == pytest.approx(mutual_information(counts))
    assert mutual_information(counts[::-1]) == pytest.approx(mutual_information(counts))
    assert mutual_information(np.zeros((3, 3))) == 0.0


def test_mutual_information_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative"):
        mutual_information(np.array([[1, -1], [0, 2]]))


def test_entropy_and_load_cv_of_hand_made_loads():
    assert entropy_bits([4, 4, 4, 4]) == pytest.approx(2.0)
    assert entropy_bits([8, 0, 0, 0]) == 0.0
    assert load_cv([4, 4, 4, 4]) == 0.0
    # all load on one of E experts: std / mean = sqrt(E - 1)
    assert load_cv([12, 0, 0, 0]) == pytest.approx(math.sqrt(3))
    assert load_cv([1, 3]) == pytest.approx(0.5)  # mean 2, population std 1


def test_normalised_rows_sum_to_one_and_leave_empty_rows_at_zero():
    shares = normalised_rows([[1, 3], [0, 0]])
    assert shares.tolist() == [[0.25, 0.75], [0.0, 0.0]]


def test_top1_takes_the_largest_weight_and_marks_tokens_without_experts():
    routing = TokenRouting(
        pieces=["a", "b", "c"],
        layers=[0],
        ids=[np.array([[3, 1], [0, 2], [-1, -1]])],
        weights=[np.array([[0.7, 0.3], [0.2, 0.8], [0.0, 0.0]])],
    )
    assert routing.top1(0).tolist() == [3, 2, -1]
