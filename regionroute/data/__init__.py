"""Data: COCO sampling (stage ``sample``), the embedded demo set, training datasets."""
