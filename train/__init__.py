"""CLIP-ViP post-pretraining: model, loss, metrics, weight conversion, data and engine."""
