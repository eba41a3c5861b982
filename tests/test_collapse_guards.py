"""The two options that keep small CPU recipes from collapsing: mean pooling, empty queue."""

from __future__ import annotations

import math

import pytest
import torch

from albef_pl.losses import itc_loss
from albef_pl.models import ALBEF, TextConfig
from albef_pl.models.text import pool_states
from albef_pl.momentum import FeatureQueue
from albef_pl.tasks import PretrainTask

from conftest import tiny_text, tiny_vision


def test_mean_pooling_ignores_padding_and_cls_pooling_reads_the_first_state() -> None:
    states = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mean = pool_states(states, mask, "mean")
    torch.testing.assert_close(mean[0], states[0, :3].mean(0))
    torch.testing.assert_close(mean[1], states[1].mean(0))
    changed = states.clone()
    changed[0, 3:] = 1e3  # padding states must not leak into the mean
    torch.testing.assert_close(pool_states(changed, mask, "mean"), mean)
    assert torch.equal(pool_states(states, mask, "cls"), states[:, 0])
    with pytest.raises(ValueError, match="attention mask"):
        pool_states(states, None, "mean")


def test_unknown_pooling_is_refused_when_the_config_is_built() -> None:
    with pytest.raises(ValueError, match="text.pooling"):
        TextConfig(pooling="max")


def test_mean_pooled_model_features_and_itm_do_not_depend_on_padding() -> None:
    torch.manual_seed(0)
    model = ALBEF(tiny_vision(), tiny_text(pooling="mean"), embed_dim=8).eval()
    ids = torch.randint(4, 128, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    other = ids.clone()
    other[0, 4:] = 7  # a different token under the padding
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.features(image, ids, mask)
        b = model.features(image, other, mask)
        torch.testing.assert_close(a.text_feat, b.text_feat)
        itm_a = model.itm_logits(a.text_embeds, mask, a.image_embeds)
        itm_b = model.itm_logits(b.text_embeds, mask, b.image_embeds)
        torch.testing.assert_close(itm_a, itm_b)
        # and, unlike [CLS] pooling, the mean moves when any real token changes
        other[1, 3] = (other[1, 3] + 1) % 128
        c = model.features(image, other, mask)
    assert not torch.allclose(a.text_feat[1], c.text_feat[1])


def test_empty_queue_reports_exactly_the_written_columns() -> None:
    q = FeatureQueue(4, 6, start_empty=True)
    assert not q.filled().any()
    q.enqueue(torch.nn.functional.normalize(torch.randn(4, 4), dim=1),
              torch.nn.functional.normalize(torch.randn(4, 4), dim=1))
    assert q.filled().tolist() == [True] * 4 + [False] * 2
    q.enqueue(torch.nn.functional.normalize(torch.randn(3, 4), dim=1),
              torch.nn.functional.normalize(torch.randn(3, 4), dim=1))
    assert q.filled().all()  # wrapped around: every column written
    assert FeatureQueue(4, 6).filled() is None  # the original's random start counts as full


def _task(empty_queue: bool) -> PretrainTask:
    torch.manual_seed(0)
    return PretrainTask(vision=tiny_vision(), text=tiny_text(), embed_dim=16, queue_size=8,
                        empty_queue=empty_queue, mask_token_id=3, special_token_ids=(0, 1, 2),
                        alpha_warmup=False, alpha=0.4, init_weights=False)


def test_an_empty_queue_leaves_itc_over_the_batch_alone() -> None:
    task = _task(empty_queue=True)
    g = torch.Generator().manual_seed(1)
    image, ids = torch.randn(3, 3, 32, 32, generator=g), torch.randint(4, 128, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    task.eval()  # no dropout: the same features in both computations
    with torch.no_grad():
        out = task.contrastive_and_matching(image, ids, mask, update_queue=False)
        s, t = out["student"], out["teacher"]
        temp = task.model.temp
        expected = itc_loss(s.image_feat @ t.text_feat.T / temp, s.text_feat @ t.image_feat.T / temp,
                            t.image_feat @ t.text_feat.T / temp, t.text_feat @ t.image_feat.T / temp,
                            0.4)
    torch.testing.assert_close(out["loss_itc"], expected.loss)
    # once written, the columns count: the loss over [batch; 3 queued] differs
    task.queue.enqueue(t.image_feat, t.text_feat)
    assert int(task.queue.filled().sum()) == 3
    with torch.no_grad():
        after = task.contrastive_and_matching(image, ids, mask, update_queue=False)
    assert not torch.allclose(after["loss_itc"], out["loss_itc"])


def test_collapse_pays_against_a_random_queue_but_not_against_an_empty_one() -> None:
    """Why the option exists. Encoders that do not yet tell inputs apart can either give
    unrelated features (image and caption features independent) or one feature for all.
    Against random queue columns the collapsed state scores about log(B) while unrelated
    features score about log(B + Q): collapsing is rewarded by ~3 nats. With the empty columns
    left out, the collapsed state scores exactly log(B), no better than unrelated features."""
    b, e, q, temp = 8, 16, 256, 0.07
    gen = torch.Generator().manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)

    queue_cols = unit(q, e)

    def loss(image: torch.Tensor, text: torch.Tensor, queue: torch.Tensor | None) -> float:
        texts = text if queue is None else torch.cat([text, queue])
        images = image if queue is None else torch.cat([image, queue])
        i2t, t2i = image @ texts.T / temp, text @ images.T / temp
        return float(itc_loss(i2t, t2i, i2t, t2i, 0.0).loss)

    same = unit(1, e).expand(b, e)
    unrelated = [loss(unit(b, e), unit(b, e), queue_cols) for _ in range(20)]
    assert loss(same, same, queue_cols) < min(unrelated) - 2.0
    assert min(unrelated) > math.log(b + q) - 1.0
    assert loss(same, same, None) == pytest.approx(math.log(b), rel=1e-5)
