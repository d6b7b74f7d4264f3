"""Shared fixtures: the committed tiny dataset, a params file in a temp dir, helpers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ROOT / "data" / "tiny"


@pytest.fixture
def params_file(tmp_path: Path):
    """Return ``make(**overrides)`` writing params.yaml (configs/tiny.yaml: tiny models) with section overrides."""

    def make(**sections: dict) -> Path:
        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        raw["data"]["root"] = str(TINY_DATA)
        for name, values in sections.items():
            if values is None:
                raw[name] = None
            else:
                raw.setdefault(name, {}).update(values)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


@pytest.fixture(scope="session")
def regionroute_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``XDG_CACHE_HOME`` for the session, for tests whose cache entries are keyed on content
    (tiny models by version, traced memory peaks by inputs and code): built once, shared, never stale."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture
def tiny_data_copy(tmp_path: Path) -> Path:
    """A writable copy of the tiny dataset (for corrupting it)."""
    dst = tmp_path / "tiny"
    shutil.copytree(TINY_DATA, dst)
    return dst


def run_stage(main, argv: list[str], capsys) -> tuple[int, str]:
    """Call a stage's ``main``; return (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def sample_argv(params: Path, root: Path, out: Path, split: str = "train", coco: str = "train") -> list[str]:
    return [
        "--params", str(params), "--split", split,
        "--instances", str(root / "annotations" / f"instances_{coco}.json"),
        "--captions", str(root / "annotations" / f"captions_{coco}.json"),
        "--images", str(root / coco), "--out", str(out),
    ]  # fmt: skip


class Killed(Exception):
    """Stands for a kill of the process at the point it is raised."""


@contextmanager
def killed_after_the_first_item(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the block as a stage killed right after its first item is done (inside the first batch)."""
    from regionroute.fingerprint import ItemStore

    mark = ItemStore.mark

    def die(self: ItemStore, item_id: str, key: str) -> None:
        mark(self, item_id, key)
        raise Killed

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(ItemStore, "mark", die)
        yield
