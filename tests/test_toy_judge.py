"""The toy judge: trains, saves in open_clip's local-dir layout, loads through the scoring code with the same inputs."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from regionroute.models.clip import load_clip
from regionroute.toy.judge import JudgeConfig, make_crops, train_judge


def test_judge_saves_what_the_score_stage_loads_with_training_preprocessing(tmp_path):
    import open_clip

    cfg = JudgeConfig(steps=3, batch_size=16, eval_per_class=4, width=32, layers=1)
    result = train_judge(cfg, tmp_path / "clip")
    assert set(result["accuracy"]) == {"pixel-art", "cyberpunk", "expressionism", "line-art", "plain", "overall"}
    model, preprocess, tokenizer = load_clip(str(tmp_path / "clip"), "cpu")
    crops, labels = make_crops(np.random.default_rng(0), 4, 64, 5)
    train_pp = open_clip.image_transform(32, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                         std=open_clip.OPENAI_DATASET_STD, resize_mode="shortest",
                                         interpolation="bicubic")  # fmt: skip
    for crop in crops:
        torch.testing.assert_close(preprocess(Image.fromarray(crop)), train_pp(Image.fromarray(crop)))
    tokens = tokenizer(["an image in line-art style"])
    assert tokens.shape == (1, 16) and torch.equal(tokens, open_clip.tokenize(["an image in line-art style"], 16))
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(Image.fromarray(c)) for c in crops]), normalize=True)
    assert emb.shape[0] == 4 and torch.isfinite(emb).all() and set(labels.tolist()) <= set(range(5))
