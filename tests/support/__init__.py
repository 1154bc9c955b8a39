"""Real components started by tests: an S3 server on loopback and a connection-cutting proxy."""
