"""dsv4's command line: composes `ingest` (packing) and `engine` (inference)."""
