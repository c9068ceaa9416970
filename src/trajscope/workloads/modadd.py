"""Modular addition ``(a + b) mod p``, two grokking set-ups: ``modadd-mlp``, ``modadd-transformer``.

All ``p * p`` pairs ``(a, b)`` are split by a seeded permutation: the first
``floor(train_fraction * p * p)`` go to training, the rest to validation; the label is
``(a + b) mod p`` (int64, ``p`` classes).

* ``modadd-mlp`` (Gromov 2023, "Grokking modular arithmetic"): input the concatenated one-hots of
  ``a`` and ``b``, float32 (N, 2p); a bias-free MLP ``W2 (W1 x) ** 2`` with a quadratic activation;
  MSE loss to the one-hot target; full-batch AdamW with weight decay.
* ``modadd-transformer`` (Nanda et al. 2023, "Progress measures for grokking"): input the tokens
  ``[a, b, p]`` (``p`` is the '=' token) stored as float32 (N, 3) holding exact integers (the model
  casts them to int64); a one-layer transformer whose logits are read at the last position.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trajscope.errors import UsageError
from trajscope.workloads.base import Data, Workload, register


def num_train(p: int, train_fraction: float) -> int:
    """Number of training pairs: ``floor(train_fraction * p * p)``."""
    return int(math.floor(float(train_fraction) * p * p))


@functools.lru_cache(maxsize=16)
def _split(seed: int, p: int, train_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, is_train): all p*p pairs in seeded order, and which are for training."""
    n = num_train(p, train_fraction)
    if p < 2 or not 0 < n < p * p:
        raise UsageError(f"modadd needs p >= 2 and 0 < train_fraction * p^2 < p^2; got p={p}, "
                         f"train_fraction={train_fraction}")
    perm = np.random.RandomState(seed).permutation(p * p)
    a, b = perm // p, perm % p
    return a, b, np.arange(p * p) < n


def _data(seed: int, p: int, train_fraction: float, encode) -> Data:
    a, b, is_train = _split(int(seed), int(p), float(train_fraction))
    x = encode(torch.from_numpy(a), torch.from_numpy(b), p)
    y = torch.from_numpy((a + b) % p).long()
    m = torch.from_numpy(is_train)
    return Data(x[m], y[m], x[~m], y[~m], int(p))


# ---- modadd-mlp -------------------------------------------------------------------------------


def _one_hots(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()


def make_mlp_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """x (N, 2p) float32 one-hots of a and b; y (N,) = (a + b) mod p."""
    o = {**MLP_OPTIONS, **(options or {})}
    return _data(seed, o["p"], o["train_fraction"], _one_hots)


class QuadraticMLP(nn.Module):
    """``logits = W2 @ (W1 @ x) ** 2``, no biases; (B, 2p) -> (B, p)."""

    def __init__(self, p: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * p, width, bias=False)
        self.fc2 = nn.Linear(width, p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).pow(2))


def make_mlp(options: Mapping[str, Any] | None = None) -> nn.Module:
    o = {**MLP_OPTIONS, **(options or {})}
    return QuadraticMLP(int(o["p"]), int(o["width"]))


# ---- modadd-transformer -----------------------------------------------------------------------


def _tokens(a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    return torch.stack([a, b, torch.full_like(a, p)], dim=1).float()


def make_transformer_data(seed: int, options: Mapping[str, Any] | None = None) -> Data:
    """x (N, 3) float32 tokens [a, b, p]; y (N,) = (a + b) mod p."""
    o = {**TRANSFORMER_OPTIONS, **(options or {})}
    return _data(seed, o["p"], o["train_fraction"], _tokens)


class Attention(nn.Module):
    """Causal multi-head self-attention; separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise UsageError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        q, k, v = (proj(h).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Residual attention then residual ReLU MLP (d_model -> d_mlp -> d_model); no LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.attn = Attention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h)
        return h + self.mlp(h)


class OneLayerTransformer(nn.Module):
    """Token + learned position embeddings, one :class:`Block`, unembedding at the last position.

    Input (B, 3) tokens (float or int); output (B, p) logits.
    """

    def __init__(self, p: int, d_model: int, n_heads: int, d_mlp: int, n_ctx: int = 3):
        super().__init__()
        self.embed = nn.Embedding(p + 1, d_model)
        self.pos_embed = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_mlp)])
        self.unembed = nn.Linear(d_model, p, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.long()) + self.pos_embed[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.unembed(h[:, -1])


def make_transformer(options: Mapping[str, Any] | None = None) -> nn.Module:
    o = {**TRANSFORMER_OPTIONS, **(options or {})}
    return OneLayerTransformer(int(o["p"]), int(o["d_model"]), int(o["n_heads"]), int(o["d_mlp"]))


MLP_OPTIONS = {"p": 97, "train_fraction": 0.5, "width": 512}
TRANSFORMER_OPTIONS = {"p": 113, "train_fraction": 0.3, "d_model": 128, "n_heads": 4, "d_mlp": 512}

register(Workload(
    name="modadd-mlp",
    description="(a+b) mod 97 from one-hots, quadratic-activation MLP, MSE (Gromov 2023 grokking)",
    make_data=make_mlp_data,
    make_model=make_mlp,
    loss="mse",
    target=0.95,
    defaults={"optimizer": "adamw", "lr": 1e-2, "weight_decay": 5.0,
              "batch_size": num_train(97, 0.5), "steps": 1000, "schedule": "constant",
              "warmup_steps": 0, "eval_every": 10},
    options=MLP_OPTIONS,
))

register(Workload(
    name="modadd-transformer",
    description="(a+b) mod 113 from tokens [a,b,=], one-layer transformer (Nanda et al. 2023)",
    make_data=make_transformer_data,
    make_model=make_transformer,
    loss="cross_entropy",
    target=0.95,
    defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1.0,
              "batch_size": num_train(113, 0.3), "steps": 3000, "schedule": "constant",
              "warmup_steps": 10, "eval_every": 100},
    options=TRANSFORMER_OPTIONS,
))
