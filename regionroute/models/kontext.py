"""Loading the FLUX.1-Kontext pipeline from a hub id, a local directory or ``"tiny"``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from regionroute.errors import UserError
from regionroute.models import quiet_loading, resolve_device, resolve_dtype, resolve_reference

if TYPE_CHECKING:
    from diffusers import FluxKontextPipeline

    from regionroute.config import ModelsConfig

__all__ = ["kontext_key", "kontext_source", "load_kontext"]


def kontext_source(cfg: ModelsConfig) -> str:
    """The directory or hub id ``models.kontext`` resolves to (``tiny`` is built on first use)."""
    from regionroute.tiny.kontext import TINY_KONTEXT_VERSION, save_tiny_kontext

    return resolve_reference(cfg.kontext, "kontext", save_tiny_kontext, TINY_KONTEXT_VERSION)


def kontext_key(cfg: ModelsConfig) -> dict[str, str]:
    """Content key of the base model as loaded: its files' digest, dtype and device type."""
    from regionroute.fingerprint import model_digest

    return {"kontext": model_digest(kontext_source(cfg)), "dtype": cfg.dtype, "device": resolve_device(cfg.device).type}


def load_kontext(cfg: ModelsConfig) -> FluxKontextPipeline:
    """Load the Kontext pipeline described by ``models`` params, on its device and dtype."""
    from diffusers import FluxKontextPipeline

    import regionroute.toy.latent  # noqa: F401  (the toy base's latent class, resolved from sys.modules)

    quiet_loading()
    source = kontext_source(cfg)
    device = resolve_device(cfg.device)
    try:
        pipe = FluxKontextPipeline.from_pretrained(source, dtype=resolve_dtype(cfg.dtype))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"models.kontext: cannot load {cfg.kontext!r} ({first})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
