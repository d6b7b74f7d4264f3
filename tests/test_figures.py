"""The report's figures (regionroute.figures): rows drawn at random, panels whatever each row saved."""

from __future__ import annotations

import numpy as np
from PIL import Image

from regionroute.figures import attention_grid


def test_attention_grid_takes_rows_with_different_numbers_of_saved_steps(tmp_path):
    """A later row that saved more steps than the first one gets all its panels (was an IndexError)."""
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 2)).save(tmp_path / "mask.png")
    methods = {"regionroute": tmp_path / "rr"}
    (tmp_path / "rr" / "attention").mkdir(parents=True)
    (tmp_path / "rr" / "images").mkdir()
    rows = []
    for i, steps in enumerate([[0, 5], [0, 2, 5, 9]]):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rr" / "images" / f"{i}.png")
        maps = np.random.default_rng(i).random((len(steps), 4, 4)).astype(np.float32)
        np.savez(tmp_path / "rr" / "attention" / f"{i}.npz", maps=maps, mean=maps.mean(0), steps=np.array(steps))
        rows.append({"id": str(i), "mask": "mask.png", "object": "dog", "style": "pixel-art", "why": "small"})
    assert attention_grid(tmp_path / "a.png", rows, tmp_path, methods)
    assert Image.open(tmp_path / "a.png").size[0] > 0
