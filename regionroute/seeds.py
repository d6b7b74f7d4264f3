"""One seed scheme: every random stream of the project is named by its purpose (docs/toy.md, "Seeds").

``stream(purpose, seed, *keys)`` is a numpy ``Generator`` over ``SeedSequence([purpose id,
seed, *keys])``, the purpose id a fixed hash of its name (one of :data:`PURPOSES`): two
purposes never share a stream, whatever their seeds and keys (tests/test_seeds.py checks
that nothing renders a scene of the evaluated splits).
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["PURPOSES", "item_seed", "purpose_id", "stream", "torch_seed"]

#: Every purpose that draws random numbers in the toy world.
PURPOSES: tuple[str, ...] = (
    "scenes/train",  # the dataset's training split (RegionRoute's experts)
    "scenes/val",  # the validation split (choosing the toy default's settings)
    "scenes/test",  # the test split (the report's targets; never used to choose anything)
    "base",  # the toy base's pretraining batches
    "judge/train",  # the toy CLIP judge's training crops
    "judge/eval",  # its held-out accuracy
    "vlm/train",  # the toy VLM judge's training examples
    "vlm/eval",  # its held-out accuracy on generated examples
    "evaluate",  # the toy base's quality report
    "tiny/data",  # the tiny test dataset (data/tiny)
    "stylize",  # the pseudo-GT's noise, per image (stage stylize)
    "infer",  # the evaluation's noise, per image, the same for every method (stage infer)
    "vlm/negative",  # the VLM judge's negative style, per sample (stage score)
    "bootstrap",  # the report's confidence intervals
    "figures",  # the report's randomly drawn example rows
)


def purpose_id(purpose: str) -> int:
    """The 32-bit id of a purpose: the first 4 bytes of sha256 of its name."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random purpose {purpose!r} (one of: {', '.join(PURPOSES)})")
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")


def stream(purpose: str, seed: int, *keys: int) -> np.random.Generator:
    """The generator of ``purpose`` for ``seed`` and optional integer ``keys`` (e.g. a step)."""
    return np.random.default_rng(np.random.SeedSequence([purpose_id(purpose), int(seed), *map(int, keys)]))


def torch_seed(purpose: str, seed: int, *keys: int) -> int:
    """A 63-bit seed for ``torch.Generator().manual_seed`` from the same scheme."""
    return int(stream(purpose, seed, *keys).integers(2**63))


def item_seed(purpose: str, seed: int, item: int) -> int:
    """The noise seed of one item (an image id) for a stage: a 63-bit draw, never 0."""
    return torch_seed(purpose, seed, item) or 1
