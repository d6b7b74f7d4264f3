"""The toy world's "VAE": an exactly invertible latent that FluxKontextPipeline uses as it uses a VAE (docs/toy.md).

:class:`PixelShuffleVAE` encodes ``(B, 3, H, W)`` in [-1, 1] by ``pixel_unshuffle`` by ``factor`` (4:
a 64 px image -> 8 x 8 tokens of 192 channels after the pipeline's 2x2 packing) and decodes with the
exact inverse, so ``decode(encode(x)) == x`` bit for bit. It subclasses ``AutoencoderKL`` (the type the
pipeline declares) without its layers, offering the parts of its interface the pipeline and training use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ModelMixin  # diffusers' loader looks the base class up in this namespace
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

__all__ = ["PixelShuffleLatent", "PixelShuffleVAE"]


@dataclass
class PixelShuffleLatent:
    """What ``encode`` returns as ``latent_dist``: a point mass (mode == sample == the latent)."""

    latent: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.latent

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latent


@dataclass
class _EncoderOutput:
    latent_dist: PixelShuffleLatent


class PixelShuffleVAE(AutoencoderKL):
    """Pixel (un)shuffle as a VAE: ``factor`` = 2 ** (len(block_out_channels) - 1)."""

    _supports_gradient_checkpointing = False  # no layers to checkpoint

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (48, 48, 48),
        latent_channels: int = 48,
        scaling_factor: float = 2.0,
        shift_factor: float = 0.0,
    ) -> None:
        ModelMixin.__init__(self)  # not AutoencoderKL's: it would build the conv encoder and decoder
        factor = 2 ** (len(block_out_channels) - 1)
        if latent_channels != in_channels * factor * factor:
            raise ValueError(f"latent_channels must be in_channels * factor^2 = {in_channels * factor**2}")
        self.factor = factor
        # No weights. One saved buffer, so that save_pretrained writes a weights file the loader
        # expects and .dtype / .device / .to() behave as for any model.
        self.register_buffer("unit", torch.ones(()))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> _EncoderOutput | tuple[PixelShuffleLatent]:
        """(B, C, H, W) -> latent_dist with mode (B, C f^2, H/f, W/f)."""
        dist = PixelShuffleLatent(F.pixel_unshuffle(x, self.factor))
        return _EncoderOutput(dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """(B, C f^2, h, w) -> (B, C, h f, w f), the exact inverse of :meth:`encode`."""
        x = F.pixel_shuffle(z, self.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode(), return_dict=False)[0]
