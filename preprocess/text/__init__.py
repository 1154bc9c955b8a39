"""The texts of each clip: given files joined to shards, and the caption and ASR model stages."""
