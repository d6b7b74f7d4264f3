"""FLUX.1-Kontext specifics: style-word token spans and style-token attention capture (METHOD.md section 3)."""
