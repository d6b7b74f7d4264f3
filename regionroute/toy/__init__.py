"""The toy world: a miniature Kontext trained on CPU by the project's own code."""
