"""Preprocessing: video corpora to WebDataset shards (decoding, synthetic data, the Ray job)."""
