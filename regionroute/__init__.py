"""RegionRoute: regional style transfer with diffusion models (library root).

Importing this package has no side effects; heavy dependencies (torch, diffusers)
are imported by the submodules that need them.
"""

from pathlib import Path

__version__ = "0.1.0"

#: The repository checkout this package lives in (dvc.yaml, the toy models, params.yaml are there).
REPO_ROOT = Path(__file__).resolve().parents[1]
