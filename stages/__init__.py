"""Thin DVC stage scripts: parse paths, load a params section, call one library function.

Run from the repository root as ``python -m stages.<name> ...`` (see dvc.yaml).
"""
