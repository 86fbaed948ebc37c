"""Our transformer against diffusers' HunyuanVideoTransformer3DModel on the same (random) weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from hvbatch.models.hunyuan_video import TextConditioning, load_transformer
from tests.helpers import DIFFUSERS_OTHER, DIFFUSERS_SMALL, cond_of, make_inputs, randomize_, rel_err


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    for name, kwargs in (("small", DIFFUSERS_SMALL), ("other", DIFFUSERS_OTHER)):
        reference = randomize_(HunyuanVideoTransformer3DModel(**kwargs), seed=len(name)).eval()
        folder = tmp_path_factory.mktemp(name) / "transformer"
        reference.save_pretrained(folder)
        out[name] = (folder, reference)
    return out


def _reference_forward(reference: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    guidance = inputs["guidance"] if reference.config.guidance_embeds else None
    with torch.no_grad():
        return reference(
            hidden_states=inputs["x"],
            timestep=inputs["t"],
            encoder_hidden_states=inputs["text_states"],
            encoder_attention_mask=inputs["text_mask"],
            pooled_projections=inputs["text_states_2"],
            guidance=guidance,
            return_dict=False,
        )[0]


def _our_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], cond_of(inputs))


CASES = [
    # (model, batch, latent frames, latent height, latent width, valid text lengths)
    ("small", 1, 1, 4, 6, [11]),  # one latent frame, padded text
    ("small", 1, 3, 6, 10, [16]),  # odd token grid (3 x 5), no padding at all
    ("small", 2, 2, 4, 4, [5, 13]),  # batch 2 with different text lengths
    ("small", 2, 5, 2, 6, [16, 3]),
    ("other", 2, 3, 3, 5, [7, 7]),  # patch 1, odd latent sizes, no guidance embedder
    ("other", 1, 2, 5, 3, [1]),
]


@pytest.mark.parametrize(("name", "batch", "frames", "height", "width", "text_lens"), CASES)
def test_forward_matches_diffusers(
    saved_models: dict[str, tuple[Path, torch.nn.Module]],
    name: str,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_lens: list[int],
) -> None:
    folder, reference = saved_models[name]
    model = load_transformer(folder, dtype=torch.float32)
    assert model.checkpoint_format == "diffusers folder"
    inputs = make_inputs(
        model.config, batch=batch, frames=frames, height=height, width=width, text_lens=text_lens
    )
    ours = _our_forward(model, inputs)
    ref = _reference_forward(reference, inputs)
    assert ours.shape == inputs["x"].shape == ref.shape
    assert rel_err(ours, ref) <= 1e-5


def test_each_sample_sees_only_its_own_text(saved_models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    """Batch 2 with lengths 4 and 12 equals the two samples run alone; padding content is irrelevant."""
    model = load_transformer(saved_models["small"][0], dtype=torch.float32)
    inputs = make_inputs(model.config, batch=2, frames=2, height=4, width=4, text_lens=[4, 12], seed=3)
    batched = _our_forward(model, inputs)
    for b in range(2):
        alone = {k: v[b : b + 1] for k, v in inputs.items()}
        assert rel_err(batched[b : b + 1], _our_forward(model, alone)) < 1e-6
    scrambled = dict(inputs)
    scrambled["text_states"] = inputs["text_states"].clone()
    scrambled["text_states"][0, 4:] = 1e3 * torch.randn(12, model.config.text_dim)
    assert torch.equal(_our_forward(model, scrambled)[0], batched[0])


def test_batch_one_calls_attention_without_padding(
    saved_models: dict[str, tuple[Path, torch.nn.Module]],
) -> None:
    """For batch 1 every attention call sees image + valid text tokens only, in one unmasked call."""
    model = load_transformer(saved_models["small"][0], dtype=torch.float32)
    inputs = make_inputs(model.config, batch=1, frames=1, height=4, width=6, text_lens=[9])
    seen: list[tuple[tuple[int, ...], int]] = []

    def recording_attention(q, k, v, *, num_text_tokens=0):  # type: ignore[no-untyped-def]
        seen.append((tuple(q.shape), num_text_tokens))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    model.attention_fn = recording_attention
    _our_forward(model, inputs)
    num_blocks = model.config.num_double_blocks + model.config.num_single_blocks
    assert seen == [((1, 1 * 2 * 3 + 9, 4, 16), 9)] * num_blocks


def test_bad_inputs_are_refused(saved_models: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    model = load_transformer(saved_models["small"][0], dtype=torch.float32)
    inputs = make_inputs(model.config, batch=1, frames=1, height=4, width=4, text_lens=[5])
    left_padded = dict(inputs, text_mask=inputs["text_mask"].flip(1))
    with pytest.raises(ValueError, match="right-padded"):
        _our_forward(model, left_padded)
    odd = dict(inputs, x=torch.randn(1, 16, 1, 5, 4))
    with pytest.raises(ValueError, match="H=5"):
        _our_forward(model, odd)
    unguided = TextConditioning.from_mask(inputs["text_states"], inputs["text_mask"], inputs["text_states_2"])
    with pytest.raises(ValueError, match="guidance"):
        model(inputs["x"], inputs["t"], unguided)
