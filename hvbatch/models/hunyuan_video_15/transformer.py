"""The HunyuanVideo-1.5 diffusion transformer (8.3B) with the official parameter names.

Shape legend: B batch, C channels, T/Hh/Ww latent frames/height/width (= token grid, patch 1),
L tokens (image tokens Li in (t, h, w) order, then condition tokens Lc), D hidden size,
H heads, hd head dim.

Condition tokens per sample, packed valid-first: `[image-encoder tokens (image-to-video only),
valid byT5 tokens, valid LLM tokens]`, each stream tagged by `cond_type_embedding` (LLM 0,
byT5 1, image 2), then zero padding up to the batch's longest. This is the official token
order; padding is never attended (`joint_attention` runs each sample on its valid tokens), so no
mask and no L x L tensor is built.

The model holds no distributed code: attention goes through `self.attention_fn`, and `forward` is
split into `embed_image` / `forward_tokens` / `unpatchify` so a sequence-parallel runner can shard
image tokens and RoPE tables between the stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from hvbatch.models.attention import AttentionFn, joint_attention, sdpa_attention, set_token_grid
from hvbatch.models.attention_backends import AttentionBackend
from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.layers import (
    MLP,
    ModulateDiT,
    RMSNorm,
    TimestepEmbedder,
    apply_rope,
    layer_norm,
    modulate,
    rope_frequencies,
)
from hvbatch.models.protocols import StepCacheHook
from hvbatch.models.refiner import SingleTokenRefiner

RopeTables = tuple[torch.Tensor, torch.Tensor]
ROPE_CACHE_SIZE = 4
LLM_TOKENS, GLYPH_TOKENS, IMAGE_TOKENS = 0, 1, 2
"""`cond_type_embedding` ids of the three condition streams (official order)."""


class MMDoubleStreamBlock(nn.Module):
    """Image and condition streams with their own weights (separate q, k, v), joined in one attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", ModulateDiT(hidden_size, factor=6))
            for name in ("q", "k", "v"):
                setattr(self, f"{stream}_attn_{name}", nn.Linear(hidden_size, hidden_size))
            setattr(self, f"{stream}_attn_q_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_k_norm", RMSNorm(head_dim))
            setattr(self, f"{stream}_attn_proj", nn.Linear(hidden_size, hidden_size))
            setattr(
                self, f"{stream}_mlp", MLP(hidden_size, int(hidden_size * mlp_ratio), activation="gelu_tanh")
            )

    def modulated_image_input(self, img_BLD: torch.Tensor, vec_BD: torch.Tensor) -> torch.Tensor:
        """The image stream after its first norm and shift/scale (TeaCache's probe)."""
        shift, scale = self.img_mod(vec_BD).chunk(6, dim=-1)[:2]
        return modulate(layer_norm(img_BLD), shift, scale)

    def _qkv(self, stream: str, x_BLD: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        x_mod = modulate(layer_norm(x_BLD), shift, scale)
        q, k, v = (
            rearrange(getattr(self, f"{stream}_attn_{n}")(x_mod), "B L (H hd) -> B L H hd", H=self.num_heads)
            for n in ("q", "k", "v")
        )
        q = getattr(self, f"{stream}_attn_q_norm")(q).to(v.dtype)
        k = getattr(self, f"{stream}_attn_k_norm")(k).to(v.dtype)
        return q, k, v

    def _residuals(
        self, stream: str, x_BLD: torch.Tensor, attn_BLD: torch.Tensor, mods: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mods
        x_BLD = x_BLD + gate1[:, None] * getattr(self, f"{stream}_attn_proj")(attn_BLD)
        mlp_out = getattr(self, f"{stream}_mlp")(modulate(layer_norm(x_BLD), shift2, scale2))
        return x_BLD + gate2[:, None] * mlp_out

    def forward(
        self,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vec_BD: torch.Tensor,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
        attention_fn: AttentionFn,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_mods = self.img_mod(vec_BD).chunk(6, dim=-1)
        txt_mods = self.txt_mod(vec_BD).chunk(6, dim=-1)
        img_q, img_k, img_v = self._qkv("img", img_BLD, img_mods[0], img_mods[1])
        txt_q, txt_k, txt_v = self._qkv("txt", txt_BLD, txt_mods[0], txt_mods[1])
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


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch, tokens in (t, h, w) order (key `img_in.proj`)."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch, stride=patch)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCTHW).flatten(2).transpose(1, 2)


class ByT5Mapper(nn.Module):
    """byT5 states -> hidden: LayerNorm, fc1, GELU, fc2, GELU, fc3 (official `byt5_in`, no residual)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(self.layernorm(x_BLC)))
        return self.fc3(F.gelu(self.fc2(h)))


class VisionProjection(nn.Module):
    """Image-encoder tokens -> hidden: `proj` = LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BLC)


class FinalLayer(nn.Module):
    """Norm, shift/scale (official chunk order: shift first), linear to the patch's output channels."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BLD: torch.Tensor, vec_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec_BD).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x_BLD), shift, scale))


class HunyuanVideo15Transformer(nn.Module):
    """`model(x, t, cond, *, t_next_B=None) -> velocity`, x `[B, out_channels, T, H, W]` (noisy latents)."""

    def __init__(self, config: HunyuanVideo15TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.attention_fn: AttentionFn = sdpa_attention
        self._rope_cache: dict[tuple[tuple[int, int, int], torch.device], RopeTables] = {}
        self.compiled_blocks = False
        """Set by `hvbatch.models.runtime.compile_blocks`."""
        self.attention_mode = "auto"
        """`model.attention_mode` (auto, dense, ssta): what `configure_attention` applies."""
        hidden, heads = config.hidden_size, config.num_heads
        self.patch = config.patch
        self.img_in = PatchEmbed(self.patch, config.in_channels, hidden)
        self.txt_in = SingleTokenRefiner(
            config.text_dim, hidden, heads, config.refiner_mlp_ratio, config.num_refiner_blocks
        )
        self.byt5_in = ByT5Mapper(config.glyph_dim, config.glyph_hidden_dim, hidden)
        self.vision_in = VisionProjection(config.image_embed_dim, hidden)
        self.cond_type_embedding = nn.Embedding(3, hidden)
        self.time_in = TimestepEmbedder(hidden)
        self.time_r_in = TimestepEmbedder(hidden) if config.use_meanflow else None
        self.double_blocks = nn.ModuleList(
            [MMDoubleStreamBlock(hidden, heads, config.mlp_ratio) for _ in range(config.num_double_blocks)]
        )
        self.single_blocks = nn.ModuleList()
        """Empty, as in every released 1.5 checkpoint (`mm_single_blocks_depth: 0`)."""
        self.final_layer = FinalLayer(
            hidden, self.patch[0] * self.patch[1] * self.patch[2], config.out_channels
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.time_in.mlp[0].weight.dtype

    def token_grid(self, latent_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """Noisy latent `[B, out_channels, T, H, W]` -> token grid; sizes must be patch multiples."""
        _, channels, *sizes = latent_shape
        if channels != self.config.out_channels:
            raise ValueError(
                f"latent has {channels} channels, the model expects {self.config.out_channels} noisy latent "
                "channels (condition latents and mask come from the conditioning)"
            )
        bad = [f"{n}={s} (patch {p})" for n, s, p in zip("THW", sizes, self.patch, strict=True) if s % p]
        if bad:
            raise ValueError(f"latent sizes not divisible by the patch size: {', '.join(bad)}")
        return (sizes[0] // self.patch[0], sizes[1] // self.patch[1], sizes[2] // self.patch[2])

    def rope(self, grid: tuple[int, int, int], device: torch.device | str) -> RopeTables:
        """RoPE tables `(cos_LD, sin_LD)` of a token grid, built once per grid and device."""
        key = (grid, torch.device(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) >= ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = rope_frequencies(
                grid, list(self.config.rope_axes_dim), self.config.rope_theta, device
            )
        return self._rope_cache[key]

    def embed_image(self, x_BCTHW: torch.Tensor, cond: HunyuanVideo15Conditioning) -> torch.Tensor:
        """`img_in` on `[noisy latents | condition latents | mask]` (zeros when `cond` has none)."""
        extra = self.config.condition_channels
        if cond.cond_latents is None:
            cond_BCTHW = x_BCTHW.new_zeros((x_BCTHW.shape[0], extra, *x_BCTHW.shape[2:]))
        elif cond.cond_latents.shape[1] != extra or cond.cond_latents.shape[2:] != x_BCTHW.shape[2:]:
            raise ValueError(
                f"cond_latents has shape {tuple(cond.cond_latents.shape)}, expected "
                f"{(x_BCTHW.shape[0], extra, *x_BCTHW.shape[2:])} (condition latents and mask of this video)"
            )
        else:
            cond_BCTHW = cond.cond_latents.to(x_BCTHW.device)
        x = torch.cat([x_BCTHW, cond_BCTHW.to(x_BCTHW.dtype)], dim=1)
        return self.img_in(x.to(self.compute_dtype))

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

    def conditioning_vector(self, t_B: torch.Tensor, t_next_B: torch.Tensor | None) -> torch.Tensor:
        """`time_in(t)`, plus `time_r_in(t_next)` for a MeanFlow checkpoint (official `timestep_r`)."""
        vec_BD = self.time_in(t_B)
        if self.time_r_in is not None:
            if t_next_B is None:
                raise ValueError(
                    "this checkpoint uses MeanFlow (config use_meanflow): pass t_next_B, the next step's "
                    "timestep (0 at the last step)"
                )
            vec_BD = vec_BD + self.time_r_in(t_next_B.float().reshape(-1).expand(t_B.shape[0]))
        return vec_BD

    def condition_tokens(
        self, t_B: torch.Tensor, cond: HunyuanVideo15Conditioning
    ) -> tuple[torch.Tensor, Sequence[int] | None]:
        """`[B, Lc, D]` condition tokens packed valid-first per sample, and their valid counts
        (None when every sample has all Lc valid)."""
        dtype, types = self.compute_dtype, self.cond_type_embedding.weight
        text_len = max(cond.text_lens)
        llm_BLD = (
            self.txt_in(cond.text_states[:, :text_len].to(dtype), t_B, cond.text_lens) + types[LLM_TOKENS]
        )
        glyph_len = max(cond.glyph_lens)
        glyph_BLD = None
        if glyph_len:
            glyph_BLD = self.byt5_in(cond.glyph_states[:, :glyph_len].to(dtype)) + types[GLYPH_TOKENS]
        image_BLD = None
        if cond.image_embeds is not None:
            image_BLD = self.vision_in(cond.image_embeds.to(dtype)) + types[IMAGE_TOKENS]
        num_image = 0 if image_BLD is None else image_BLD.shape[1]
        lens = [num_image + g + n for g, n in zip(cond.glyph_lens, cond.text_lens, strict=True)]
        width = max(lens)
        rows = []
        for b, (g, n) in enumerate(zip(cond.glyph_lens, cond.text_lens, strict=True)):
            parts = [] if image_BLD is None else [image_BLD[b]]
            if g:
                parts.append(glyph_BLD[b, :g])  # type: ignore[index]
            parts.append(llm_BLD[b, :n])
            row = torch.cat(parts)
            rows.append(F.pad(row, (0, 0, 0, width - row.shape[0])))
        return torch.stack(rows), (None if len(set(lens)) == 1 else lens)

    def forward_tokens(
        self,
        img_BLD: torch.Tensor,
        rope: RopeTables,
        t_B: torch.Tensor,
        cond: HunyuanVideo15Conditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor:
        """Image tokens (all, or this rank's shard) -> final-layer outputs `[B, Li, P]` for those tokens.

        Condition tokens are computed here in full on every rank. Nothing waits for the device.
        """
        batch = img_BLD.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"conditioning has batch {cond.batch_size}, the latents {batch}")
        t_B = t_B.float().reshape(-1).expand(batch)
        vec_BD = self.conditioning_vector(t_B, t_next_B)
        txt_BLD, text_lens = self.condition_tokens(t_B, cond)
        if self.compiled_blocks:  # one compiled graph for every prompt length
            torch._dynamo.maybe_mark_dynamic(txt_BLD, 1)
        rope = (rope[0].to(img_BLD.device), rope[1].to(img_BLD.device))
        if step_cache is None:
            img_BLD = self._blocks(img_BLD, txt_BLD, vec_BD, rope, text_lens, first=0)
        else:
            img_BLD = self._cached_blocks(step_cache, img_BLD, txt_BLD, vec_BD, rope, text_lens)
        return self.final_layer(img_BLD, vec_BD)

    def _blocks(
        self,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vec_BD: torch.Tensor,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
        first: int,
    ) -> torch.Tensor:
        for block in self.double_blocks[first:]:
            img_BLD, txt_BLD = block(img_BLD, txt_BLD, vec_BD, rope, text_lens, self.attention_fn)
        return img_BLD

    def _cached_blocks(
        self,
        cache: StepCacheHook,
        img_BLD: torch.Tensor,
        txt_BLD: torch.Tensor,
        vec_BD: torch.Tensor,
        rope: RopeTables,
        text_lens: Sequence[int] | None,
    ) -> torch.Tensor:
        """The blocks, or the input plus the cached residual when the cache says so.

        Probe: the first block's image residual (fbcache, `probe_after_first_block`), else the
        first block's modulated image input.
        """
        first = 0
        if cache.probe_after_first_block:
            block = self.double_blocks[0]
            out_BLD, txt_BLD = block(img_BLD, txt_BLD, vec_BD, rope, text_lens, self.attention_fn)
            probe_BLD = out_BLD - img_BLD
            img_BLD, first = out_BLD, 1
        else:
            probe_BLD = self.double_blocks[0].modulated_image_input(img_BLD, vec_BD)
        if not cache.should_compute(probe_BLD):
            return cache.apply(img_BLD)
        out_BLD = self._blocks(img_BLD, txt_BLD, vec_BD, rope, text_lens, first=first)
        cache.store(out_BLD - img_BLD)
        return out_BLD

    def transformer_blocks(self) -> list[nn.Module]:
        """The double-stream blocks in order (what regional compilation compiles one by one)."""
        return list(self.double_blocks)

    def configure_attention(self, backend: AttentionBackend) -> str:
        """Dense or SSTA attention on `backend`, as `self.attention_mode` asks for this checkpoint
        (`model.attention_mode`; the runtime calls this once the kernel is chosen); in words."""
        from hvbatch.models.ssta_attention import configure_attention

        return configure_attention(self, self.attention_mode, backend)

    def forward(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: HunyuanVideo15Conditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor:
        """Velocity `[B, out_channels, T, H, W]` for noisy latents at timesteps `t_B` (0..1000)."""
        grid = self.token_grid(x_BCTHW.shape)
        set_token_grid(self.attention_fn, grid)
        img_BLD = self.embed_image(x_BCTHW, cond)
        out_BLP = self.forward_tokens(
            img_BLD, self.rope(grid, x_BCTHW.device), t_B, cond, t_next_B=t_next_B, step_cache=step_cache
        )
        return self.unpatchify(out_BLP, grid)
