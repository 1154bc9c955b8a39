"""Getting source videos: downloads (http(s), s3, yt-dlp sites), per-host politeness, and the shard's source
videos got ahead of the decoder."""
