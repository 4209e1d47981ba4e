"""A pixel Transformer: a small decoder-only Transformer over the raster-ordered sub-pixels
(ImageGPT, Chen et al. 2020, without its colour palette: the 256 levels are the tokens).

The image becomes a sequence of L = H*W*C tokens in raster order over (row, column, channel), so on
RGB the channels of a pixel are ordered R -> G -> B like every other position. Teacher forcing
shifts it right behind a start token (id 256):

    inputs  [SOS, k_0, ..., k_{L-2}]  ->  outputs: the head's parameters of k_0, ..., k_{L-1}
    log P(k) = sum_t log P(k_t | k_<t)                      exact, one pass per batch

Each position's head (``categorical``: 256 logits; ``logistic_mixture``: a discretised mixture of
logistics for one sub-pixel) is :mod:`genexp.models.autoregressive`'s. Sampling takes L steps; with
``use_cache=True`` (default) the keys and values of the prefix are kept, so step t costs one new
position (plus attention over t cached ones) instead of rerunning the whole prefix; both paths
compute the same outputs and draw the same samples from the same generator.
"""

from __future__ import annotations

import torch
from torch import nn

from genexp.errors import check_choice
from genexp.models.autoregressive import (
    LEVELS,
    Autoregressive,
    check_temperature,
    make_head,
    to_images,
    to_levels,
)
from genexp.nets.transformer import DecoderTransformer
from genexp.progress import track

SOS = LEVELS  # the start token's id, after the 256 levels


class PixelTransformer(Autoregressive):
    """Args:
    image_size, channels: data shape (from the dataset config).
    head: ``categorical`` (256-way softmax per sub-pixel) or ``logistic_mixture``.
    n_components: mixture components of ``logistic_mixture`` (unused by ``categorical``).
    d_model, n_layers, n_heads: width, depth and attention heads (n_heads divides d_model).
    mlp_ratio: MLP hidden width over d_model.
    dropout: on attention weights and residual branches.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        head: str = "categorical",
        n_components: int = 5,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__(image_size, channels)
        self.head = make_head(head, 1, n_components)  # one sub-pixel per position
        self.net = DecoderTransformer(
            vocab_size=LEVELS + 1,
            max_len=self.num_dims,
            out_dim=self.head.num_params,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        # uniform outputs at initialisation: an untrained categorical model is at exactly 8 bits/dim
        nn.init.zeros_(self.net.out.weight)
        nn.init.zeros_(self.net.out.bias)

    def to_sequence(self, k: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) levels -> (B, L) tokens in raster order over (row, column, channel)."""
        return k.permute(0, 2, 3, 1).flatten(1)

    def from_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        return seq.view(-1, h, w, c).permute(0, 3, 1, 2)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) exact log P(k) in nats (``y`` is ignored: the Transformer is unconditional)."""
        seq = self.to_sequence(to_levels(x))  # (B, L)
        b = seq.shape[0]
        inputs = torch.cat([torch.full_like(seq[:, :1], SOS), seq[:, :-1]], dim=1)
        params = self.net(inputs)  # (B, L, P)
        return self.head.log_prob(params.flatten(0, 1), seq.reshape(-1, 1)).view(b, -1).sum(1)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """(n, C, H, W) 8-bit images in [0, 1], one position at a time. ``temperature`` T: see
        :mod:`genexp.models.autoregressive` (T = 0 takes the most likely level)."""
        t_ = check_temperature(temperature)
        check_choice("use_cache", use_cache, (True, False))
        device = self.net.pos_emb.device
        seq = torch.full((n, self.num_dims + 1), SOS, dtype=torch.long, device=device)
        cache = self.net.new_cache() if use_cache else None
        for t in track(range(self.num_dims), "pixel Transformer positions"):
            if cache is not None:
                params = self.net(seq[:, t : t + 1], cache)[:, -1]  # (n, P): one new position
            else:
                params = self.net(seq[:, : t + 1])[:, -1]  # the whole prefix again
            seq[:, t + 1] = self.head.sample(params, generator, t_)[:, 0]
        return to_images(self.from_sequence(seq[:, 1:])).to(self.net.pos_emb.dtype)
