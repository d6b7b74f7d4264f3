"""Flow-matching inputs and loss for FLUX.1-Kontext, as diffusers' Kontext LoRA script builds them (docs/method.md §2).

Timestep sampling and loss weights from ``diffusers.training_utils``, ``x_t = (1 - sigma) x0 +
sigma noise``, the ``[text | target | context]`` sequence with the context ids' first coordinate
set to 1 (as the pipeline does). Shared by the ``train`` stage and the toy base's pretraining.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["FlowSchedule", "flow_loss", "kontext_image_ids", "noisy", "quiet_rms_norm_notice", "transformer_inputs"]


def kontext_image_ids(latent_hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Target ids then context ids (first coordinate 1), (2N, 3), for an unpacked latent of ``latent_hw``."""
    from diffusers import FluxKontextPipeline

    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    target = FluxKontextPipeline._prepare_latent_image_ids(1, h, w, device, dtype)  # (N, 3)
    context = target.clone()
    context[..., 0] = 1
    return torch.cat([target, context], dim=0)


class FlowSchedule:
    """Timestep sampling of the training script, from a pipeline's scheduler config."""

    def __init__(
        self,
        scheduler_config: Any,
        weighting_scheme: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.sigmas = sched.sigmas.float()  # (T + 1,), sigmas[i] = sigma of timesteps[i]; the last is 0
        self.weighting_scheme = weighting_scheme
        self.density = (logit_mean, logit_std, mode_scale)

    def indices(self, u: torch.Tensor) -> torch.Tensor:
        """``u`` in [0, 1) -> timestep indices, ``(u * num_train_timesteps).long()`` as the script."""
        return (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def sample(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        """(batch_size,) sigmas, drawn reproducibly from ``gen``."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        # the density sampler draws from the global RNG: seed it from gen, and leave no trace
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            u = compute_density_for_timestep_sampling(self.weighting_scheme, batch_size, *self.density)
        return self.sigmas[self.indices(u)]

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``compute_loss_weighting_for_sd3`` for sigmas shaped to broadcast."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigma).float()


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` for packed latents (B, N, C) and sigma (B,)."""
    s = sigma.view(-1, 1, 1).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def transformer_inputs(
    xt: torch.Tensor,
    context: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    img_ids: torch.Tensor,
    guidance: float | torch.Tensor,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Keyword arguments of ``FluxTransformer2DModel.forward`` for ``[text | target | context]``."""
    b, device = xt.shape[0], xt.device
    g = guidance if isinstance(guidance, torch.Tensor) else torch.full((b,), float(guidance))
    return {
        "hidden_states": torch.cat([xt, context], dim=1).to(dtype),  # (B, 2N, C)
        "timestep": sigma.to(device, dtype),
        "pooled_projections": pooled.to(device, dtype),
        "encoder_hidden_states": prompt_embeds.to(device, dtype),
        "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        "img_ids": img_ids.to(device, dtype),
        "guidance": g.to(device, torch.float32),
        "return_dict": False,
    }


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted MSE to the flow target ``noise - x0``; ``pred`` is the first N image tokens."""
    return (weight * (pred.float() - (noise - x0).float()) ** 2).mean()


@contextmanager
def quiet_rms_norm_notice() -> Iterator[None]:
    """Around a bf16-autocast forward: drop torch's notice that the attention's RMSNorm (bf16 input, float32 weight,
    as autocast leaves it) "cannot dispatch to fused implementation"; the unfused kernel computes the same norm.
    Only that message is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight", category=UserWarning)
        yield
