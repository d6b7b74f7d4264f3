"""Metrics: RSES (region style match, background identity), VLM judge, attention localization."""
