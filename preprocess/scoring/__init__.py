"""The clips' quality scores: ``quality.py`` (motion, static, black, cuts from the decoded frames), ``similarity.py``
(frame-text, open_clip), ``stage.py`` (the model's batches over a shard's samples), ``config.py``."""
