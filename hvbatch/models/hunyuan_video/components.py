"""Build HunyuanVideo 1.0's components: from files of either checkpoint layout, or seeded random weights.

`load_components(model_config, device)` is the family's `load`: the transformer, the VAE and the
text encoders (the language model and CLIP-L; for image-to-video the full LLaVA with its vision
tower and image processor), each in its configured dtype on `device`.
"""

from __future__ import annotations

import torch

from hvbatch.config import ModelConfig, torch_dtype
from hvbatch.models.family import Components
from hvbatch.models.hunyuan_video.i2v_text_encoder import load_i2v_text_encoder, tiny_i2v_text_encoder
from hvbatch.models.hunyuan_video.layout import resolve_paths
from hvbatch.models.hunyuan_video.loading import load_transformer, random_transformer
from hvbatch.models.hunyuan_video.text_encoders import load_text_encoder, tiny_text_encoder
from hvbatch.models.hunyuan_video.vae import AutoencoderKLCausal3D, VaeConfig
from hvbatch.models.hunyuan_video.vae_loading import load_vae

# The tiny preset's VAE: the released structure (4 levels, causal 3D convs, mid attention) at
# a width that decodes a small video on a CPU in about a second.
TINY_VAE = VaeConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)


def random_components(model: ModelConfig, device: torch.device) -> Components:
    """Every component with seeded random weights (`model.random_weights`, the tiny preset)."""
    seed = model.random_seed
    transformer = random_transformer(
        model.transformer, seed=seed, dtype=torch_dtype(model.dtype), device=device
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLCausal3D(TINY_VAE)
    vae = vae.to(device=device, dtype=torch_dtype(model.vae_dtype)).eval().requires_grad_(False)
    tiny = tiny_i2v_text_encoder if model.transformer.token_replace else tiny_text_encoder
    text_encoder = tiny(
        model.transformer.text_dim,
        model.transformer.pooled_text_dim,
        seed=seed + 2,
        settings=model.text_encoder,
    )
    text_encoder.llm.to(device=device, dtype=torch_dtype(model.text_encoder_dtype))
    text_encoder.clip.to(device=device, dtype=torch_dtype(model.text_encoder_dtype))
    return Components(transformer, vae, text_encoder)


def load_components(model: ModelConfig, device: torch.device) -> Components:
    """The family's `load`: random weights, or the files under `model.path` / `model.*_path`."""
    if model.random_weights:
        return random_components(model, device)
    paths = resolve_paths(model)
    # A diffusers folder brings its architecture in config.json; official files use the preset's.
    transformer = load_transformer(
        paths.transformer,
        dtype=torch_dtype(model.dtype),
        device=device,
        config=model.transformer,
        load_key=model.transformer_load_key,
    )
    if transformer.config.image_condition_type != model.transformer.image_condition_type:
        found, wanted = transformer.config.image_condition_type, model.transformer.image_condition_type
        raise ValueError(
            f"{paths.transformer} is a checkpoint with image_condition_type={found}, but model={model.name} "
            f"has image_condition_type={wanted}: use the preset of these weights (model=<preset>)"
        )
    vae = load_vae(paths.vae, dtype=torch_dtype(model.vae_dtype), device=device)
    if model.transformer.token_replace:
        encoder = load_i2v_text_encoder(
            paths.text_encoder,
            paths.text_encoder_2,
            tokenizer_dir=paths.tokenizer,
            image_processor_dir=paths.image_processor,
            clip_tokenizer_dir=paths.tokenizer_2,
            settings=model.text_encoder,
            dtype=torch_dtype(model.text_encoder_dtype),
            device=device,
        )
        return Components(transformer, vae, encoder)
    text_encoder = load_text_encoder(
        paths.text_encoder,
        paths.text_encoder_2,
        llm_tokenizer_dir=paths.tokenizer,
        clip_tokenizer_dir=paths.tokenizer_2,
        settings=model.text_encoder,
        dtype=torch_dtype(model.text_encoder_dtype),
        device=device,
    )
    return Components(transformer, vae, text_encoder)
