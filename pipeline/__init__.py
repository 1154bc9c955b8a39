"""The data contract shared by preprocessing and training.

This package is deliberately light: it imports neither torch nor ray, so that both
sides (a Ray preprocessing worker and a DeepSpeed training rank) can depend on it.
"""
