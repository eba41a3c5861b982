"""Momentum teacher update and the feature queues of ALBEF's contrastive loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every teacher parameter.

    Parameters are paired by name; student parameters without a teacher twin (the ITM head,
    the temperature) are ignored. Buffers are not averaged. The two products are rounded
    separately, as in the original, which makes the result bitwise equal to it.
    """
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        t_list.append(t.data)
        s_list.append(student_params[name].data)
    if not t_list:
        return
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, torch._foreach_mul(s_list, 1.0 - momentum))


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 (no gradient).

    Works with no process group (returns the input) and with different first dimensions on
    different ranks (pads to the largest, then trims).
    """
    if world_size() == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


class FeatureQueue(nn.Module):
    """Queues of teacher features (and image ids) for ITC, one column per past sample.

    # NOTE: the original asserts ``queue_size % global_batch == 0``; here writes wrap around,
    # so any global batch size works (a batch larger than the queue keeps its last samples).

    Args:
        embed_dim: feature size E.
        queue_size: number of stored samples Q.
        with_idx: also keep an id queue (retrieval, grounding), initialised to -100.
        start_empty: start with zero columns that :meth:`filled` reports as not yet written,
            instead of the original's random unit vectors (see ``ALBEFTask(empty_queue=...)``).
    """

    def __init__(
        self, embed_dim: int, queue_size: int, with_idx: bool = False, start_empty: bool = False
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self.start_empty = start_empty
        if start_empty:
            image, text = torch.zeros(embed_dim, queue_size), torch.zeros(embed_dim, queue_size)
        else:
            image = nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0)
            text = nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0)
        self.register_buffer("image_queue", image)
        self.register_buffer("text_queue", text)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.with_idx = with_idx
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))

    @torch.no_grad()
    def filled(self) -> torch.Tensor | None:
        """(Q,) True for columns written since an empty start; None when every column counts.

        A written column holds unit-norm features, so a column is empty exactly when it is
        all zeros (this also holds after loading a checkpoint).
        """
        if not self.start_empty:
            return None
        return self.image_queue.abs().sum(dim=0) > 0

    @torch.no_grad()
    def enqueue(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        idx: torch.Tensor | None = None,
    ) -> None:
        """Gather (B, E) features from every process and write them at the pointer."""
        image_feat = concat_all_gather(image_feat.detach().float())
        text_feat = concat_all_gather(text_feat.detach().float())
        if self.with_idx:
            if idx is None:
                raise ValueError("this queue keeps image ids: pass idx to enqueue")
            idx = concat_all_gather(idx.detach().view(-1).long())
        n = image_feat.shape[0]
        if n > self.queue_size:  # only the newest fit
            image_feat, text_feat = image_feat[-self.queue_size :], text_feat[-self.queue_size :]
            idx = None if idx is None else idx[-self.queue_size :]
        ptr = int(self.queue_ptr.item())
        cols = (ptr + torch.arange(image_feat.shape[0], device=self.image_queue.device)) % self.queue_size
        self.image_queue[:, cols] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, cols] = text_feat.T.to(self.text_queue.dtype)
        if self.with_idx:
            self.idx_queue[0, cols] = idx.to(self.idx_queue.device)
        self.queue_ptr[0] = (ptr + n) % self.queue_size
