"""Data: COCO sampling (stage ``sample``) and the synthetic datasets (the toy world's, the tiny test set)."""
