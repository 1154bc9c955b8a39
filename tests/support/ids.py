"""Clip ids used across tests: HD-VILA style plus hostile ones."""

CLIP_IDS = [
    "dQw4w9WgXcQ.0.mp4",
    "dQw4w9WgXcQ.1.mp4",
    "with space.2.mp4",
    "../escape.3.mp4",
    "uni_кадр_動画.4.mp4",
    "slash/inside.5.mp4",
    "plain",
    "x.y.z",
]
