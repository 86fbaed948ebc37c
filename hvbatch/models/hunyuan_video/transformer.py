"""The HunyuanVideo diffusion transformer (HYVideo-T/2-cfgdistill) with the official parameter names.

Shape legend: B batch, C latent channels, T/Hh/Ww latent frames/height/width, L tokens
(image tokens Li in (t, h, w) order, then text tokens), D hidden size, H heads, hd head dim.

Image-to-video (`config.image_condition_type == "token_replace"`, HunyuanVideo-I2V): the image
stream's first-frame tokens (the leading `cond.first_frame_tokens` of the tokens a forward holds)
take their modulation (shift, scale, gate) from a t = 0 conditioning vector, the other tokens from
the step's, as the official model and diffusers' token-replace blocks do; text tokens and the final
layer always use the step's.

The model holds no distributed code. Attention goes through `self.attention_fn`
(see `hvbatch.models.attention`), and `forward` is split into `embed_image` / `forward_tokens` /
`unpatchify` so that a sequence-parallel runner can shard image tokens and RoPE tables
between the stages without changing this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hvbatch.models.attention import AttentionFn, joint_attention, sdpa_attention
from hvbatch.models.hunyuan_video.conditioning import TextConditioning, embedded_guidance
from hvbatch.models.hunyuan_video.config import TransformerConfig
from hvbatch.models.layers import (
    MLP,
    MLPEmbedder,
    ModulateDiT,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    layer_norm,
    modulate,
    rope_frequencies,
)
from hvbatch.models.protocols import StepCacheHook, conditioning_for_tokens
from hvbatch.models.refiner import SingleTokenRefiner

RopeTables = tuple[torch.Tensor, torch.Tensor]
ROPE_CACHE_SIZE = 4


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = rearrange(qkv, "B L (K H hd) -> K B L H hd", K=3, H=num_heads)
    return q, k, v


class TokenModulation:
    """A stream's modulation vectors (`mods`, one `[B, D]` per chunk), or for its leading `first_tokens`
    tokens the first-frame ones (`first_mods`, token_replace): split per token, no mask."""

    def __init__(
        self,
        mods: Sequence[torch.Tensor],
        first_mods: Sequence[torch.Tensor] | None = None,
        first_tokens: int = 0,
    ) -> None:
        self.mods, self.first_mods = mods, first_mods
        self.first_tokens = first_tokens if first_mods is not None else 0

    def modulate(self, x_BLD: torch.Tensor, shift: int, scale: int) -> torch.Tensor:
        n, mods = self.first_tokens, self.mods
        if not n:
            return modulate(x_BLD, mods[shift], mods[scale])
        assert self.first_mods is not None
        first = modulate(x_BLD[:, :n], self.first_mods[shift], self.first_mods[scale])
        return torch.cat([first, modulate(x_BLD[:, n:], mods[shift], mods[scale])], dim=1)

    def gated(self, y_BLD: torch.Tensor, gate: int) -> torch.Tensor:
        n, mods = self.first_tokens, self.mods
        if not n:
            return mods[gate][:, None] * y_BLD
        assert self.first_mods is not None
        first = y_BLD[:, :n] * self.first_mods[gate][:, None]
        return torch.cat([first, y_BLD[:, n:] * mods[gate][:, None]], dim=1)


class Vectors:
    """The conditioning vectors of one forward: the step's `[B, D]`, and for token_replace the t = 0
    one of the first-frame tokens with how many of this forward's image tokens are first-frame."""

    def __init__(
        self, vec_BD: torch.Tensor, first_BD: torch.Tensor | None = None, first_tokens: int = 0
    ) -> None:
        self.vec_BD, self.first_BD, self.first_tokens = vec_BD, first_BD, first_tokens

    def image(self, mod: nn.Module, chunks: int) -> TokenModulation:
        mods = mod(self.vec_BD).chunk(chunks, dim=-1)
        if self.first_BD is None or not self.first_tokens:
            return TokenModulation(mods)
        return TokenModulation(mods, mod(self.first_BD).chunk(chunks, dim=-1), self.first_tokens)


class MMDoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", ModulateDiT(hidden_size, factor=6))
            setattr(self, f"{stream}_attn_qkv", nn.Linear(hidden_size, 3 * hidden_size))
            setattr(self, f"{stream}_attn_q_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_k_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_proj", nn.Linear(hidden_size, hidden_size))
            setattr(self, f"{stream}_mlp", MLP(hidden_size, mlp_hidden, activation="gelu_tanh"))

    def _qkv(self, stream: str, x_BLD: torch.Tensor, mods: TokenModulation):
        qkv = getattr(self, f"{stream}_attn_qkv")(mods.modulate(layer_norm(x_BLD), 0, 1))
        q, k, v = _split_heads(qkv, self.num_heads)
        q = getattr(self, f"{stream}_attn_q_norm")(q).to(v.dtype)
        k = getattr(self, f"{stream}_attn_k_norm")(k).to(v.dtype)
        return q, k, v

    def _residuals(
        self, stream: str, x_BLD: torch.Tensor, attn_BLD: torch.Tensor, mods: TokenModulation
    ) -> torch.Tensor:
        x_BLD = x_BLD + mods.gated(getattr(self, f"{stream}_attn_proj")(attn_BLD), 2)
        mlp_out = getattr(self, f"{stream}_mlp")(mods.modulate(layer_norm(x_BLD), 3, 4))
        return x_BLD + mods.gated(mlp_out, 5)

    def forward(
        self,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vectors: Vectors,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
        attention_fn: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mods = vectors.image(self.img_mod, 6)
        txt_mods = TokenModulation(self.txt_mod(vectors.vec_BD).chunk(6, dim=-1))
        img_q, img_k, img_v = self._qkv("img", img_BLD, img_mods)
        txt_q, txt_k, txt_v = self._qkv("txt", txt_BLD, txt_mods)
        img_q, img_k = apply_rope(img_q, *rope), apply_rope(img_k, *rope)
        num_image_tokens = img_BLD.shape[1]
        attn = joint_attention(
            attention_fn,
            torch.cat([img_q, txt_q], dim=1),
            torch.cat([img_k, txt_k], dim=1),
            torch.cat([img_v, txt_v], dim=1),
            num_image_tokens=num_image_tokens,
            text_lens=text_lens,
        ).flatten(2)
        img_BLD = self._residuals("img", img_BLD, attn[:, :num_image_tokens], img_mods)
        txt_BLD = self._residuals("txt", txt_BLD, attn[:, num_image_tokens:], txt_mods)
        return img_BLD, txt_BLD


class MMSingleStreamBlock(nn.Module):
    """One stream over `[image ; text]`: linear1 gives q|k|v|mlp, linear2 merges attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        head_dim = hidden_size // num_heads
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.modulation = ModulateDiT(hidden_size, factor=3)

    def forward(
        self,
        x_BLD: torch.Tensor,
        vectors: Vectors,
        num_image_tokens: int,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
        attention_fn: AttentionFn,
    ) -> torch.Tensor:
        mods = vectors.image(self.modulation, 3)  # first-frame tokens lead x = [image ; text]
        qkv, mlp = self.linear1(mods.modulate(layer_norm(x_BLD), 0, 1)).split(
            [3 * self.hidden_size, self.mlp_hidden], dim=-1
        )
        q, k, v = _split_heads(qkv, self.num_heads)
        q = self.q_norm(q).to(v.dtype)
        k = self.k_norm(k).to(v.dtype)
        n = num_image_tokens
        q = torch.cat([apply_rope(q[:, :n], *rope), q[:, n:]], dim=1)
        k = torch.cat([apply_rope(k[:, :n], *rope), k[:, n:]], dim=1)
        attn = joint_attention(attention_fn, q, k, v, num_image_tokens=n, text_lens=text_lens)
        out = self.linear2(torch.cat([attn.flatten(2), F.gelu(mlp, approximate="tanh")], dim=-1))
        return x_BLD + mods.gated(out, 2)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch, tokens flattened in (t, h, w) order (key `img_in.proj`)."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch, stride=patch)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCTHW).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BLD: torch.Tensor, vec_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec_BD).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x_BLD), shift, scale))


class HunyuanVideoTransformer(nn.Module):
    """`model(x, t, cond) -> velocity`: x `[B, C, T, H, W]`, t `[B]`, cond a `TextConditioning`.

    Image-to-video (token_replace) takes the same inputs: x with frame 0 pinned to the image latent
    by the sampler, the LLaVA image tokens in front of the text in `cond.text_states`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.attention_fn: AttentionFn = sdpa_attention
        self._rope_cache: dict[tuple[tuple[int, int, int], torch.device], RopeTables] = {}
        self.compiled_blocks = False
        """Set by `hvbatch.models.runtime.compile_blocks`."""
        hidden, heads, ratio = config.hidden_size, config.num_heads, config.mlp_ratio
        self.patch = (config.patch_size_t, config.patch_size, config.patch_size)
        self.img_in = PatchEmbed(self.patch, config.in_channels, hidden)
        self.txt_in = SingleTokenRefiner(
            config.text_dim, hidden, heads, config.refiner_mlp_ratio, config.num_refiner_blocks
        )
        self.time_in = TimestepEmbedder(hidden)
        self.vector_in = MLPEmbedder(config.pooled_text_dim, hidden)
        self.guidance_in = TimestepEmbedder(hidden) if config.guidance_embed else None
        self.double_blocks = nn.ModuleList(
            [MMDoubleStreamBlock(hidden, heads, ratio) for _ in range(config.num_double_blocks)]
        )
        self.single_blocks = nn.ModuleList(
            [MMSingleStreamBlock(hidden, heads, ratio) for _ in range(config.num_single_blocks)]
        )
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]
        self.final_layer = FinalLayer(hidden, patch_volume, config.out_channels)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype (block linears may hold float8 weights; embedders never do)."""
        return self.time_in.mlp[0].weight.dtype

    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """Latent `[B, C, T, H, W]` -> token grid (T/pt, H/p, W/p); sizes must be patch multiples."""
        _, channels, *sizes = latent_shape
        if channels != self.config.in_channels:
            raise ValueError(f"latent has {channels} channels, the model expects {self.config.in_channels}")
        bad = [f"{n}={s} (patch {p})" for n, s, p in zip("THW", sizes, self.patch, strict=True) if s % p]
        if bad:
            raise ValueError(f"latent sizes not divisible by the patch size: {', '.join(bad)}")
        return (sizes[0] // self.patch[0], sizes[1] // self.patch[1], sizes[2] // self.patch[2])

    def rope(self, grid: tuple[int, int, int], device: torch.device | str) -> RopeTables:
        """RoPE tables of a token grid, built once per grid and device (every step of a video reuses them)."""
        key = (grid, torch.device(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = rope_frequencies(
                grid, list(self.config.rope_axes_dim), self.config.rope_theta, device
            )
        return self._rope_cache[key]

    def embed_image(self, x_BCTHW: torch.Tensor, cond: TextConditioning | None = None) -> torch.Tensor:
        """Latents -> image tokens `[B, Li, D]` (1.0 concatenates nothing from `cond`)."""
        return self.img_in(x_BCTHW.to(self.compute_dtype))

    def transformer_blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def unpatchify(self, out_BLP: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.patch
        return rearrange(
            out_BLP,
            "B (T Hh Ww) (C pt ph pw) -> B C (T pt) (Hh ph) (Ww pw)",
            T=grid[0],
            Hh=grid[1],
            Ww=grid[2],
            pt=pt,
            ph=ph,
            pw=pw,
        )

    def conditioning_vector(
        self, t_B: torch.Tensor, text_states_2: torch.Tensor, guidance_B: torch.Tensor | None
    ) -> torch.Tensor:
        vec_BD = self.time_in(t_B) + self.vector_in(text_states_2.to(self.compute_dtype))
        if self.guidance_in is not None:
            if guidance_B is None:
                raise ValueError(
                    "this model is guidance-distilled: pass the embedded guidance scale (cond.guidance_scale)"
                )
            vec_BD = vec_BD + self.guidance_in(guidance_B)
        return vec_BD

    def forward_tokens(
        self,
        img_BLD: torch.Tensor,
        rope: RopeTables,
        t_B: torch.Tensor,
        cond: TextConditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor:
        """Image tokens (all of them, or this rank's shard) -> final-layer outputs for those tokens.

        Text lengths are host ints in `cond`, so nothing here waits for the device. `t_next_B` is
        not used by this family. With a `step_cache`, the cache may skip the blocks of this step
        (`hvbatch.sampling.cache`).
        """
        del t_next_B
        batch = cond.batch_size
        t_B = t_B.float().reshape(-1).expand(batch)
        guidance_B = None
        if cond.guidance_scale is not None:
            guidance_B = embedded_guidance(cond.guidance_scale, batch, self.compute_dtype, img_BLD.device)
        vectors = Vectors(self.conditioning_vector(t_B, cond.text_states_2, guidance_B))
        if self.config.token_replace:
            vectors = self._first_frame_vectors(vectors, t_B, cond)
        # Text columns padded in every sample carry nothing a valid token may see: drop them.
        txt = cond.text_states[:, : max(cond.text_lens)].to(self.compute_dtype)
        txt_BLD = self.txt_in(txt, t_B, cond.text_lens)
        if self.compiled_blocks:  # one compiled graph for every prompt length
            torch._dynamo.maybe_mark_dynamic(txt_BLD, 1)
        rope = (rope[0].to(img_BLD.device), rope[1].to(img_BLD.device))
        text_lens = cond.ragged
        if step_cache is None:
            img_BLD = self._blocks(img_BLD, txt_BLD, vectors, rope, text_lens, first=0)
        else:
            img_BLD = self._cached_blocks(step_cache, img_BLD, txt_BLD, vectors, rope, text_lens)
        return self.final_layer(img_BLD, vectors.vec_BD)

    def _first_frame_vectors(self, vectors: Vectors, t_B: torch.Tensor, cond: TextConditioning) -> Vectors:
        """token_replace: the first-frame tokens' vector, `time_in(0) + vector_in(pooled)` (no
        guidance term, as in the official model and diffusers)."""
        if cond.first_frame_tokens is None:
            raise ValueError(
                "an image-to-video (token_replace) model needs to know which image tokens are latent "
                "frame 0's: call the model, or forward_tokens with cond.for_image_tokens(grid, start, stop)"
            )
        pooled_BD = self.vector_in(cond.text_states_2.to(self.compute_dtype))
        first_BD = self.time_in(torch.zeros_like(t_B)) + pooled_BD
        return Vectors(vectors.vec_BD, first_BD, cond.first_frame_tokens)

    def _blocks(
        self,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vectors: Vectors,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
        first: int,
    ) -> torch.Tensor:
        """Double blocks from `first` on, then every single block -> image tokens."""
        for block in self.double_blocks[first:]:
            img_BLD, txt_BLD = block(img_BLD, txt_BLD, vectors, rope, text_lens, self.attention_fn)
        num_image_tokens = img_BLD.shape[1]
        x_BLD = torch.cat([img_BLD, txt_BLD], dim=1)
        if self.compiled_blocks:
            torch._dynamo.maybe_mark_dynamic(x_BLD, 1)
        for block in self.single_blocks:
            x_BLD = block(x_BLD, vectors, num_image_tokens, rope, text_lens, self.attention_fn)
        return x_BLD[:, :num_image_tokens]

    def _cached_blocks(
        self,
        cache: StepCacheHook,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vectors: Vectors,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
    ) -> torch.Tensor:
        """`_blocks` from 0, or the input plus the cached residual when the cache says so."""
        first = 0
        if cache.probe_after_first_block:
            block = self.double_blocks[0]
            out_BLD, txt_BLD = block(img_BLD, txt_BLD, vectors, rope, text_lens, self.attention_fn)
            probe_BLD = out_BLD - img_BLD
            img_BLD, first = out_BLD, 1
        else:  # the first block's modulated image input (first-frame tokens by their own vector)
            probe_BLD = vectors.image(self.double_blocks[0].img_mod, 6).modulate(layer_norm(img_BLD), 0, 1)
        if not cache.should_compute(probe_BLD):
            return cache.apply(img_BLD)
        out_BLD = self._blocks(img_BLD, txt_BLD, vectors, rope, text_lens, first=first)
        cache.store(out_BLD - img_BLD)
        return out_BLD

    def forward(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: TextConditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor:
        """Velocity for latents `x_BCTHW` at timesteps `t_B` (`[B]` or scalar, 0..1000)."""
        grid = self.token_grid(x_BCTHW.shape)
        img_BLD = self.embed_image(x_BCTHW, cond)
        rope = self.rope(grid, x_BCTHW.device)
        cond = conditioning_for_tokens(cond, grid, 0, img_BLD.shape[1])
        out_BLP = self.forward_tokens(img_BLD, rope, t_B, cond, t_next_B=t_next_B, step_cache=step_cache)
        return self.unpatchify(out_BLP, grid)
