"""Each loss against hand-computed values and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef_pl.losses import (
    IGNORE_INDEX,
    itc_loss,
    itc_targets,
    itm_loss,
    mask_tokens,
    mlm_loss,
    sample_from_weights,
    sample_hard_negatives,
)


def test_itc_targets_rows_sum_to_one_and_mix_alpha():
    sim_m = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    t = itc_targets(sim_m, alpha=0.4)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    soft = sim_m.softmax(1)
    expected = 0.4 * soft + 0.6 * torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(t, expected)
    assert torch.equal(itc_targets(sim_m, 0.0), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_itc_targets_with_image_ids_split_mass_among_positives():
    sim_m = torch.zeros(2, 4)
    idx = torch.tensor([7, 8])
    idx_all = torch.tensor([7, 8, 7, 7])  # image 7 appears three times among the columns
    t = itc_targets(sim_m, 0.0, idx, idx_all)
    torch.testing.assert_close(t, torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [0, 1.0, 0, 0]]))
    t = itc_targets(sim_m, 0.5, idx, idx_all)
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_itc_loss_hand_computed():
    # Two samples, no queue, alpha 0: plain cross-entropy with the diagonal as target.
    sim = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    out = itc_loss(sim, sim.T.contiguous(), sim, sim.T.contiguous(), alpha=0.0)
    l_i2t = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 2
    l_t2i = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1))) + math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    assert out.loss_i2t.item() == pytest.approx(l_i2t, rel=1e-6)
    assert out.loss_t2i.item() == pytest.approx(l_t2i, rel=1e-6)
    assert out.loss.item() == pytest.approx((l_i2t + l_t2i) / 2, rel=1e-6)


def test_itc_loss_with_distillation_equals_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    sim, sim_m = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    out = itc_loss(sim, sim, sim_m, sim_m, alpha=0.4)
    targets = 0.4 * sim_m.softmax(1) + 0.6 * F.pad(torch.eye(3), (0, 2))
    expected = -(sim.log_softmax(1) * targets).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)


def test_hard_negatives_never_positive_or_same_image():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 3])
    for _ in range(200):
        sim = torch.randn(6, 6, generator=g) * 5
        neg = sample_hard_negatives(sim, sim.T, idx, g)
        assert neg.text_valid.all() and neg.image_valid.all()
        assert (idx[neg.image_for_text] != idx).all()
        assert (idx[neg.text_for_image] != idx).all()


def test_hard_negatives_follow_similarity_distribution():
    # Row 0 strongly prefers column 2; the diagonal is never drawn.
    sim = torch.tensor([[9.0, 0.0, 5.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    g = torch.Generator().manual_seed(1)
    picks = torch.stack([sample_hard_negatives(sim, sim, None, g).text_for_image for _ in range(500)])
    frac = (picks[:, 0] == 2).float().mean().item()
    expected = math.exp(5) / (math.exp(5) + math.exp(0))
    assert frac == pytest.approx(expected, abs=0.03)
    assert not (picks == torch.arange(3)).any()


def test_hard_negatives_batch_of_one_and_single_image_batch_do_not_crash():
    neg = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))
    assert not neg.text_valid.any() and not neg.image_valid.any()
    neg = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([5, 5, 5]))
    assert not neg.text_valid.any() and not neg.image_valid.any()


def test_underflowing_weights_fall_back_to_uniform_over_allowed():
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 0: all mass on itself
    allowed = ~torch.eye(3, dtype=torch.bool)[:2]
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_from_weights(weights, allowed, g)[0] for _ in range(300)])
    assert set(picks[:, 0].tolist()) == {1, 2}
    assert set(picks[:, 1].tolist()) == {0, 2}


def test_itm_loss_hand_computed():
    pos = torch.tensor([[0.0, 2.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    expected = (
        -math.log(math.exp(2) / (1 + math.exp(2)))
        - math.log(math.e / (math.e + 1))
        - math.log(0.5)
    ) / 3
    assert itm_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)


def test_mask_tokens_rate_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (400, 30), generator=g)
    ids[:, 0] = 101
    ids[:, 25:] = 0
    masked, labels = mask_tokens(ids, 1000, 103, (0, 101, 102), 0.15, g)
    picked = labels != IGNORE_INDEX
    assert not picked[:, 0].any() and not picked[:, 25:].any()
    rate = picked[:, 1:25].float().mean().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    frac_mask = (masked[picked] == 103).float().mean().item()
    frac_kept = (masked[picked] == ids[picked]).float().mean().item()
    assert frac_mask == pytest.approx(0.8, abs=0.03)
    assert frac_kept == pytest.approx(0.1, abs=0.02)  # ~0.1 kept (+ rare random hits)


def test_mlm_loss_hand_computed_and_distilled():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[2, IGNORE_INDEX]])
    ce = -math.log(math.exp(2) / (1 + math.e + math.exp(2)))
    assert mlm_loss(logits, labels).item() == pytest.approx(ce, rel=1e-6)
    soft = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    logp = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    distill = -(0.5 * logp[0] + 0.5 * logp[1]).item()
    got = mlm_loss(logits, labels, soft, alpha=0.4).item()
    assert got == pytest.approx(0.6 * ce + 0.4 * distill, rel=1e-6)


def test_mlm_loss_is_finite_zero_when_nothing_masked():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = mlm_loss(logits, torch.full((2, 3), IGNORE_INDEX), torch.rand(2, 3, 7), 0.4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
