"""Read throughput: our streaming S3 reader vs a plain boto3 get_object read, same objects.

Starts a loopback S3 server (moto), uploads shards, then alternates the two readers over
several rounds and prints the median throughput of each and their ratio (target >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import storage  # noqa: E402
from tests.support.s3server import start_s3_server  # noqa: E402


def read_ours(uris: list[str]) -> int:
    total = 0
    for uri in uris:
        with storage.open_read(uri) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def read_plain(client, uris: list[str]) -> int:
    total = 0
    for uri in uris:
        loc = storage.parse(uri)
        total += len(client.get_object(Bucket=loc.bucket, Key=loc.path)["Body"].read())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=4)
    parser.add_argument("--mib", type=int, default=32, help="size of each object")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = start_s3_server(Path(tempfile.mkdtemp()))
    try:
        os.environ.update(server.env())
        storage.reset_clients()
        client = server.client()
        client.create_bucket(Bucket="bench")
        uris = [f"s3://bench/obj-{i}.bin" for i in range(args.objects)]
        for uri in uris:
            storage.write_bytes(uri, os.urandom(args.mib << 20))
        rates = {"ours": [], "plain": []}
        for _ in range(args.rounds):
            for name, fn in (("ours", lambda: read_ours(uris)), ("plain", lambda: read_plain(client, uris))):
                start = time.perf_counter()
                n = fn()
                rates[name].append(n / (time.perf_counter() - start) / 2**20)
        ours, plain = statistics.median(rates["ours"]), statistics.median(rates["plain"])
        print(f"objects: {args.objects} x {args.mib} MiB, rounds: {args.rounds}")
        print(f"streaming reader : {ours:8.1f} MiB/s (median)")
        print(f"boto3 get_object : {plain:8.1f} MiB/s (median)")
        print(f"ratio ours/plain : {ours / plain:.2f}  (target >= 0.9)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
