"""Data flow from text to paired activations: documents -> packed token batches -> activations [n, S, d]."""
