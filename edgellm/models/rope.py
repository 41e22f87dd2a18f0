"""Rotary position embeddings: inverse frequencies for every scaling type HF configs use."""

from __future__ import annotations

import math

import torch

from edgellm.errors import UserError


def rope_parameters(hf: dict) -> dict:
    """Normalise old (`rope_theta` + `rope_scaling`) and new (`rope_parameters`) config styles."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    if "rope_theta" not in params:
        params["rope_theta"] = hf.get("rope_theta") or hf.get("position_embedding_base") or \
            hf.get("rotary_emb_base") or 10000.0
    rtype = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = {"su": "longrope"}.get(rtype, rtype)
    return params


def inv_freq_and_scale(params: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] for positions below the original context, cos/sin factor).

    For longrope, a second table for long contexts comes from `long_inv_freq`.
    """
    base = float(params["rope_theta"])
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (base**exps)
    rtype = params["rope_type"]
    if rtype == "default":
        return inv, 1.0
    if rtype == "linear":
        return inv / float(params["factor"]), 1.0
    if rtype == "dynamic":
        # NTK-dynamic equals default inside the original window, which is what we serve.
        return inv, 1.0
    if rtype == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rtype == "longrope":
        short = torch.tensor(params["short_factor"], dtype=torch.float32)
        return inv / short, _longrope_scale(params, max_positions)
    if rtype == "yarn":
        return _yarn(params, inv, dim, base)
    raise UserError(f"unsupported rope scaling type {rtype!r}")


def long_inv_freq(params: dict, dim: int) -> torch.Tensor | None:
    """Longrope's inverse frequencies for positions past the original context, else None."""
    if params["rope_type"] != "longrope":
        return None
    base = float(params["rope_theta"])
    exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base**exps)


def _longrope_scale(params: dict, max_positions: int) -> float:
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    orig = params.get("original_max_position_embeddings") or max_positions
    factor = params.get("factor") or max_positions / orig
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def _yarn(params: dict, inv: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, float]:
    factor = float(params["factor"])
    orig = float(params["original_max_position_embeddings"])
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)
    mscale = params.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_interp = inv / factor
    return inv_interp * (1 - extrapolation) + inv * extrapolation, float(mscale)


def rope_table(params: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, dim] in float32, HF's rotate-half layout."""
    inv, scale = inv_freq_and_scale(params, dim, max_positions)
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    long_inv = long_inv_freq(params, dim)
    if long_inv is not None:
        orig = int(params.get("original_max_position_embeddings") or max_positions)
        freqs[orig:] = torch.outer(pos[orig:], long_inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale
