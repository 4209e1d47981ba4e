"""A small decoder-only Transformer (GPT-2 layout, as ImageGPT; Chen et al. 2020) with a key/value cache.

Pre-LayerNorm blocks x + attn(LN(x)), x + MLP(LN(x)); causal self-attention through PyTorch's
``scaled_dot_product_attention``; learned token and position embeddings; GPT-2's initialisation
(N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)).

Two ways to run it, which compute the same function:

- ``forward(tokens)`` on a whole (B, T) sequence with a causal mask (training, and the uncached
  sampler that reruns the prefix every step);
- ``forward(tokens, cache)`` with a :class:`KVCache`: the keys and values of earlier positions are
  kept, so a new position costs one token's projections plus attention over the cached prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from genexp.errors import ConfigError, check_float, check_int


class KVCache:
    """Keys and values of every layer for the positions run so far: (layers, B, heads, max_len, d_head),
    allocated at the first update with the keys' dtype and device (bf16 under autocast)."""

    def __init__(self, n_layers: int, max_len: int):
        self.n_layers, self.max_len = n_layers, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0  # positions cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, heads, T, d_head) keys/values at the next T positions; return all of them so far."""
        if self.k is None:
            b, h, _, d = k.shape
            self.k = k.new_zeros(self.n_layers, b, h, self.max_len, d)
            self.v = v.new_zeros(self.n_layers, b, h, self.max_len, d)
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # (B, heads, T, d_head) each
        if cache is not None:
            if cache.length and t > 1:
                raise ValueError("a cached forward takes one new position at a time after the first call")
            k, v = cache.update(layer, k, v)
        # is_causal aligns the mask top-left: right for a full sequence (start = 0); a single new
        # query (t = 1) attends to every cached key, so it needs no mask
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=t > 1, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class DecoderTransformer(nn.Module):
    """(B, T) tokens -> (B, T, out_dim); output t depends on tokens <= t only.

    Args:
        vocab_size: number of token ids.
        max_len: positions of the learned position embedding (the longest sequence).
        out_dim: outputs per position.
        d_model, n_layers, n_heads: width, depth and attention heads (n_heads divides d_model).
        mlp_ratio: hidden width of the MLP over d_model.
        dropout: on attention weights and residual branches (training only).
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int,
        out_dim: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_int("d_model", d_model, minimum=1)
        self.n_layers = check_int("n_layers", n_layers, minimum=1)
        self.n_heads = check_int("n_heads", n_heads, minimum=1)
        if d_model % n_heads:
            raise ConfigError("n_heads", n_heads, f"must divide d_model={d_model}")
        check_int("mlp_ratio", mlp_ratio, minimum=1)
        dropout = check_float("dropout", dropout, minimum=0.0, maximum=1.0)
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, d_model))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, out_dim)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 n_layers)
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layers, self.max_len)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        t = tokens.shape[1]
        start = cache.length if cache is not None else 0
        h = self.drop(self.tok_emb(tokens) + self.pos_emb[start : start + t])  # (B, T, d)
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        if cache is not None:
            cache.length += t
        return self.out(self.ln_f(h))
