from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from recsys import storage
from recsys.storage import LocalS3Server


def test_s3_server_roundtrip_pyarrow_and_s3fs(s3_server: LocalS3Server) -> None:
    cfg = s3_server.storage_config("s3://test/roundtrip")
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    fs, path = storage.filesystem("s3://test/roundtrip/t.parquet", cfg)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # The same object through s3fs (the fsspec side).
    sfs = storage.fsspec_filesystem("s3://test", cfg)
    with sfs.open("test/roundtrip/t.parquet", "rb") as f:
        assert pq.read_table(f).equals(table)
    storage.write_json("s3://test/roundtrip/m.json", {"k": 1}, cfg)
    assert storage.read_json("s3://test/roundtrip/m.json", cfg) == {"k": 1}
    assert storage.list_files("s3://test/roundtrip", cfg) == [
        "s3://test/roundtrip/m.json",
        "s3://test/roundtrip/t.parquet",
    ]
    # Objects are plain files on the server's disk.
    assert (s3_server.root / "test" / "roundtrip" / "t.parquet").exists()


def test_upload_download_dir(s3_server: LocalS3Server, tmp_path) -> None:
    cfg = s3_server.storage_config("s3://test/dirs")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.txt").write_text("world")
    storage.upload_dir(src, "s3://test/dirs/x", cfg)
    out = storage.download_dir("s3://test/dirs/x", tmp_path / "out", cfg)
    assert (out / "a.txt").read_text() == "hello"
    assert (out / "sub" / "b.txt").read_text() == "world"
