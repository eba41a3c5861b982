"""Official ALBEF checkpoints <-> albef_pl tasks: key conversion, loading, export, and the
``albef-pl-convert`` command.

The original stores one flat state dict per model class (six layouts, see
:data:`LAYOUTS`); our Lightning tasks store ``model.*`` (student), ``teacher.*`` (momentum
copies, the original's ``*_m``) and ``queue.*``. Every name maps one to one, except the
three kinds of entries the original stores that carry no information of their own.

Name mapping (``<o>`` is ``model`` for a student key and ``teacher`` for its ``_m`` twin;
``k`` is the number of text-only layers, the original's ``fusion_layer``, 6 for BERT-base):

==================================================  ============================================
official                                            ours
==================================================  ============================================
``temp``                                            ``model.temp``
``image_queue``, ``text_queue``, ``queue_ptr``,     ``queue.image_queue``, ``queue.text_queue``,
``idx_queue``                                       ``queue.queue_ptr``, ``queue.idx_queue``
``visual_encoder[_m].*``                            ``<o>.visual_encoder.*`` (same timm names)
``text_encoder[_m].[bert.]embeddings.X``            ``<o>.text_encoder.embeddings.X``
``text_encoder[_m].[bert.]encoder.layer.{i<k}.R``   ``<o>.text_encoder.layers.{i}.R``
``text_encoder[_m].[bert.]encoder.layer.{i>=k}.R``  ``<o>.fusion_encoder.layers.{i-k}.R``
``text_encoder[_m].cls.predictions.transform.X``    ``<o>.mlm_head.transform.X``
``text_encoder[_m].cls.predictions.bias``           ``<o>.mlm_head.bias``
``vision_proj``, ``text_proj`` [``_m``]             ``<o>.vision_proj``, ``<o>.text_proj``
``itm_head``                                        ``model.itm_head``
``text_decoder[_m].bert.embeddings.X`` (VQA)        ``<o>.answer_decoder.embeddings.X``
``text_decoder[_m].bert.encoder.layer.{j}.R``       ``<o>.answer_decoder.layers.{j}.R``
``text_decoder[_m].cls.predictions.transform.X``    ``<o>.answer_decoder.lm_head.transform.X``
``text_decoder[_m].cls.predictions.bias``           ``<o>.answer_decoder.lm_head.bias``
``cls_head[_m].{0,2}.*`` (SNLI-VE, NLVR2)           ``<o>.cls_head.{0,2}.*`` (Linear, ReLU, Linear)
``ta_head.*`` (NLVR2 text assignment)               ``model.ta_head.*``
==================================================  ============================================

Dropped on the way in and rebuilt on the way out (:func:`drop_reason`):
``*.embeddings.position_ids`` (a constant 0..511 buffer that our embeddings do not persist),
``*.cls.predictions.decoder.weight`` (the word-embedding matrix again: the decoder is tied)
and ``*.cls.predictions.decoder.bias`` (``cls.predictions.bias`` again).

Target names of the downstream tasks (SNLI-VE, VQA and NLVR2 are built:
:mod:`albef_pl.tasks.ve`, :mod:`albef_pl.tasks.vqa`, :mod:`albef_pl.tasks.nlvr2`; grounding is
still to come, so it only plugs in its modules):

* VQA: ``model.answer_decoder`` with ``embeddings`` (``BertEmbeddings``), ``layers.{j}``
  (fusion-style layers: self-attention, ``crossattention`` over the question states,
  feed-forward) and ``lm_head`` (:class:`~albef_pl.models.text.MLMHead` tied to the
  decoder's own word embeddings). From a pre-training checkpoint the decoder's layer ``j``
  starts from fusion layer ``j`` and its embeddings and head from the text encoder's, while
  the 12-layer encoder keeps every pre-trained layer (what ``VQA.py`` does). When the image
  tokens are narrower than the text (small CPU models), the decoder's cross-attention
  key/value weights cannot come from the fusion layers and stay fresh (reported as kept).
* SNLI-VE: ``model.cls_head`` = ``Sequential(Linear(D, D), ReLU, Linear(D, 3))``.
* NLVR2: ``model.fusion_encoder`` with ``2 * (L - k)`` layers; layers ``2j`` and ``2j + 1``
  both start from pre-trained fusion layer ``j`` (what ``Pretrain_nlvr.py`` does) and
  share their ``crossattention.self.key`` and ``.value`` parameters (the state dict then
  holds both names with equal values, as the original's does); ``model.ta_head`` =
  ``Linear(D, 3)`` for text assignment and ``model.cls_head`` ending in 2 classes for the
  fine-tune.

A task declares its layout with a class attribute ``official_layout``; without one it is
inferred from its state dict (:func:`infer_task_layout`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from albef_pl.checkpoints import bert_key_to_ours, interpolate_pos_embed, read_state_dict

_logger = logging.getLogger(__name__)

LAYOUTS = ("pretrain", "retrieval", "vqa", "snli_ve", "nlvr2_ta", "nlvr2")
OURS = "albef_pl"  # a state dict of our own task (``model.*``, ``teacher.*``, ``queue.*``)

# Which checkpoint kinds can initialise which task kinds, with the original script that
# does the same; loading a checkpoint into a task of its own kind is always allowed.
ROUTES: dict[tuple[str, str], str] = {
    ("pretrain", "retrieval"): "Retrieval.py / Grounding.py",
    ("pretrain", "vqa"): "VQA.py",
    ("pretrain", "snli_ve"): "VE.py",
    ("pretrain", "nlvr2_ta"): "Pretrain_nlvr.py",
    ("nlvr2_ta", "nlvr2"): "NLVR.py",
    # Ours: NLVR2 fine-tuning straight from pre-training, with Pretrain_nlvr.py's layer
    # duplication but without its text-assignment phase.
    ("pretrain", "nlvr2"): "Pretrain_nlvr.py + NLVR.py",
}

# Keys the original script of a route ignores (``load_state_dict(strict=False)``), as
# prefixes of our names. A source key that has no place in the target task and matches
# one of these is reported as dropped; any other is unexpected.
ORIGINAL_DROPS: dict[tuple[str, str], tuple[str, ...]] = {
    ("pretrain", "retrieval"): ("model.mlm_head.", "teacher.mlm_head."),
    ("pretrain", "vqa"): (
        "model.temp", "queue.", "model.vision_proj.", "model.text_proj.",
        "teacher.vision_proj.", "teacher.text_proj.", "model.itm_head.",
    ),
    ("pretrain", "snli_ve"): (
        "model.temp", "queue.", "model.vision_proj.", "model.text_proj.",
        "teacher.vision_proj.", "teacher.text_proj.", "model.itm_head.",
        "model.mlm_head.", "teacher.mlm_head.",
    ),
    ("pretrain", "nlvr2_ta"): ("teacher.", "queue.", "model.itm_head.", "model.mlm_head."),
    ("nlvr2_ta", "nlvr2"): ("model.temp", "model.vision_proj.", "model.text_proj.",
                            "model.ta_head."),
    ("pretrain", "nlvr2"): (
        "model.temp", "queue.", "model.vision_proj.", "model.text_proj.",
        "teacher.vision_proj.", "teacher.text_proj.", "model.itm_head.",
        "model.mlm_head.", "teacher.mlm_head.",
    ),
}

# New heads of a route: fresh in the task, as in the original.
NEW_HEADS: dict[tuple[str, str], tuple[str, ...]] = {
    ("pretrain", "snli_ve"): ("model.cls_head.", "teacher.cls_head."),
    ("pretrain", "nlvr2_ta"): ("model.ta_head.",),
    ("nlvr2_ta", "nlvr2"): ("model.cls_head.", "teacher.cls_head."),
    ("pretrain", "nlvr2"): ("model.cls_head.", "teacher.cls_head."),
}


# ---------------------------------------------------------------------------------------------
# Layouts: which modules each official model has, and the full key list at any size
@dataclass(frozen=True)
class _Parts:
    roots: tuple[str, ...]  # root parameters and buffers, in state-dict order
    student: tuple[str, ...]  # modules, in registration order
    momentum: tuple[str, ...]  # modules with an ``_m`` copy, in registration order


_PARTS: dict[str, _Parts] = {
    "pretrain": _Parts(
        ("temp", "image_queue", "text_queue", "queue_ptr"),
        ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"),
        ("visual_encoder", "vision_proj", "text_encoder", "text_proj"),
    ),
    "retrieval": _Parts(
        ("temp", "image_queue", "text_queue", "idx_queue", "queue_ptr"),
        ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"),
        ("visual_encoder", "vision_proj", "text_encoder", "text_proj"),
    ),
    "vqa": _Parts(
        (),
        ("visual_encoder", "text_encoder", "text_decoder"),
        ("visual_encoder", "text_encoder", "text_decoder"),
    ),
    "snli_ve": _Parts(
        (),
        ("visual_encoder", "text_encoder", "cls_head"),
        ("visual_encoder", "text_encoder", "cls_head"),
    ),
    "nlvr2_ta": _Parts(
        ("temp",),
        ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "ta_head"),
        (),
    ),
    "nlvr2": _Parts(
        (),
        ("visual_encoder", "text_encoder", "cls_head"),
        ("visual_encoder", "text_encoder", "cls_head"),
    ),
}

# Official module -> our module(s) below ``model.`` / ``teacher.``.
_OUR_MODULES: dict[str, tuple[str, ...]] = {
    "visual_encoder": ("visual_encoder",),
    "text_encoder": ("text_encoder", "fusion_encoder"),
    "text_decoder": ("answer_decoder",),
    "vision_proj": ("vision_proj",),
    "text_proj": ("text_proj",),
    "itm_head": ("itm_head",),
    "cls_head": ("cls_head",),
    "ta_head": ("ta_head",),
}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown official layout {layout!r}; expected one of {LAYOUTS}")


def layout_prefixes(layout: str) -> tuple[str, ...]:
    """Prefixes of our keys that a model of ``layout`` has (``model.vision_proj.`` ...)."""
    _check_layout(layout)
    parts = _PARTS[layout]
    out = [f"model.{r}" if r == "temp" else f"queue.{r}" for r in parts.roots]
    for owner, modules in (("model", parts.student), ("teacher", parts.momentum)):
        for module in modules:
            out += [f"{owner}.{m}." for m in _OUR_MODULES[module]]
    if layout == "pretrain":  # the MLM head sits inside the official text_encoder
        out += ["model.mlm_head.", "teacher.mlm_head."]
    return tuple(out)


@dataclass(frozen=True)
class OfficialSizes:
    """The sizes that determine an official state dict's keys and shapes.

    Defaults are ALBEF's (ViT-B/16, BERT-base, fusion from layer 6) at 256 px; use
    :meth:`default` for each layout's released resolution and depth.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12  # text-encoder layers in this checkpoint (18 for NLVR2)
    fusion_layer: int = 6
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    vision_width: int = 768
    depth: int = 12
    mlp_hidden: int = 3072
    patch_size: int = 16
    num_patches: int = 256
    embed_dim: int = 256
    queue_size: int = 65536
    decoder_layers: int = 6
    num_classes: int = 3  # cls_head outputs: 3 for SNLI-VE, 2 for NLVR2

    @classmethod
    def default(cls, layout: str) -> OfficialSizes:
        """The released checkpoints' sizes: 256 px for pre-training and text assignment,
        384 px (24 x 24 patches) for the fine-tunes, 18 text layers for NLVR2."""
        _check_layout(layout)
        sizes = cls() if layout in ("pretrain", "nlvr2_ta") else cls(num_patches=576)
        if layout.startswith("nlvr2"):
            sizes = dataclasses.replace(sizes, num_hidden_layers=18, num_classes=2)
        return sizes


Shape = tuple[int, ...]


def _vit_shapes(prefix: str, s: OfficialSizes) -> Iterable[tuple[str, Shape]]:
    w, m = s.vision_width, s.mlp_hidden
    yield f"{prefix}cls_token", (1, 1, w)
    yield f"{prefix}pos_embed", (1, s.num_patches + 1, w)
    yield f"{prefix}patch_embed.proj.weight", (w, 3, s.patch_size, s.patch_size)
    yield f"{prefix}patch_embed.proj.bias", (w,)
    for i in range(s.depth):
        b = f"{prefix}blocks.{i}."
        yield from (
            (b + "norm1.weight", (w,)), (b + "norm1.bias", (w,)),
            (b + "attn.qkv.weight", (3 * w, w)), (b + "attn.qkv.bias", (3 * w,)),
            (b + "attn.proj.weight", (w, w)), (b + "attn.proj.bias", (w,)),
            (b + "norm2.weight", (w,)), (b + "norm2.bias", (w,)),
            (b + "mlp.fc1.weight", (m, w)), (b + "mlp.fc1.bias", (m,)),
            (b + "mlp.fc2.weight", (w, m)), (b + "mlp.fc2.bias", (w,)),
        )
    yield f"{prefix}norm.weight", (w,)
    yield f"{prefix}norm.bias", (w,)


def _attention_shapes(prefix: str, h: int, kv: int) -> Iterable[tuple[str, Shape]]:
    for name, width in (("query", h), ("key", kv), ("value", kv)):
        yield f"{prefix}self.{name}.weight", (h, width)
        yield f"{prefix}self.{name}.bias", (h,)
    yield f"{prefix}output.dense.weight", (h, h)
    yield f"{prefix}output.dense.bias", (h,)
    yield f"{prefix}output.LayerNorm.weight", (h,)
    yield f"{prefix}output.LayerNorm.bias", (h,)


def _bert_shapes(
    prefix: str, s: OfficialSizes, num_layers: int, fusion_layer: int, kv_width: int, mlm: bool
) -> Iterable[tuple[str, Shape]]:
    h, inter = s.hidden_size, s.intermediate_size
    bert = prefix + ("bert." if mlm else "")
    yield f"{bert}embeddings.position_ids", (1, s.max_position_embeddings)
    yield f"{bert}embeddings.word_embeddings.weight", (s.vocab_size, h)
    yield f"{bert}embeddings.position_embeddings.weight", (s.max_position_embeddings, h)
    yield f"{bert}embeddings.token_type_embeddings.weight", (s.type_vocab_size, h)
    yield f"{bert}embeddings.LayerNorm.weight", (h,)
    yield f"{bert}embeddings.LayerNorm.bias", (h,)
    for i in range(num_layers):
        layer = f"{bert}encoder.layer.{i}."
        yield from _attention_shapes(layer + "attention.", h, h)
        if i >= fusion_layer:
            yield from _attention_shapes(layer + "crossattention.", h, kv_width)
        yield from (
            (layer + "intermediate.dense.weight", (inter, h)),
            (layer + "intermediate.dense.bias", (inter,)),
            (layer + "output.dense.weight", (h, inter)), (layer + "output.dense.bias", (h,)),
            (layer + "output.LayerNorm.weight", (h,)), (layer + "output.LayerNorm.bias", (h,)),
        )
    if mlm:
        cls = f"{prefix}cls.predictions."
        yield from (
            (cls + "bias", (s.vocab_size,)),
            (cls + "transform.dense.weight", (h, h)), (cls + "transform.dense.bias", (h,)),
            (cls + "transform.LayerNorm.weight", (h,)), (cls + "transform.LayerNorm.bias", (h,)),
            (cls + "decoder.weight", (s.vocab_size, h)), (cls + "decoder.bias", (s.vocab_size,)),
        )


def _module_shapes(module: str, prefix: str, layout: str, s: OfficialSizes):
    h, e = s.hidden_size, s.embed_dim
    if module == "visual_encoder":
        return _vit_shapes(prefix, s)
    if module == "text_encoder":
        mlm = layout == "pretrain"
        return _bert_shapes(prefix, s, s.num_hidden_layers, s.fusion_layer, s.vision_width, mlm)
    if module == "text_decoder":  # every decoder layer cross-attends to the question states
        return _bert_shapes(prefix, s, s.decoder_layers, 0, h, mlm=True)
    linear = {
        "vision_proj": (e, s.vision_width), "text_proj": (e, h), "itm_head": (2, h),
        "ta_head": (3, h),
    }
    if module in linear:
        out, inp = linear[module]
        return [(prefix + "weight", (out, inp)), (prefix + "bias", (out,))]
    if module == "cls_head":
        c = s.num_classes
        return [(prefix + "0.weight", (h, h)), (prefix + "0.bias", (h,)),
                (prefix + "2.weight", (c, h)), (prefix + "2.bias", (c,))]
    raise AssertionError(module)


def official_layout(layout: str, sizes: OfficialSizes | None = None) -> dict[str, Shape]:
    """Every key of an official state dict of ``layout`` and its shape, in state-dict order.

    Includes the entries the original stores twice or as constants (``position_ids``,
    tied ``cls.predictions.decoder.*``). With default sizes the counts are those of the
    released files: pretrain 844, retrieval 831, vqa 1154, snli_ve 824, nlvr2_ta 571,
    nlvr2 1136.
    """
    _check_layout(layout)
    s = sizes or OfficialSizes.default(layout)
    parts = _PARTS[layout]
    roots = {
        "temp": (), "image_queue": (s.embed_dim, s.queue_size),
        "text_queue": (s.embed_dim, s.queue_size), "idx_queue": (1, s.queue_size),
        "queue_ptr": (1,),
    }
    keys: dict[str, Shape] = {r: roots[r] for r in parts.roots}
    for module in parts.student:
        keys.update(_module_shapes(module, f"{module}.", layout, s))
    for module in parts.momentum:
        keys.update(_module_shapes(module, f"{module}_m.", layout, s))
    return keys


# ---------------------------------------------------------------------------------------------
# Names, one key at a time
def drop_reason(key: str) -> str | None:
    """Why an official key is not loaded (it carries nothing of its own), or None."""
    if key.endswith("embeddings.position_ids"):
        return "constant buffer 0..max_position-1; our embeddings rebuild it and do not persist it"
    head = key.split(".cls.predictions.decoder.")[0]
    if key.endswith(".cls.predictions.decoder.weight"):
        return f"tied duplicate of {head}.bert.embeddings.word_embeddings.weight"
    if key.endswith(".cls.predictions.decoder.bias"):
        return f"tied duplicate of {head}.cls.predictions.bias"
    return None


def tied_aliases(keys: Iterable[str]) -> dict[str, str]:
    """Tied MLM-decoder aliases the original stores for the given keys: alias -> source."""
    out = {}
    for key in keys:
        if key.endswith(".cls.predictions.bias"):
            head = key.removesuffix(".cls.predictions.bias")
            out[f"{head}.cls.predictions.decoder.weight"] = (
                f"{head}.bert.embeddings.word_embeddings.weight"
            )
            out[f"{head}.cls.predictions.decoder.bias"] = key
    return out


def _bert_to_ours(rest: str, k: int) -> str:
    if rest.startswith("embeddings."):
        return "text_encoder." + rest  # position_ids included: its drop is reported elsewhere
    ours = bert_key_to_ours(rest, k)
    if ours is None:
        raise KeyError(rest)
    return ours


def _decoder_to_ours(rest: str) -> str:
    if rest.startswith("bert.embeddings."):
        return "answer_decoder." + rest.removeprefix("bert.")
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", rest)
    if m:
        return f"answer_decoder.layers.{m.group(1)}.{m.group(2)}"
    if rest.startswith("cls.predictions.transform.") or rest == "cls.predictions.bias":
        return "answer_decoder.lm_head." + rest.removeprefix("cls.predictions.")
    raise KeyError(rest)


def official_to_ours(key: str, layout: str, num_text_layers: int) -> str:
    """Our name for an official key of ``layout`` (see the module's table).

    Raises:
        KeyError: the key does not belong to ``layout`` or is one :func:`drop_reason` drops.
    """
    _check_layout(layout)
    parts = _PARTS[layout]
    if key in parts.roots:
        return "model.temp" if key == "temp" else f"queue.{key}"
    module, _, rest = key.partition(".")
    owner = "teacher" if module.endswith("_m") else "model"
    module = module.removesuffix("_m")
    if module not in (parts.momentum if owner == "teacher" else parts.student) or not rest:
        raise KeyError(f"{key!r} is not a key of the official {layout} layout")
    try:
        if module == "text_encoder":
            bert = rest.removeprefix("bert.") if layout == "pretrain" else rest
            if layout == "pretrain" and bert == rest and not rest.startswith("cls."):
                raise KeyError(rest)
            if layout != "pretrain" and rest.startswith(("bert.", "cls.")):
                raise KeyError(rest)
            return f"{owner}.{_bert_to_ours(bert, num_text_layers)}"
        if module == "text_decoder":
            return f"{owner}.{_decoder_to_ours(rest)}"
    except KeyError:
        raise KeyError(f"{key!r} is not a key of the official {layout} layout") from None
    return f"{owner}.{module}.{rest}"


def ours_to_official(key: str, layout: str, num_text_layers: int) -> str:
    """The official name of our key in ``layout`` (inverse of :func:`official_to_ours`)."""
    _check_layout(layout)
    parts = _PARTS[layout]
    if key == "model.temp" or key.startswith("queue."):
        root = key.split(".", 1)[1]
        if root in parts.roots:
            return root
        raise KeyError(f"{key!r} has no place in the official {layout} layout")
    owner, _, rest = key.partition(".")
    suffix = {"model": "", "teacher": "_m"}.get(owner)
    module, _, tail = rest.partition(".")
    bert = "bert." if layout == "pretrain" else ""
    name: str | None = None
    if module == "text_encoder" and tail.startswith("embeddings."):
        name = f"text_encoder{suffix}.{bert}{tail}"
    elif module in ("text_encoder", "fusion_encoder") and tail.startswith("layers."):
        _, i, layer_rest = tail.split(".", 2)
        i = int(i) + (num_text_layers if module == "fusion_encoder" else 0)
        name = f"text_encoder{suffix}.{bert}encoder.layer.{i}.{layer_rest}"
    elif module == "mlm_head" and layout == "pretrain":
        name = f"text_encoder{suffix}.cls.predictions.{tail}"
    elif module == "answer_decoder":
        sub, _, sub_rest = tail.partition(".")
        sub = {"embeddings": "bert.embeddings", "layers": "bert.encoder.layer",
               "lm_head": "cls.predictions"}.get(sub)
        name = f"text_decoder{suffix}.{sub}.{sub_rest}" if sub else None
    elif module in _OUR_MODULES and module not in ("text_encoder", "text_decoder"):
        name = f"{module}{suffix}.{tail}"
    if suffix is None or name is None:
        raise KeyError(f"{key!r} has no place in the official {layout} layout")
    official_to_ours(name, layout, num_text_layers)  # raises if the module is not in layout
    return name


def route_targets(key: str, source: str, target: str) -> list[str]:
    """Our keys in a ``target`` task that our key ``key`` of a ``source`` checkpoint fills.

    Same-kind routes are the identity; a pre-training checkpoint also fills the VQA answer
    decoder (embeddings, fusion layers, MLM head) and both NLVR2 copies of each fusion layer.
    """
    owner, _, rest = key.partition(".")
    if (source, target) == ("pretrain", "vqa"):
        if rest.startswith("text_encoder.embeddings."):
            return [key, f"{owner}.answer_decoder.{rest.removeprefix('text_encoder.')}"]
        if rest.startswith("fusion_encoder.layers."):
            return [key, f"{owner}.answer_decoder.{rest.removeprefix('fusion_encoder.')}"]
        if rest.startswith("mlm_head."):
            return [key, f"{owner}.answer_decoder.lm_head.{rest.removeprefix('mlm_head.')}"]
    if (source, target) in (("pretrain", "nlvr2_ta"), ("pretrain", "nlvr2")):
        m = re.fullmatch(r"fusion_encoder\.layers\.(\d+)\.(.+)", rest)
        if m:
            j, tail = int(m.group(1)), m.group(2)
            return [f"{owner}.fusion_encoder.layers.{2 * j + d}.{tail}" for d in (0, 1)]
    return [key]


# ---------------------------------------------------------------------------------------------
# Whole state dicts
def _is_ours(keys: Iterable[str]) -> bool:
    return any(k.startswith(("model.", "teacher.")) for k in keys)


def infer_task_layout(state: Mapping[str, Any]) -> str:
    """The official layout matching one of our task state dicts (keys and shapes)."""
    keys = list(state)
    if any(k.startswith("model.answer_decoder.") for k in keys):
        return "vqa"
    if any(k.startswith("model.ta_head.") for k in keys):
        return "nlvr2_ta"
    heads = sorted(k for k in keys if re.fullmatch(r"model\.cls_head\.\d+\.weight", k))
    if heads:
        last = max(heads, key=lambda k: int(k.split(".")[2]))
        return "nlvr2" if tuple(state[last].shape)[0] == 2 else "snli_ve"
    if "queue.idx_queue" in state:
        return "retrieval"
    return "pretrain"


def task_layout(task: nn.Module) -> str:
    """A task's official layout: its ``official_layout`` attribute, else inferred."""
    declared = getattr(task, "official_layout", None)
    return declared if declared is not None else infer_task_layout(task.state_dict())


def detect_layout(state: Mapping[str, Any]) -> str:
    """Which kind of checkpoint ``state`` is: one of :data:`LAYOUTS`, or :data:`OURS`.

    Raises:
        ValueError: the keys match no ALBEF layout (a BERT or ViT file, for instance).
    """
    keys = list(state)
    if _is_ours(keys):
        return OURS
    tops = {k.split(".", 1)[0] for k in keys}
    if "text_decoder" in tops:
        return "vqa"
    if "ta_head" in tops:
        return "nlvr2_ta"
    if "cls_head" in tops:
        last = max((k for k in keys if re.fullmatch(r"cls_head\.\d+\.weight", k)),
                   key=lambda k: int(k.split(".")[1]))
        return "nlvr2" if tuple(state[last].shape)[0] == 2 else "snli_ve"
    if any(k.startswith("text_encoder.bert.") for k in keys):
        return "pretrain"
    if "visual_encoder" in tops and "text_encoder" in tops:
        return "retrieval"
    raise ValueError(
        f"not an ALBEF checkpoint: none of its {len(keys)} keys (e.g. {keys[:3]}) has the "
        "layout of an official ALBEF model or of an albef_pl task"
    )


def _text_layers(keys: Iterable[str], prefix: str) -> tuple[int, int | None]:
    """(number of layers, first layer with cross-attention) under ``prefix``."""
    pattern = re.compile(re.escape(prefix) + r"(?:bert\.)?encoder\.layer\.(\d+)\.(\w+)")
    n, fusion = 0, None
    for key in keys:
        m = pattern.match(key)
        if m:
            i = int(m.group(1))
            n = max(n, i + 1)
            if m.group(2) == "crossattention":
                fusion = i if fusion is None else min(fusion, i)
    return n, fusion


def num_text_layers_of(state: Mapping[str, Any]) -> int:
    """Text-only layers of one of our state dicts (``model.text_encoder.layers.*``)."""
    idx = [int(m.group(1)) for k in state
           if (m := re.match(r"model\.text_encoder\.layers\.(\d+)\.", k))]
    if not idx:
        raise ValueError("the state dict has no model.text_encoder.layers.*")
    return max(idx) + 1


@dataclass
class LoadReport:
    """What loading a checkpoint into a task did.

    Attributes:
        source: file name, or ``<state dict>``.
        layout: kind of the checkpoint (one of :data:`LAYOUTS` or :data:`OURS`).
        target: layout of the task.
        missing: task keys the checkpoint should have filled and did not.
        unexpected: checkpoint keys with no place in the task (official names).
        dropped: checkpoint key -> why it was not loaded though the checkpoint is fine
            (constant buffers, tied duplicates, parts the original also ignores).
        kept: task key -> why it keeps a value that is not in the checkpoint (teacher copied
            from the student, new heads, task state).
        adapted: task key -> how a checkpoint tensor was reshaped to fit (position
            embeddings, queues).
    """

    source: str
    layout: str
    target: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        """True when nothing is missing and nothing unexpected."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        """A few lines for logs and error messages."""

        def few(items: Sequence[str]) -> str:
            return ", ".join(items[:6]) + (f" ... (+{len(items) - 6})" if len(items) > 6 else "")

        lines = [f"{self.source}: {self.layout} checkpoint into a {self.target} task"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {few(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {few(self.unexpected)}")
        reasons: dict[str, int] = {}
        for why in list(self.dropped.values()) + list(self.kept.values()):
            why = re.sub(r"\b\w+(\.\w+){2,}", "<key>", why)  # group reasons naming keys
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  {n} x {why}" for why, n in reasons.items()]
        lines += [f"  {key}: {how}" for key, how in self.adapted.items()]
        return "\n".join(lines)


class WrongCheckpointError(ValueError):
    """The checkpoint is of a kind that cannot initialise the task."""


def _strip(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _to_our_names(
    sd: Mapping[str, torch.Tensor], layout: str, k: int, source: str, report: LoadReport
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Official -> our names; returns the tensors and each our key's official origin."""
    if layout == OURS:
        return dict(sd), {key: key for key in sd}
    _, fusion = _text_layers(sd, "text_encoder.")
    if fusion is not None and fusion != k:
        raise ValueError(
            f"{source}: fusion starts at text layer {fusion} in the checkpoint but the task has "
            f"{k} text-only layers; set text.num_text_layers={fusion}"
        )
    ours, origin = {}, {}
    for key, value in sd.items():
        why = drop_reason(key)
        if why is not None:
            report.dropped[key] = why
            continue
        try:
            name = official_to_ours(key, layout, k)
        except KeyError:
            report.unexpected.append(key)
            continue
        ours[name], origin[name] = value, key
    return ours, origin


def _route(
    ours: Mapping[str, torch.Tensor], origin: Mapping[str, str], source_layout: str,
    target_layout: str, target: Mapping[str, Any], report: LoadReport,
) -> dict[str, torch.Tensor]:
    route = (source_layout, target_layout)
    drops = ORIGINAL_DROPS.get(route, ())
    script = ROUTES.get(route, "the original")
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        places = [t for t in route_targets(key, *route) if t in target]
        for t in places:
            if _narrower_cross_attention(t, value, target, route):
                report.kept[t] = ("decoder cross-attention over question states wider than "
                                  "the image tokens of the fusion layer: fresh")
                continue
            out[t] = value
        if places:
            continue
        if key.startswith(drops):
            report.dropped[origin[key]] = (
                f"not part of the {target_layout} model ({script} ignores it too)"
            )
        elif not key.startswith(("model.", "teacher.", "queue.")):
            report.dropped[origin[key]] = "task state of the source checkpoint"
        else:
            report.unexpected.append(origin[key])
    return out


def _narrower_cross_attention(
    key: str, value: torch.Tensor, target: Mapping[str, Any], route: tuple[str, str]
) -> bool:
    """A pre-trained fusion layer's cross-attention key/value that cannot fill the VQA
    decoder's because the image width differs from the text width (small CPU models; at
    ALBEF's sizes both are 768 and everything is copied, as in VQA.py)."""
    return (
        route == ("pretrain", "vqa") and ".answer_decoder.layers." in key
        and ".crossattention.self." in key and tuple(target[key].shape) != tuple(value.shape)
    )


def _copy_teacher(out: dict[str, torch.Tensor], target: Mapping[str, Any], report: LoadReport):
    """Fill the teacher from the student when the checkpoint has no momentum weights."""
    if any(k.startswith("teacher.") for k in out):
        return
    for key in target:
        student = "model." + key.removeprefix("teacher.")
        if key.startswith("teacher.") and student in out:
            out[key] = out[student]
            report.kept[key] = "copied from the student: the checkpoint has no momentum weights"


def _fit_pos_embed(out: dict[str, torch.Tensor], target: Mapping[str, Any], report: LoadReport):
    for key in [k for k in out if k.endswith("visual_encoder.pos_embed") and k in target]:
        want = tuple(target[key].shape)
        if tuple(out[key].shape) != want:
            before = tuple(out[key].shape)
            out[key] = interpolate_pos_embed(out[key], want[1] - 1)
            report.adapted[key] = f"bicubic {before} -> {want}"


def _fit_queues(out: dict[str, torch.Tensor], target: Mapping[str, Any], report: LoadReport):
    """Keep the newest columns of a queue of another length.

    # NOTE: the newest ``n = min(Q_ckpt, Q_task)`` features are written, oldest first, to
    # columns 0..n-1 and the pointer is set to ``n % Q_task``: the next writes replace the
    # task's own random columns first (when the task's queue is longer), then the oldest
    # loaded feature. Recent teacher features are better negatives than random vectors.
    """
    name = "queue.image_queue"
    if name not in out or name not in target or out[name].shape == target[name].shape:
        return
    q_ckpt, q_task = out[name].shape[-1], target[name].shape[-1]
    if out[name].shape[0] != target[name].shape[0]:
        return  # an embedding-size mismatch is reported by the shape check
    ptr = int(out["queue.queue_ptr"][0]) if "queue.queue_ptr" in out else 0
    n = min(q_ckpt, q_task)
    cols = (ptr - n + torch.arange(n)) % q_ckpt  # the n newest columns, oldest first
    for key in ("queue.image_queue", "queue.text_queue", "queue.idx_queue"):
        if key in out and key in target:
            fitted = target[key].detach().clone()
            fitted[:, :n] = out[key][:, cols].to(fitted.dtype)
            out[key] = fitted
    out["queue.queue_ptr"] = torch.tensor([n % q_task], dtype=torch.long)
    msg = (f"queue of {q_ckpt} columns into {q_task}: kept the {n} newest features "
           f"(columns 0..{n - 1}), pointer {n % q_task}")
    report.adapted["queue"] = msg
    _logger.warning("%s: %s", report.source, msg)


def _check_shapes(out: Mapping[str, torch.Tensor], target: Mapping[str, Any], origin, source):
    bad = [
        f"{origin.get(k, k)} {tuple(v.shape)} vs task {k} {tuple(target[k].shape)}"
        for k, v in out.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if bad:
        raise ValueError(
            f"{source} does not fit the task's configuration ({len(bad)} tensors differ in "
            f"shape, e.g. {bad[:3]}); build the task with the checkpoint's sizes"
        )


def _kept_reason(key: str, route: tuple[str, str], loaded: Iterable[str]) -> str | None:
    target = route[1]
    if not key.startswith(("model.", "teacher.", "queue.")):
        return "task state, not stored in official checkpoints"
    if key.startswith("queue.") and not any(k.startswith("queue.") for k in loaded):
        return "the checkpoint has no queues: the task's random unit vectors are kept"
    if key.startswith(NEW_HEADS.get(route, ())):
        return f"new head of the {target} task: fresh initialisation, as in {ROUTES[route]}"
    if key == "queue.idx_queue" and route[0] != "retrieval":
        return "image ids of the queue start at -100, as in Retrieval.py"
    if target in LAYOUTS and not key.startswith(layout_prefixes(target)):
        return f"not part of the official {target} model; unused by the task"
    return None


def convert_state_dict(
    state: Mapping[str, Any],
    target: Mapping[str, Any],
    target_layout: str | None = None,
    source: str = "<state dict>",
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Turn an official (or our own) state dict into the state dict of a task.

    Args:
        state: the checkpoint: flat or wrapped in ``{"model": ...}`` / ``{"state_dict": ...}``,
            with or without ``module.``, with or without momentum weights and queues.
        target: the task's current state dict (tensors or meta tensors); its keys decide
            what is filled, its values fill resized queues.
        target_layout: the task's layout; inferred from ``target`` when None.
        source: the file name, for messages.

    Returns:
        Tensors under the task's names (ready for ``load_state_dict(strict=False)``) and the
        report.

    Raises:
        WrongCheckpointError: the checkpoint is of a kind that cannot initialise this task.
        ValueError: not an ALBEF checkpoint, or sizes that do not fit the task.
    """
    sd = _strip(state)
    layout = detect_layout(sd)
    target_layout = target_layout or infer_task_layout(target)
    source_layout = infer_task_layout(sd) if layout == OURS else layout
    route = (source_layout, target_layout)
    if source_layout != target_layout and route not in ROUTES:
        starts = [s for (s, t) in ROUTES if t == target_layout] + [target_layout]
        raise WrongCheckpointError(
            f"{source} is a {source_layout} checkpoint ({'ours' if layout == OURS else 'official'}"
            f", {len(sd)} tensors, e.g. {next(iter(sd), None)!r}); a {target_layout} task "
            f"starts from a checkpoint of kind: {', '.join(dict.fromkeys(starts))}"
        )
    report = LoadReport(source, layout, target_layout)
    k = num_text_layers_of(target)
    ours, origin = _to_our_names(sd, layout, k, source, report)
    out = _route(ours, origin, source_layout, target_layout, target, report)
    origin = {t: origin[key] for key in ours for t in route_targets(key, *route) if t in out}

    _copy_teacher(out, target, report)
    _fit_pos_embed(out, target, report)
    _fit_queues(out, target, report)
    _check_shapes(out, target, origin, source)
    for key in target:
        if key not in out and key not in report.kept:
            why = _kept_reason(key, route, ours)
            if why is None:
                report.missing.append(key)
            else:
                report.kept[key] = why
    return out, report


def load_official_into_task(
    task: nn.Module,
    path_or_state_dict: str | Path | Mapping[str, Any],
    strict_report: bool = True,
    *,
    source: str | None = None,
) -> LoadReport:
    """Load an official ALBEF checkpoint (or one of ours) into a task, student and teacher.

    Position embeddings are resized bicubically when the task's image size differs; a
    checkpoint without momentum weights fills the teacher from the student; queues of
    another length keep their newest features. Files are read with
    ``torch.load(weights_only=True)`` (or safetensors).

    Args:
        task: an :class:`~albef_pl.tasks.base.ALBEFTask` (anything with ``model``, ``teacher``
            and ``queue`` submodules).
        path_or_state_dict: a ``.pth``/``.ckpt``/``.safetensors`` file or a state dict.
        strict_report: raise when the report has missing or unexpected keys (otherwise they
            are logged and everything that fits is loaded).
        source: name of the checkpoint in messages (default: the path).

    Returns:
        The :class:`LoadReport`.
    """
    if isinstance(path_or_state_dict, (str, Path)):
        state = read_state_dict(path_or_state_dict)
        source = source or str(path_or_state_dict)
    else:
        state, source = path_or_state_dict, source or "<state dict>"
    target = task.state_dict()
    out, report = convert_state_dict(state, target, task_layout(task), source)
    if not report.clean:
        if strict_report:
            raise ValueError(f"checkpoint does not match the task:\n{report.summary()}")
        _logger.warning("loading what fits:\n%s", report.summary())
    result = task.load_state_dict(out, strict=False)
    if result.unexpected_keys:  # convert_state_dict only returns names of the task
        raise AssertionError(f"internal: unexpected {result.unexpected_keys[:5]}")
    _logger.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------
# Export
def _shapes(state: Mapping[str, Any]) -> dict[str, Shape]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def infer_sizes(state: Mapping[str, Any]) -> OfficialSizes:
    """Sizes of a flat official state dict (any layout), read from its shapes.

    ``state`` maps keys to tensors or to shapes; sizes it does not show keep their
    defaults (an SNLI-VE file has no ``embed_dim``, for instance).
    """
    shape = _shapes(state)
    d = OfficialSizes()

    def dim(pattern: str, axis: int, default: int) -> int:
        found = next((s for k, s in shape.items() if re.fullmatch(pattern, k)), None)
        return found[axis] if found is not None else default

    bert = r"text_encoder\.(?:bert\.)?"
    n_layers, fusion = _text_layers(shape, "text_encoder.")
    block = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
    blocks = [int(m.group(1)) for k in shape if (m := block.match(k))]
    tokens = dim(r"visual_encoder\.pos_embed", 1, d.num_patches + 1)
    return OfficialSizes(
        vocab_size=dim(bert + r"embeddings\.word_embeddings\.weight", 0, d.vocab_size),
        hidden_size=dim(bert + r"embeddings\.word_embeddings\.weight", 1, d.hidden_size),
        num_hidden_layers=n_layers or d.num_hidden_layers,
        fusion_layer=d.fusion_layer if fusion is None else fusion,
        intermediate_size=dim(bert + r"encoder\.layer\.0\.intermediate\.dense\.weight", 0,
                              d.intermediate_size),
        max_position_embeddings=dim(bert + r"embeddings\.position_embeddings\.weight", 0,
                                    d.max_position_embeddings),
        type_vocab_size=dim(bert + r"embeddings\.token_type_embeddings\.weight", 0,
                            d.type_vocab_size),
        vision_width=dim(r"visual_encoder\.pos_embed", 2, d.vision_width),
        depth=max(blocks) + 1 if blocks else d.depth,
        mlp_hidden=dim(r"visual_encoder\.blocks\.0\.mlp\.fc1\.weight", 0, d.mlp_hidden),
        patch_size=dim(r"visual_encoder\.patch_embed\.proj\.weight", 2, d.patch_size),
        num_patches=tokens - 1,
        embed_dim=dim(r"vision_proj\.weight|image_queue", 0, d.embed_dim),
        queue_size=dim(r"image_queue", 1, d.queue_size),
        decoder_layers=_text_layers(shape, "text_decoder.")[0] or d.decoder_layers,
        num_classes=dim(r"cls_head\.2\.weight", 0, d.num_classes),
    )


def export_official(
    task_or_state_dict: nn.Module | Mapping[str, torch.Tensor], layout: str | None = None
) -> dict[str, torch.Tensor]:
    """Our weights in the official layout, every key of the original in its order.

    The constant ``position_ids`` buffers and the tied MLM-decoder aliases are restored, so
    the result loads into the original model with ``strict=True``. Tensors share memory with
    the task (the aliases with their sources, as in the original).

    Args:
        task_or_state_dict: a task or its state dict (``model.*``, ``teacher.*``, ``queue.*``).
        layout: the official layout to write; the task's own by default.
    """
    if isinstance(task_or_state_dict, nn.Module):
        layout = layout or task_layout(task_or_state_dict)
        state = task_or_state_dict.state_dict()
    else:
        state = _strip(task_or_state_dict)
        layout = layout or infer_task_layout(state)
    _check_layout(layout)
    k = num_text_layers_of(state)
    wanted = layout_prefixes(layout)
    out = {ours_to_official(key, layout, k): v.detach()
           for key, v in state.items() if key.startswith(wanted)}
    for alias, src in tied_aliases(list(out)).items():
        out[alias] = out[src]
    sizes = infer_sizes(out)
    order = official_layout(layout, sizes)
    for key in order:
        if key.endswith("embeddings.position_ids"):
            out[key] = torch.arange(order[key][1], dtype=torch.long).unsqueeze(0)
    if set(order) != set(out):
        lacking, extra = sorted(set(order) - set(out)), sorted(set(out) - set(order))
        raise ValueError(f"cannot write the {layout} layout: lacking {lacking[:5]}, "
                         f"extra {extra[:5]}")
    return {key: out[key] for key in order}


# ---------------------------------------------------------------------------------------------
# Command line
TASKS = {
    "pretrain": "albef_pl.tasks.pretrain:PretrainTask",
    "retrieval": "albef_pl.tasks.retrieval:RetrievalTask",
    "ve": "albef_pl.tasks.ve:VisualEntailmentTask",
    "vqa": "albef_pl.tasks.vqa:VQATask",
    "nlvr2_ta": "albef_pl.tasks.nlvr2:NLVR2TextAssignmentTask",
    "nlvr2": "albef_pl.tasks.nlvr2:NLVR2Task",
    "grounding": "albef_pl.tasks.grounding:GroundingTask",
}


def _task_class(name: str) -> type:
    spec = TASKS.get(name, name)
    module, _, cls = spec.partition(":")
    if not cls:
        raise SystemExit(f"--task {name!r}: expected one of {sorted(TASKS)} or 'module:Class'")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as err:
        raise SystemExit(f"--task {name!r}: {spec} is not available here ({err})") from err


def task_kwargs_for(
    state: Mapping[str, Any],
    img_size: int | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    queue_size: int | None = None,
) -> dict[str, Any]:
    """Task arguments that reproduce an official checkpoint's model (no weights loaded).

    # NOTE: head counts are not visible in shapes; they default to width / 64, which is
    # right for every released ALBEF checkpoint (ViT-B/16 and BERT-base, 12 heads each).
    """
    s = infer_sizes(_strip(state))
    try:
        layout = detect_layout(_strip(state))
    except ValueError:  # not an ALBEF file: loading it reports that, naming the file
        layout = None
    if layout in ("nlvr2_ta", "nlvr2"):
        # NLVR2 tasks are configured with the pre-trained BERT's depth and double its fusion
        # layers themselves (2 * (L - k) pair layers).
        s = dataclasses.replace(
            s, num_hidden_layers=s.fusion_layer + (s.num_hidden_layers - s.fusion_layer) // 2)
    grid = round(s.num_patches**0.5)
    vision = dict(
        model_name="vit_base_patch16_224", img_size=img_size or grid * s.patch_size,
        patch_size=s.patch_size, embed_dim=s.vision_width, depth=s.depth,
        num_heads=vision_heads or max(1, s.vision_width // 64),
        mlp_ratio=s.mlp_hidden / s.vision_width,
    )
    text = dict(
        pretrained=None, vocab_size=s.vocab_size, hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=text_heads or max(1, s.hidden_size // 64),
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position_embeddings, type_vocab_size=s.type_vocab_size,
        num_text_layers=s.fusion_layer,
    )
    kwargs: dict[str, Any] = dict(vision=vision, text=text, embed_dim=s.embed_dim,
                                  queue_size=queue_size or s.queue_size, init_weights=False)
    sd = _strip(state)
    if "temp" in sd:
        kwargs["temp"] = float(sd["temp"])
    if any(k.startswith("text_decoder.") for k in sd):  # a VQA checkpoint: VQATask's depth
        kwargs["decoder_layers"] = s.decoder_layers
    return kwargs


def lightning_checkpoint(task: nn.Module, **extra: Any) -> dict[str, Any]:
    """A checkpoint dict that ``Trainer.fit/validate/test(ckpt_path=...)`` and
    ``Task.load_from_checkpoint`` accept.

    It holds the weights, the hyper-parameters and empty optimizer and scheduler lists: with
    no ``loops`` entry, ``fit`` starts at step 0 with fresh optimizer state (Lightning
    restores nothing from empty lists).
    """
    import lightning

    hparams = dict(task.hparams)
    # LightningCLI rebuilds the model from these when given --ckpt_path; without the class
    # path it would try them on the generic LightningModule and fail.
    # Same two entries as a checkpoint saved under LightningCLI, so that load_from_checkpoint
    # hands them to Lightning's instantiator instead of the task's __init__.
    hparams.setdefault("_class_path", f"{type(task).__module__}.{type(task).__qualname__}")
    hparams.setdefault("_instantiator", "lightning.pytorch.cli.instantiate_module")
    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": task.state_dict(),
        "optimizer_states": [],
        "lr_schedulers": [],
        "hyper_parameters": hparams,
    }
    if getattr(task, "_hparams_name", None):
        ckpt["hparams_name"] = task._hparams_name
    ckpt.update(extra)
    return ckpt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="albef-pl-convert",
        description="Convert an official ALBEF checkpoint into a Lightning checkpoint of an "
        "albef_pl task (or back, with --to-official).",
    )
    p.add_argument("src", help="official .pth (or, with --to-official, our .ckpt)")
    p.add_argument("dst", help="output file")
    p.add_argument("--task", default="pretrain",
                   help=f"task kind: {', '.join(TASKS)} or module:Class (default pretrain)")
    p.add_argument("--img-size", type=int, help="image size of the task (pos_embed resized)")
    p.add_argument("--queue-size", type=int, help="queue length of the task (default: the "
                   "checkpoint's; a shorter queue keeps the newest features)")
    p.add_argument("--vision-heads", type=int, help="ViT heads (default width / 64)")
    p.add_argument("--text-heads", type=int, help="BERT heads (default width / 64)")
    p.add_argument("--to-official", action="store_true",
                   help="write our Lightning checkpoint SRC in the official layout")
    p.add_argument("--layout", choices=LAYOUTS, help="layout for --to-official "
                   "(default: the task's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``albef-pl-convert``: official checkpoint -> Lightning checkpoint, or back."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.to_official:
        official = export_official(read_state_dict(args.src), args.layout)
        torch.save({"model": official}, args.dst)
        _logger.info("wrote %d official keys to %s", len(official), args.dst)
        return 0

    state = read_state_dict(args.src)
    kwargs = task_kwargs_for(state, args.img_size, args.vision_heads, args.text_heads,
                             args.queue_size)
    task = _task_class(args.task)(**kwargs)
    try:
        report = load_official_into_task(task, state, source=str(args.src))
    except ValueError as err:
        print(f"albef-pl-convert: {args.src}: {err}", file=sys.stderr)
        return 2
    meta = {"source": str(args.src), "layout": report.layout, "dropped": report.dropped,
            "kept": sorted(report.kept), "adapted": report.adapted}
    torch.save(lightning_checkpoint(task, albef_converted_from=meta), args.dst)
    print(f"wrote {args.dst}: {type(task).__name__} at {kwargs['vision']['img_size']} px")
    return 0


__all__ = [
    "LAYOUTS",
    "LoadReport",
    "OfficialSizes",
    "WrongCheckpointError",
    "convert_state_dict",
    "detect_layout",
    "drop_reason",
    "export_official",
    "infer_sizes",
    "infer_task_layout",
    "lightning_checkpoint",
    "load_official_into_task",
    "main",
    "official_layout",
    "official_to_ours",
    "ours_to_official",
    "route_targets",
    "task_kwargs_for",
]
