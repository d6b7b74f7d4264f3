"""Tiny offline model specs built in code (tests, the tiny configuration, CI).

No weights can be downloaded here, so every model the pipeline uses has a tiny
counterpart with the same classes and interfaces, built from configs with seeded
random weights and tokenizers trained in code. They are saved with
``save_pretrained`` and loaded back with ``from_pretrained``, so the real loading path
runs. Their outputs are meaningless as images: they test mechanics, not quality.
"""
