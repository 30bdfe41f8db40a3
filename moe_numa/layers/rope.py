"""Rotary position embeddings with linear and YaRN scaling, following llama.cpp.

The attention factor and YaRN correction dims are derived the way
llama_context and ggml's rope op derive them, so a model read from GGUF gets
the same rotation angles and magnitudes as llama.cpp gives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UnsupportedError


@dataclass(frozen=True)
class RopeConfig:
    n_dims: int                 # rotated dims per head (even)
    base: float = 10000.0
    neox: bool = True           # NeoX layout: pairs (i, i + n/2); else adjacent pairs (2i, 2i+1)
    freq_scale: float = 1.0     # 1 / scaling factor
    ext_factor: float = 0.0     # YaRN extrapolation mix (1 with YaRN, else 0)
    attn_factor: float = 1.0    # magnitude factor as llama.cpp passes it to the rope op
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 4096

    @property
    def magnitude(self) -> float:
        """Factor applied to cos/sin: the rope op multiplies in YaRN's mscale."""
        if self.ext_factor != 0.0:
            return self.attn_factor * (1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        return self.attn_factor


def _mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_from_metadata(md, arch: str, n_dims: int, neox: bool, n_ctx_train: int,
                       yarn_log_mul: float = 0.0) -> RopeConfig:
    """RopeConfig from `{arch}.rope.*` keys. `yarn_log_mul` is the (already
    de-scaled) mscale_all_dim, which only DeepSeek2 reads."""
    scaling = str(md.get(f"{arch}.rope.scaling.type", "linear"))
    if scaling not in ("none", "linear", "yarn"):
        raise UnsupportedError(f"{arch}.rope.scaling.type = {scaling!r} is not supported (none, linear, yarn)")
    factor = float(md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear", 0.0)) or 0.0)
    freq_scale = 1.0 if factor == 0.0 or scaling == "none" else 1.0 / factor
    ext_factor = 1.0 if scaling == "yarn" else 0.0
    attn_factor = 1.0
    if ext_factor != 0.0:
        f = 1.0 / freq_scale
        if yarn_log_mul != 0.0:
            # llama.cpp assumes mscale == 1 except for DeepSeek2, where mscale == mscale_all_dim.
            mscale = yarn_log_mul if arch == "deepseek2" and yarn_log_mul != 1.0 else 1.0
            attn_factor = _mscale(f, mscale) / _mscale(f, yarn_log_mul)
        else:
            attn_factor = _mscale(f, 1.0)
        # The rope op multiplies by (1 + 0.1 ln f) itself; llama.cpp cancels it here.
        attn_factor *= 1.0 / (1.0 + 0.1 * math.log(f))
    attn_factor *= float(md.get(f"{arch}.rope.scaling.attn_factor", 1.0))
    n_ctx_orig = int(md.get(f"{arch}.rope.scaling.original_context_length", 0) or n_ctx_train)
    return RopeConfig(
        n_dims=n_dims, base=float(md.get(f"{arch}.rope.freq_base", 10000.0)), neox=neox,
        freq_scale=freq_scale, ext_factor=ext_factor, attn_factor=attn_factor, n_ctx_orig=n_ctx_orig)


def _corr_dims(cfg: RopeConfig) -> tuple[float, float]:
    def corr_dim(n_rot: float) -> float:
        return cfg.n_dims * math.log(cfg.n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(cfg.base))
    start = math.floor(corr_dim(cfg.beta_fast))
    end = math.ceil(corr_dim(cfg.beta_slow))
    return max(0.0, start), min(cfg.n_dims - 1.0, end)


def rope_cos_sin(cfg: RopeConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, shape [n_pos, n_dims/2], magnitude included."""
    half = cfg.n_dims // 2
    pos = np.asarray(positions, dtype=np.float32)
    theta_scale = np.float32(cfg.base ** (-2.0 / cfg.n_dims))
    # ggml builds theta by repeated float32 multiplication; do the same so the
    # angles agree to the last bit at long positions.
    theta = np.empty((pos.shape[0], half), dtype=np.float32)
    t = pos.copy()
    for i in range(half):
        theta[:, i] = t
        t = (t * theta_scale).astype(np.float32)
    theta_interp = np.float32(cfg.freq_scale) * theta
    if cfg.ext_factor != 0.0:
        low, high = _corr_dims(cfg)
        i0 = np.arange(half, dtype=np.float32)   # ggml's i0/2
        y = (i0 - low) / max(0.001, high - low)
        ramp = (1.0 - np.clip(y, 0.0, 1.0)) * cfg.ext_factor
        theta = (theta_interp * (1 - ramp) + theta * ramp).astype(np.float32)
    else:
        theta = theta_interp
    mag = np.float32(cfg.magnitude)
    return np.cos(theta) * mag, np.sin(theta) * mag


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> np.ndarray:
    """Rotate `x` of shape [n_pos, n_heads, n_dims] (n_dims = 2 * cos.shape[1])."""
    c = cos[:, None, :]
    s = sin[:, None, :]
    half = cos.shape[1]
    if neox:
        a, b = x[..., :half], x[..., half:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra = a * c - b * s
    rb = a * s + b * c
    out = np.empty_like(x)
    if neox:
        out[..., :half], out[..., half:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out
