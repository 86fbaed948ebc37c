"""The HunyuanVideo-1.5 conditioning object: CFG batching, selection, validation."""

from __future__ import annotations

import pytest
import torch

from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning as Cond
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from tests.helpers import rel_err
from tests.hv15_helpers import SMALL, make_inputs


def _cond(text: int, text_lens: list[int], glyph: int, glyph_lens: list[int], image: bool, seed: int) -> Cond:
    g = torch.Generator().manual_seed(seed)
    batch = len(text_lens)
    return Cond(
        torch.randn(batch, text, 4, generator=g), text_lens,
        torch.randn(batch, glyph, 3, generator=g), glyph_lens,
        torch.randn(batch, 5, 2, generator=g) if image else None,
        torch.randn(batch, 9, 2, 3, 3, generator=g) if image else None,
    )  # fmt: skip


def test_cat_right_pads_and_keeps_lengths() -> None:
    uncond, cond = _cond(6, [2], 1, [0], False, 0), _cond(9, [9, 4], 4, [3, 1], False, 1)
    batch = Cond.cat([uncond, cond])
    assert batch.batch_size == 3 and batch.is_text_to_video
    assert batch.text_lens == (2, 9, 4) and batch.glyph_lens == (0, 3, 1)
    assert batch.text_states.shape == (3, 9, 4) and batch.glyph_states.shape == (3, 4, 3)
    assert torch.equal(batch.text_states[0, :6], uncond.text_states[0])
    assert not batch.text_states[0, 6:].any()
    assert torch.equal(batch.select(1).text_states, cond.text_states[:1])
    assert batch.select(-1).text_lens == (4,) and batch.select(2).glyph_lens == (1,)
    assert batch.to("cpu").text_lens == batch.text_lens
    with pytest.raises(IndexError):
        batch.select(3)


def test_cat_of_image_conditioning_and_its_zero_latents() -> None:
    with_image = _cond(3, [3], 2, [2], True, 2)
    no_latents = Cond(with_image.text_states, (1,), with_image.glyph_states, (0,), with_image.image_embeds)
    batch = Cond.cat([no_latents, with_image])
    assert batch.image_embeds is not None and batch.image_embeds.shape == (2, 5, 2)
    assert batch.cond_latents is not None and not batch.cond_latents[0].any()
    assert torch.equal(batch.cond_latents[1], with_image.cond_latents[0])  # type: ignore[index]
    with pytest.raises(ValueError, match="cannot batch text-to-video with image-to-video"):
        Cond.cat([_cond(3, [3], 2, [2], False, 3), with_image])


def test_cfg_batch_equals_each_branch_alone() -> None:
    """The model on `cat([uncond, cond])` gives each branch's own output (different lengths)."""
    model = random_transformer(SMALL, seed=2)
    short = make_inputs(SMALL, grid=(2, 3, 2), text_lens=[3], glyph_lens=[0], image=True, text_len=4, seed=1)
    long = make_inputs(SMALL, grid=(2, 3, 2), text_lens=[11], glyph_lens=[5], image=True, text_len=12, seed=2)
    long.x = short.x
    batch = Cond.cat([short.cond(), long.cond()])
    with torch.no_grad():
        both = model(torch.cat([short.x, long.x]), torch.tensor([700.0, 700.0]), batch)
        for b, inputs in enumerate((short, long)):
            alone = model(inputs.x, torch.tensor([700.0]), inputs.cond())
            assert rel_err(both[b : b + 1], alone) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(text_lens=(0,)), r"text_lens \[0\] must lie in \[1, 4\]"),
        (dict(glyph_lens=(4,)), r"glyph_lens \[4\] must lie in \[0, 3\]"),
        (dict(text_lens=(1, 1)), "text_states has batch 1 and 2 lengths"),
        (
            dict(image_embeds=torch.zeros(2, 5, 2)),
            r"image_embeds has shape \(2, 5, 2\), expected \[1, tokens, C\]",
        ),
        (dict(cond_latents=torch.zeros(1, 9, 2)), r"cond_latents has shape \(1, 9, 2\)"),
    ],
)
def test_bad_conditioning_is_named(kwargs: dict[str, object], message: str) -> None:
    fields = dict(
        text_states=torch.zeros(1, 4, 2), text_lens=(2,), glyph_states=torch.zeros(1, 3, 2), glyph_lens=(0,)
    )
    with pytest.raises(ValueError, match=message):
        Cond(**{**fields, **kwargs})  # type: ignore[arg-type]


def test_masks_must_be_right_padded() -> None:
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="glyph mask must be right-padded"):
        Cond.from_masks(torch.zeros(1, 2, 2), None, torch.zeros(1, 3, 2), mask)
    cond = Cond.from_masks(torch.zeros(1, 2, 2), None, torch.zeros(1, 3, 2), torch.tensor([[1, 1, 0]]))
    assert cond.text_lens == (2,) and cond.glyph_lens == (2,)
