"""The thin HTTP ingest API. It never imports torch or unstructured."""
