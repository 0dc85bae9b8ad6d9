import gzip

import pytest

from vlm2rec_lab.io import DataFormatError, atomic_dir, atomic_write_json, iter_lines


def test_atomic_dir_leaves_nothing_when_the_body_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_then_replaces_with_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_json_round_trips(tmp_path):
    import json

    import numpy as np

    atomic_write_json(tmp_path / "a.json", {"n": np.int64(3), "x": np.float32(0.5)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"n": 3, "x": 0.5}


def test_iter_lines_reads_plain_and_gzip_alike(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    with gzip.open(tmp_path / "b.txt", "wt") as f:  # gzip detected by content, not by name
        f.write("one\n\ntwo\n")
    assert list(iter_lines(tmp_path / "a.txt")) == [(1, "one"), (3, "two")]
    assert list(iter_lines(tmp_path / "b.txt")) == [(1, "one"), (3, "two")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b"\n \n", "no data lines"),
        (b"ok\n\xff\xfebad\n", "not UTF-8"),
    ],
)
def test_iter_lines_bad_files_name_the_problem(tmp_path, content, message):
    p = tmp_path / "f.txt"
    p.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as e:
        list(iter_lines(p))
    assert str(p) in str(e.value)
    if "UTF-8" in message:
        assert e.value.line == 2


def test_iter_lines_truncated_gzip(tmp_path):
    data = gzip.compress(b"".join(b"line %d\n" % i for i in range(5000)))
    p = tmp_path / "t.json.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        list(iter_lines(p))


def test_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        list(iter_lines(tmp_path / "nope.txt"))
