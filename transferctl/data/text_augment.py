"""Text augmentations applied to whole batches of token ids on the training device, each text with its own draws.

A view of a text keeps a random span of its tokens (a crop), deletes some of the rest, and replaces some of
what is left by the mask token; the kept tokens close up on the left, so a view is padded on the right as its
text was. The boundary tokens ([CLS], [SEP]) and the padding are never touched. The `none` augmentation gives
SimCSE's views instead: the same ids twice, made different by the encoder's dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field

from transferctl.errors import ConfigError
from transferctl.registry import AUGMENTATIONS

Share = Annotated[float, Field(ge=0.0, lt=1.0)]
KeptShare = tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]]


def close_up(ids: torch.Tensor, keep: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The kept ids of each row moved to its start, in order, and the rest of the row filled with `pad_id`."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    moved = ids.gather(1, order)
    kept = keep.sum(dim=1, keepdim=True)
    return moved.masked_fill(torch.arange(ids.shape[1], device=ids.device) >= kept, pad_id)


@dataclass
class TextAugment:
    """A random, per-text augmentation of a batch of token ids (N, length)."""

    special_ids: dict[str, Any] = field(repr=False)  # pad, mask, keep (boundary ids), vocab_size: from the tokenizer
    crop: tuple[float, float] = (1.0, 1.0)  # the share of a text's tokens a view keeps, as one span: uniform in this range
    delete_p: float = 0.0  # each remaining token is deleted with this probability
    mask_p: float = 0.0  # each remaining token is replaced by the mask token with this probability

    def __call__(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pad, mask_id = self.special_ids["pad"], self.special_ids["mask"]
        content = (ids != pad) & ~torch.isin(ids, torch.tensor(self.special_ids["keep"], device=ids.device, dtype=ids.dtype))
        keep = torch.ones_like(content)
        if self.crop != (1.0, 1.0):
            keep &= self._span(content, generator) | ~content
        if self.delete_p > 0:
            deleted = torch.rand(ids.shape, generator=generator, device=ids.device) < self.delete_p
            survivors = content & keep & ~deleted
            # a text never loses all its tokens: where none would survive, the deletion is skipped
            deleted &= survivors.sum(dim=1, keepdim=True) > 0
            keep &= ~(deleted & content)
        out = close_up(ids, keep, pad) if not keep.all() else ids
        if self.mask_p > 0:
            moved_content = close_up(content.long(), keep, 0).bool()
            masked = (torch.rand(ids.shape, generator=generator, device=ids.device) < self.mask_p) & moved_content
            out = out.masked_fill(masked, mask_id)
        return out

    def _span(self, content: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """True on one random span of each row's content tokens, of a random share of them."""
        n = content.shape[0]
        count = content.sum(dim=1).float()
        low, high = self.crop
        share = low + (high - low) * torch.rand(n, generator=generator, device=content.device)
        span = (count * share).ceil().clamp_min(1)
        start = ((count - span + 1) * torch.rand(n, generator=generator, device=content.device)).floor().clamp_min(0)
        rank = content.long().cumsum(dim=1) - 1  # each content token's place among the row's content tokens
        return content & (rank >= start.unsqueeze(1)) & (rank < (start + span).unsqueeze(1))

    def effects(self) -> frozenset[str]:
        """What it can do to a text: "crop", "deletion", "masking"."""
        active = {"crop": self.crop != (1.0, 1.0), "deletion": self.delete_p > 0, "masking": self.mask_p > 0}
        return frozenset(name for name, on in active.items() if on)


def _text_augment(special_ids: dict[str, Any], crop: tuple[float, float], delete_p: float, mask_p: float) -> TextAugment:
    if mask_p > 0 and special_ids["mask"] is None:
        raise ConfigError("data.augment.mask_p: the tokenizer has no mask token ([MASK] or <mask>); set mask_p=0 or use another tokenizer")
    if crop[0] > crop[1]:
        raise ConfigError(f"data.augment.crop: {list(crop)} is not a range (low, high); swap them")
    return TextAugment(special_ids, crop=crop, delete_p=delete_p, mask_p=mask_p)


@AUGMENTATIONS.register(modality="text")
def text_simclr(special_ids: dict[str, Any], crop: KeptShare = (0.5, 1.0), delete_p: Share = 0.1, mask_p: Share = 0.15) -> TextAugment:
    """Contrastive views of texts: a random span of 50-100% of the tokens, 10% of them deleted, 15% masked."""
    return _text_augment(special_ids, crop, delete_p, mask_p)


@AUGMENTATIONS.register(modality="text")
def text_light(special_ids: dict[str, Any], crop: KeptShare = (1.0, 1.0), delete_p: Share = 0.05, mask_p: Share = 0.05) -> TextAugment:
    """Fine-tuning's light augmentation of texts: 5% of the tokens deleted and 5% masked."""
    return _text_augment(special_ids, crop, delete_p, mask_p)
