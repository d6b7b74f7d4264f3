"""A tiny open_clip CLIP built in code, for the offline RSM metric (tests, the tiny configuration).

The paper's class (``open_clip.model.CLIP``) and preprocessing at toy sizes (2-layer ViT on 32 px,
2-layer text tower, open_clip's own BPE), saved as safetensors with ``open_clip_config.json`` and
loaded back through open_clip's ``local-dir:`` schema by ``load_clip("tiny")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_CLIP_CONFIG", "TINY_CLIP_VERSION", "save_tiny_clip"]

#: Bump when the spec changes, so cached builds are not reused.
TINY_CLIP_VERSION = "1"

#: open_clip ``model_cfg`` (the schema of open_clip's ``model_configs/*.json``).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

#: Weights file name open_clip's ``local-dir:`` loader looks for first.
WEIGHTS_NAME = "open_clip_model.safetensors"


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny CLIP with seeded weights; write config + safetensors to ``path``."""
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**TINY_CLIP_CONFIG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    preprocess_cfg = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
