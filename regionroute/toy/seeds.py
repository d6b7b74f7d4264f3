"""The toy world's one seed scheme: every random stream is named by its purpose (docs/toy.md, "Seeds").

``stream(purpose, seed, *keys)`` is a numpy ``Generator`` over
``SeedSequence([purpose id, seed, *keys])``; the purpose id is a fixed hash of the
purpose's name, one of :data:`PURPOSES`. Two purposes never share a stream, whatever
their seeds and keys (``tests/test_toy_seeds.py`` checks that no purpose renders a scene
of the evaluated splits).
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["PURPOSES", "purpose_id", "stream", "torch_seed"]

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
