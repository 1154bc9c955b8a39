"""preprocess.failures: the one failure type and the one definition of the failures table."""

import pyarrow as pa

from preprocess.failures import Failure, failures_table, read_table, table_schema, write_table


def test_table_columns_and_types():
    assert table_schema() == pa.schema(
        [
            ("shard", pa.int64()),
            ("position", pa.int64()),
            ("line", pa.int64()),
            ("video_id", pa.string()),
            ("clip_id", pa.string()),
            ("stage", pa.string()),
            ("error", pa.string()),
            ("message", pa.string()),
            ("dropped", pa.bool_()),
        ]
    )


def test_rows_round_trip(tmp_path):
    rows = [
        (-1, -1, Failure(stage="metadata", error="malformed_json", message="m line 3", line=3)),
        (
            2,
            7,
            Failure(
                stage="caption", error="caption_error", message="x", video_id="v", clip_id="v.0", line=9, dropped=False
            ),
        ),
    ]
    uri = str(tmp_path / "failures.parquet")
    write_table(uri, failures_table(rows))
    assert read_table(uri).to_pylist() == [
        {
            "shard": -1,
            "position": -1,
            "line": 3,
            "video_id": "",
            "clip_id": "",
            "stage": "metadata",
            "error": "malformed_json",
            "message": "m line 3",
            "dropped": True,
        },
        {
            "shard": 2,
            "position": 7,
            "line": 9,
            "video_id": "v",
            "clip_id": "v.0",
            "stage": "caption",
            "error": "caption_error",
            "message": "x",
            "dropped": False,
        },
    ]
    assert failures_table([]).num_rows == 0
