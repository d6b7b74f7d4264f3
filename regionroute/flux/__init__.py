"""FLUX.1-Kontext specifics: style-word token spans and style-token attention capture (docs/method.md section 3)."""
