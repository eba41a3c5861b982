"""Retrieval recall on hand-built score matrices with known ranks."""

from __future__ import annotations

import math

import pytest
import torch

from albef_pl.metrics import ground_truth_ranks, retrieval_recall

# Three images with two captions each (captions 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2), plus
# a twelve-caption set below for R@10. All scores are negative to show that nothing below
# zero is dropped.
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def test_ranks_use_the_best_placed_caption_and_ignore_sign():
    scores = -torch.tensor(
        [
            # image 0: its caption 1 is best overall -> rank 0
            [5.0, 0.5, 1.0, 2.0, 3.0, 4.0],
            # image 1: captions 2, 3 score 4th and 6th -> best rank 3
            [0.5, 1.0, 2.5, 5.0, 1.5, 3.0],
            # image 2: captions 4, 5 score 5th and 6th -> rank 4
            [1.0, 2.0, 3.0, 0.5, 5.0, 6.0],
        ]
    )
    assert ground_truth_ranks(scores, IMG2TXT).tolist() == [0, 3, 4]


def test_recall_values_both_directions():
    score_i2t = -torch.tensor(
        [
            [5.0, 0.5, 1.0, 2.0, 3.0, 4.0],  # rank 0
            [0.5, 1.0, 2.5, 5.0, 1.5, 3.0],  # rank 3
            [1.0, 2.0, 3.0, 0.5, 5.0, 6.0],  # rank 4
        ]
    )
    # For each caption, its image's position among 3 images: ranks 0, 1, 2, 0, 1, 0.
    score_t2i = -torch.tensor(
        [
            [1.0, 2.0, 3.0],
            [2.0, 1.0, 3.0],
            [2.0, 3.0, 1.0],
            [3.0, 1.0, 2.0],
            [1.0, 3.0, 2.0],
            [3.0, 2.0, 1.0],
        ]
    )
    m = retrieval_recall(score_i2t, score_t2i, IMG2TXT, TXT2IMG, ks=(1, 2, 5))
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r2"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(50.0)
    assert m["img_r2"] == pytest.approx(100 * 5 / 6)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 100 / 3 + 100) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def _from_orders(orders: list[list[int]]) -> torch.Tensor:
    """Scores -0, -1, -2, ... along each row's order (best first): all at or below zero."""
    out = torch.empty(len(orders), len(orders[0]))
    for r, order in enumerate(orders):
        for pos, col in enumerate(order):
            out[r, col] = -float(pos)
    return out


def test_default_cutoffs_on_a_larger_set():
    # Four images; image 0 has caption 0, image 1 captions 1-5, image 2 6-10, image 3 11-15.
    img2txt = [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    txt2img = [0] + [1] * 5 + [2] * 5 + [3] * 5
    rest = lambda *first: list(first) + [j for j in range(16) if j not in first]  # noqa: E731
    score_i2t = _from_orders([
        rest(6, 7, 8, 9, 10, 11, 12, 0),  # rank 7: a hit at 10 only
        rest(0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),  # rank 11: never
        rest(6),  # rank 0
        rest(0, 1, 2, 3, 11),  # rank 4: a hit at 5 and 10
    ])
    # Text j finds its image at position j % 4 among the four.
    score_t2i = torch.empty(16, 4)
    for j, gt in enumerate(txt2img):
        others = [i for i in range(4) if i != gt]
        order = others[: j % 4] + [gt] + others[j % 4 :]
        score_t2i[j] = _from_orders([order])[0]

    assert ground_truth_ranks(score_i2t, img2txt).tolist() == [7, 11, 0, 4]
    assert ground_truth_ranks(score_t2i, txt2img).tolist() == [j % 4 for j in range(16)]
    m = retrieval_recall(score_i2t, score_t2i, img2txt, txt2img)
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"]) == (25.0, 50.0, 75.0)
    assert (m["img_r1"], m["img_r5"], m["img_r10"]) == (25.0, 100.0, 100.0)
    assert m["txt_r_mean"] == pytest.approx(50.0)
    assert m["img_r_mean"] == pytest.approx(75.0)
    assert m["r_mean"] == pytest.approx(62.5)


def test_ties_count_against_the_ground_truth():
    # Caption 1 (image 0's) is outside the candidates: -100, tied with caption 2.
    scores = torch.tensor([[-100.0, 3.0, -100.0]])
    assert ground_truth_ranks(scores, [[0]]).tolist() == [2]
    assert ground_truth_ranks(scores, [[2]]).tolist() == [2]
    # Ties among targets do not hurt.
    assert ground_truth_ranks(torch.tensor([[1.0, 1.0, 0.0]]), [[0, 1]]).tolist() == [0]


def test_rows_without_targets_never_hit_and_bad_targets_raise():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ground_truth_ranks(scores, [[], [1]]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="out of range"):
        ground_truth_ranks(scores, [[2], [0]])
    with pytest.raises(ValueError, match="expected"):
        retrieval_recall(scores, torch.zeros(3, 2), [[0], [1]], [0, 1])


def test_chance_recall_by_hand_and_against_random_scores():
    from albef_pl.metrics import chance_recall

    # 30 images with 5 captions each (the COCO sample's test split): R@1 chance is 1/30 both ways
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(30)]
    chance = chance_recall(img2txt, 150)
    assert chance["img_r1"] == pytest.approx(100 / 30)
    assert chance["txt_r1"] == pytest.approx(100 * 5 / 150)
    assert chance["txt_r5"] == pytest.approx(100 * (1 - math.comb(145, 5) / math.comb(150, 5)))
    assert chance["img_r10"] == pytest.approx(100 * 10 / 30)

    # uneven caption counts: the mean of random-score recalls approaches the formula
    img2txt = [[0], [1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    txt2img = [i for i, caps in enumerate(img2txt) for _ in caps]
    g = torch.Generator().manual_seed(0)
    runs = [retrieval_recall(torch.rand(5, 11, generator=g), torch.rand(11, 5, generator=g),
                             img2txt, txt2img, ks=(1, 2)) for _ in range(3000)]
    expected = chance_recall(img2txt, 11, ks=(1, 2))
    for key in ("txt_r1", "txt_r2", "img_r1", "img_r2", "r_mean"):
        mean = sum(r[key] for r in runs) / len(runs)
        assert mean == pytest.approx(expected[key], abs=1.5), key
