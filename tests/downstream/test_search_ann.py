"""The approximate (FAISS IVF) search of train/nearest.py and its side file beside the table (train/search_ann.py).

Rows are a small clustered set (50 random unit centres in 32 dims, noise of norm 0.5, normalised): each row's
neighbours are its cluster's, as with real embeddings; random rows have no structure an IVF index can use.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from train.nearest import AnnConfig, NeighbourConfig, build_ivf, ivf_lists, nearest_ivf, nearest_numpy
from train.search import Index, save_index, top_k
from train.search_ann import LOW_RECALL, ann_path, side_head
from train.search_index import COLUMNS, read_index, rows_table, write_index

DIM = 32


def clustered(rows: int, seed: int, centres: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, DIM)).astype(np.float32)
    middle /= np.linalg.norm(middle, axis=1, keepdims=True)
    noise = rng.standard_normal((rows, DIM)).astype(np.float32)
    out = middle[rng.integers(0, centres, rows)] + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def table(videos: np.ndarray, texts: int = 300, text_rows: np.ndarray | None = None) -> Index:
    """An index of ``videos`` rows then ``text_rows`` (default: ``texts`` clustered rows, seed 9)."""
    text_rows = clustered(texts, seed=9) if text_rows is None else text_rows
    texts = len(text_rows)
    embeddings = np.concatenate([videos, text_rows])
    n = len(embeddings)
    columns = {name: [""] * n for name in COLUMNS} | {"start": [0.0] * n, "end": [1.0] * n}
    columns |= {"kind": ["video"] * len(videos) + ["text"] * texts, "id": [f"r{i}" for i in range(n)]}
    return Index(rows=rows_table(columns), embeddings=embeddings, meta={"checkpoint": "test"})


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return len(set(found.tolist()) & set(exact.tolist())) / len(exact)


def test_ivf_finds_numpys_neighbours_on_clustered_rows():
    rows, queries = clustered(5000, seed=1), clustered(30, seed=2)
    ivf = build_ivf(rows)
    assert (ivf.nlist, ivf.ntotal, ivf_lists(5000), ivf_lists(22), ivf_lists(1_000_000)) == (125, 5000, 125, 1, 4000)
    recalls = []
    for q in queries:
        scores, found = nearest_ivf(ivf, rows.__getitem__, q, 10, NeighbourConfig().nprobe)
        exact_scores, exact = nearest_numpy(rows, q, 10)
        assert found[0] == exact[0]
        np.testing.assert_allclose(scores, rows[found] @ q, atol=1e-5)  # the rows' exact inner products
        recalls.append(recall(found, exact))
    assert np.mean(recalls) >= 0.9, recalls
    _, one_cell = nearest_ivf(ivf, rows.__getitem__, queries[0], 10, 1)
    assert len(one_cell) <= 10 and all(0 <= r < 5000 for r in one_cell)


def test_side_files_are_searched_and_a_stale_one_refused(tmp_path, capsys):
    path = str(tmp_path / "index.parquet")
    videos = clustered(5000, seed=1)
    save_index(table(videos), path, AnnConfig(ann_above=0))
    said = capsys.readouterr().out
    assert f"wrote {path}.video.faiss" in said and f"wrote {path}.text.faiss" in said
    index = read_index(path)
    assert index.meta["ann"]["video"]["rows"] == 5000 and index.meta["ann"]["text"]["rows"] == 300
    queries = clustered(20, seed=3)
    by_ivf = [top_k(index, q, "video", 10) for q in queries]
    exact = [top_k(index, q, "video", 10, NeighbourConfig(exact=True)) for q in queries]
    assert [h[0].id for h in by_ivf] == [h[0].id for h in exact]
    assert np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(by_ivf, exact)]) >= 0.9
    one_cell = [top_k(index, q, "video", 10, NeighbourConfig(nprobe=1)) for q in queries]
    assert [[h.id for h in hits] for hits in one_cell] != [[h.id for h in hits] for hits in exact]  # IVF ran
    assert top_k(index, queries[0], "text", 1)[0].kind == "text"

    write_index(table(clustered(5000, seed=4)), path)  # the table rewritten with other rows, the side files left
    stale = read_index(path)
    with pytest.raises(ValueError, match=f"^{path}.video.faiss: approximate index of other rows than {path}"):
        top_k(stale, queries[0], "video", 10)
    forced = top_k(stale, queries[0], "video", 10, NeighbourConfig(exact=True))  # --exact: numpy, file unread
    assert [h.row for h in forced] == nearest_numpy(stale.embeddings[:5000], queries[0], 10)[1].tolist()

    copied = read_index(path)  # a table read back (its metadata) and written with other rows of the same count
    write_index(Index(rows=copied.rows, embeddings=clustered(5300, seed=6), meta=index.meta), path)
    with pytest.raises(ValueError, match=f"^{path}.video.faiss: approximate index of other rows"):
        top_k(read_index(path), queries[0], "video", 10)

    save_index(table(videos), path)  # embedded again under --ann-above rows: the side files go
    assert sorted(os.listdir(tmp_path)) == ["index.parquet"]
    hits = top_k(read_index(path), queries[0], "video", 10)
    assert [h.row for h in hits] == [h.row for h in exact[0]]


def test_a_query_through_the_side_file_reads_only_its_candidates_row_groups(tmp_path):
    """The table's embeddings are read per row group for the candidates (a few of 1M rows' 2 GB) and streamed past
    the query for an exact search, never kept whole; the scores are the stored rows' exact inner products."""
    path = str(tmp_path / "index.parquet")
    videos = clustered(5000, seed=1)
    save_index(table(videos), path, AnnConfig(ann_above=0))
    index, query = read_index(path), clustered(1, seed=3)[0]
    hits = top_k(index, query, "video", 10)
    assert not index.embeddings.whole_read
    np.testing.assert_allclose([h.score for h in hits], videos[[h.row for h in hits]] @ query, atol=1e-6)
    picked = np.array([4999, 0, 1500, 1023, 1024, 1023])  # across row groups of 1024, in any order, repeated
    np.testing.assert_array_equal(index.embeddings.rows(picked), videos[picked])
    with pytest.raises(IndexError):
        index.embeddings.rows(np.array([5300]))
    exact = top_k(index, query, "video", 10, NeighbourConfig(exact=True))  # streamed past the query, not kept
    assert not index.embeddings.whole_read
    want_scores, want_rows = nearest_numpy(videos, query, 10)
    assert [h.row for h in exact] == want_rows.tolist()
    np.testing.assert_allclose([h.score for h in exact], want_scores, atol=1e-5)
    assert np.array_equal(np.asarray(index.embeddings)[:5000], videos) and index.embeddings.whole_read
    assert [h.row for h in top_k(index, query, "video", 10, NeighbourConfig(exact=True))] == want_rows.tolist()


def test_a_table_with_the_older_list_column_reads_the_same(tmp_path):
    """Tables written before the embedding column became fixed-size binary (a fixed-size list of floats) still read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, older = str(tmp_path / "index.parquet"), str(tmp_path / "older.parquet")
    videos = clustered(1500, seed=2)
    write_index(table(videos), path)
    assert pa.types.is_fixed_size_binary(pq.read_schema(path).field("embedding").type)
    rows = pq.read_table(path)
    flat = pa.array(np.concatenate([videos, clustered(300, seed=9)]).reshape(-1), type=pa.float32())
    rows = rows.set_column(
        rows.schema.get_field_index("embedding"), "embedding", pa.FixedSizeListArray.from_arrays(flat, DIM)
    )
    pq.write_table(rows, older, row_group_size=1024)
    assert read_index(older).embeddings.shape == (1800, DIM)
    np.testing.assert_array_equal(read_index(older).embeddings.rows(np.array([1400, 3])), videos[[1400, 3]])
    np.testing.assert_array_equal(np.asarray(read_index(older).embeddings), np.asarray(read_index(path).embeddings))
    doubles = rows.set_column(
        rows.schema.get_field_index("embedding"),
        "embedding",
        rows.column("embedding").cast(pa.list_(pa.float64(), DIM)),
    )
    pq.write_table(doubles, older)
    with pytest.raises(
        ValueError,
        match=rf"^index {older}: its embedding column is fixed_size_list<element: double>\[{DIM}\], not float32",
    ):
        read_index(older)


def test_missing_side_file_searches_exactly_with_a_warning(tmp_path, caplog, capsys):
    path = str(tmp_path / "index.parquet")
    save_index(table(clustered(2000, seed=1)), path, AnnConfig(ann_above=1000))
    assert sorted(os.listdir(tmp_path)) == ["index.parquet", "index.parquet.video.faiss"]  # 300 texts: none
    os.remove(ann_path(path, "video"))
    query = clustered(1, seed=5)[0]
    with caplog.at_level(logging.WARNING, logger="train.search_ann"):
        hits = top_k(read_index(path), query, "video", 5)
    assert f"index {path}: its approximate index {path}.video.faiss is missing; searching exactly" in caplog.text
    assert [h.row for h in hits] == nearest_numpy(read_index(path).embeddings[:2000], query, 5)[1].tolist()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="ann_above must be >= 0, got -1"):
        AnnConfig(ann_above=-1)
    with pytest.raises(ValueError, match="nprobe must be >= 1, got 0"):
        NeighbourConfig(nprobe=0)


def around(centres: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """``rows`` unit rows, each one of ``centres`` plus noise of norm 0.5."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((rows, centres.shape[1])).astype(np.float32)
    out = centres[rng.integers(0, len(centres), rows)] + 0.5 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_embed_measures_the_side_files_recall_on_the_tables_own_rows(tmp_path, capsys, caplog):
    """Clustered rows: high recall, measured with the text rows as queries; random rows with no text rows:
    measured on the rows themselves, low, and embed warns."""
    centres = clustered(50, seed=1)
    videos, texts = around(centres, 5000, seed=2), around(centres, 300, seed=3)
    path = str(tmp_path / "index.parquet")
    save_index(table(videos, text_rows=texts), path, AnnConfig(ann_above=0))
    head = side_head(ann_path(path, "video"))
    assert head["recall_by"] == "rows of the other kind" and head["recall_queries"] == 100
    assert head["recall_at_10"] >= 0.9 and head["recall_nprobe"] == NeighbourConfig().nprobe
    said = capsys.readouterr().out
    assert f"recall@10 {head['recall_at_10']:.3f} at --nprobe 64 (100 queries by rows of the other kind)" in said

    rng = np.random.default_rng(5)
    noise = rng.standard_normal((40_000, 256)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    random_path = str(tmp_path / "random.parquet")
    with caplog.at_level(logging.WARNING):
        save_index(table(noise, text_rows=np.zeros((0, 256), np.float32)), random_path, AnnConfig(ann_above=0))
    head = side_head(ann_path(random_path, "video"))
    assert head["recall_by"] == "rows of its own kind" and head["recall_at_10"] < LOW_RECALL
    assert f"recall@10 {head['recall_at_10']:.3f} on this table's own rows, below 0.90" in caplog.text
