"""RegionRoute: regional style transfer with diffusion models (library root).

Importing this package has no side effects; heavy dependencies (torch, diffusers)
are imported by the submodules that need them.
"""

__version__ = "0.1.0"
