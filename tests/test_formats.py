import gzip
import json

import numpy as np
import pytest

from vlm2rec_lab.data.atomic_files import merge_sequence_lines
from vlm2rec_lab.data.formats import read_raw
from vlm2rec_lab.io import DataFormatError


def rows(raw):
    """(user, item, time) strings in file order."""
    return [(raw.user_ids[u], raw.item_ids[i], int(t)) for u, i, t in zip(raw.user, raw.item, raw.timestamp)]


def bad_line_reason(fmt, path, line, **read_options) -> str:
    """The reason ``read_raw`` stops at ``path``'s malformed ``line`` for, checked to name the file and line."""
    with pytest.raises(DataFormatError) as e:
        read_raw(fmt, [str(path)], **read_options)
    assert e.value.path == str(path) and e.value.line == line and str(e.value).startswith(f"{path}:{line}: ")
    return e.value.reason


def read_skipping_one_bad_line(fmt, path, line, **read_options):
    """``read_raw`` with ``skip_bad_lines``, checked to count ``line`` as the file's one bad line."""
    raw = read_raw(fmt, [str(path)], skip_bad_lines=True, **read_options)
    assert raw.bad_lines[str(path)]["count"] == 1 and raw.bad_lines[str(path)]["examples"][0].startswith(f"line {line}: ")
    return raw


def write_gz_lines(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def test_amazon2018_reviews_and_meta(tmp_path):
    write_gz_lines(tmp_path / "Beauty.json.gz", [
        json.dumps({"reviewerID": "u1", "asin": "a", "unixReviewTime": 10, "overall": 5.0}),
        json.dumps({"reviewerID": "u1", "asin": "b", "unixReviewTime": "20"}),
        json.dumps({"reviewerID": "u2", "asin": "a", "unixReviewTime": 5}),
    ])
    write_gz_lines(tmp_path / "meta_Beauty.json.gz", [
        json.dumps({"asin": "a", "title": "Red &amp; Blue", "imageURLHighRes": ["http://x/a.jpg"],
                    "imageURL": ["http://x/a_small.jpg"], "category": ["Beauty", "Skin Care", "Face"]}),
        json.dumps({"asin": "b", "title": "B", "imageURL": ["http://x/b.jpg"], "main_cat": "All Beauty"}),
    ])
    raw = read_raw("amazon2018", [str(tmp_path)])
    assert rows(raw) == [("u1", "a", 10), ("u1", "b", 20), ("u2", "a", 5)]
    assert raw.meta["a"] == {"title": "Red &amp; Blue", "image_url": "http://x/a.jpg", "category": "Skin Care"}
    assert raw.meta["b"] == {"title": "B", "image_url": "http://x/b.jpg", "category": "All Beauty"}


def test_amazon2014_meta_is_python_literals_and_never_evaluated(tmp_path):
    (tmp_path / "reviews_Beauty_5.json").write_text(
        json.dumps({"reviewerID": "u1", "asin": "a", "unixReviewTime": 1}) + "\n"
        + "{'reviewerID': 'u1', 'asin': 'b', 'unixReviewTime': 2}\n"
    )
    (tmp_path / "meta_Beauty.json").write_text(
        "{'asin': 'a', 'title': 'Cream', 'imUrl': 'http://x/a.jpg', 'categories': [['Beauty', 'Skin Care']]}\n"
        "{'asin': 'b', 'title': __import__('os').getcwd()}\n"
    )
    with pytest.raises(DataFormatError) as e:
        read_raw("amazon2014", [str(tmp_path)])
    assert "meta_Beauty.json:2" in str(e.value) and "not a valid record" in str(e.value)
    raw = read_raw("amazon2014", [str(tmp_path)], skip_bad_lines=True)
    assert rows(raw) == [("u1", "a", 1), ("u1", "b", 2)]
    assert raw.meta == {"a": {"title": "Cream", "image_url": "http://x/a.jpg", "category": "Skin Care"}}
    assert raw.bad_lines[str(tmp_path / "meta_Beauty.json")]["count"] == 1


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"reviewerID": "u", "asin": "a"}', "missing field 'unixReviewTime'"),
        ('{"asin": "a", "unixReviewTime": 3}', "missing field 'reviewerID'"),
        ('{"reviewerID": "u", "asin": "a", "unixReviewTime": "soon"}', "unixReviewTime 'soon' is not a number"),
        ('{"reviewerID": "u", "asin": "a", ', "not a valid record"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_review_lines_name_file_line_and_field(tmp_path, line, message):
    p = tmp_path / "reviews.json"
    p.write_text(json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 1}) + "\n" + line + "\n")
    assert message in bad_line_reason("amazon2018", p, 2)


def test_skip_bad_lines_counts_them(tmp_path):
    p = tmp_path / "reviews.json"
    good = json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 1})
    p.write_text("\n".join([good, "garbage", good, "{}"]) + "\n")
    raw = read_raw("amazon2018", [str(p)], skip_bad_lines=True)
    assert raw.n_rows == 2
    assert raw.bad_lines[str(p)]["count"] == 2
    assert raw.bad_lines[str(p)]["examples"][0].startswith("line 2:")


def test_ratings_csv_with_and_without_header(tmp_path):
    (tmp_path / "Beauty.csv").write_text("item,user,rating,timestamp\na,u1,5.0,100\nb,u1,4,90\n")
    raw = read_raw("ratings-csv", [str(tmp_path / "Beauty.csv")])
    assert rows(raw) == [("u1", "a", 100), ("u1", "b", 90)]
    (tmp_path / "bad.csv").write_text("a,u1,5.0,100\na,u1,5.0\n")
    with pytest.raises(DataFormatError, match=r"bad.csv:2: expected 4 fields"):
        read_raw("ratings-csv", [str(tmp_path / "bad.csv")])
    assert read_raw("ratings-csv", [str(tmp_path / "bad.csv")], skip_bad_lines=True).meta is None


def test_p5_sequences_use_positions_as_time(tmp_path):
    p = tmp_path / "user_sequence.txt"
    p.write_text("u1 a b c\nu2 c a\n")
    raw = read_raw("p5", [str(p)])
    assert rows(raw) == [("u1", "a", 0), ("u1", "b", 1), ("u1", "c", 2), ("u2", "c", 0), ("u2", "a", 1)]
    assert raw.meta is None
    p.write_text("u1 a b\nlonely\n")
    with pytest.raises(DataFormatError, match=r"user_sequence.txt:2: expected a user id followed by item ids"):
        read_raw("p5", [str(p)])


def test_atomic_interaction_layout(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                      "u1\ta\t5\t30\nu1\tb\t5\t10\n")
    (tmp_path / "x.text").write_text("item_id:token\ttext:token_seq\na\tThe A\nb\tThe B\n")
    raw = read_raw("atomic", [str(tmp_path)])
    assert rows(raw) == [("u1", "a", 30), ("u1", "b", 10)]
    assert raw.meta["b"]["title"] == "The B"


def test_atomic_sequence_layout_merges_cut_histories(tmp_path):
    # one user with 7 items 0..6 (indices), histories cut at 3 items, train has every prefix
    seq = list(range(7))
    train = [(seq[max(0, t - 3):t], seq[t]) for t in range(1, 5)]
    fmt = lambda h, t: f"0\t{' '.join(map(str, h))}\t{t}"  # noqa: E731
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    (tmp_path / "d.train.inter").write_text(head + "\n".join(fmt(h, t) for h, t in reversed(train)) + "\n")
    (tmp_path / "d.valid.inter").write_text(head + fmt(seq[2:5], 5) + "\n")
    (tmp_path / "d.test.inter").write_text(head + fmt(seq[3:6], 6) + "\n")
    (tmp_path / "d.item2index").write_text("".join(f"I{k}\t{k}\n" for k in range(7)))
    (tmp_path / "d.user2index").write_text("alice\t0\n")
    raw = read_raw("atomic", [str(tmp_path)])
    assert rows(raw) == [("alice", f"I{k}", k) for k in range(7)]


def test_merge_handles_repeated_items():
    lines = [(("a",), "a"), (("a", "a"), "b"), (("a", "a", "b"), "a")]
    assert merge_sequence_lines(lines) == ["a", "a", "b", "a"]


def test_atomic_rejects_unknown_file_and_missing_header(tmp_path):
    (tmp_path / "notes.csv").write_text("x\n")
    with pytest.raises(DataFormatError, match="not an atomic file"):
        read_raw("atomic", [str(tmp_path / "notes.csv")])
    (tmp_path / "y.inter").write_text("u1\ta\n")
    with pytest.raises(DataFormatError, match="header must be name:type"):
        read_raw("atomic", [str(tmp_path / "y.inter")])


def test_no_review_file(tmp_path):
    (tmp_path / "meta_X.json").write_text('{"asin": "a"}\n')
    with pytest.raises(DataFormatError, match="no review file"):
        read_raw("amazon2018", [str(tmp_path)])


def test_codes_are_int64_arrays(tmp_path):
    p = tmp_path / "user_sequence.txt"
    p.write_text("u1 a b c\n")
    raw = read_raw("p5", [str(p)])
    assert raw.user.dtype == np.int64 and raw.item.dtype == np.int64


# --------------------------------------------------------------------------- bad values that used to crash or slip through


def _review(ts) -> str:
    return json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": ts})


# (format, file name, header lines, good line (time 1), bad line, the offending value as the message shows it)
BAD_TIMES = [
    ("ratings-csv", "r.csv", [], "a,u1,5,1", "b,u1,5,inf", "'inf'"),
    ("ratings-csv", "r.csv", [], "a,u1,5,1", "b,u1,5,-inf", "'-inf'"),
    ("ratings-csv", "r.csv", [], "a,u1,5,1", "b,u1,5,nan", "'nan'"),
    ("ratings-csv", "r.csv", [], "a,u1,5,1", "b,u1,5,1e30", "'1e30'"),
    ("amazon2018", "reviews.json", [], _review(1), _review("inf"), "'inf'"),
    ("amazon2018", "reviews.json", [], _review(1), _review(1e30), "1e+30"),
    ("amazon2018", "reviews.json", [], _review(1), _review(2**63), str(2**63)),
    ("amazon2014", "reviews.json", [], _review(1), "{'reviewerID': 'u', 'asin': 'b', 'unixReviewTime': 1e999}", "inf"),
    ("amazon2014", "reviews.json", [], _review(1), f"{{'reviewerID': 'u', 'asin': 'b', 'unixReviewTime': {-10**30}}}",
     str(-10**30)),
    ("atomic", "x.inter", ["user_id:token\titem_id:token\ttimestamp:float"], "u\ta\t1", "u\tb\tinf", "'inf'"),
]


@pytest.mark.parametrize("fmt, name, head, good, bad, value", BAD_TIMES, ids=[f"{c[0]}-{c[5]}" for c in BAD_TIMES])
def test_timestamps_that_are_not_finite_int64_unix_times_are_bad_lines(tmp_path, fmt, name, head, good, bad, value):
    p = tmp_path / name
    p.write_text("\n".join([*head, good, bad, good]) + "\n")
    line = len(head) + 2
    reason = bad_line_reason(fmt, p, line)
    assert value in reason and ("not a finite unix time" in reason or "does not fit an int64 unix time" in reason)
    raw = read_skipping_one_bad_line(fmt, p, line)
    assert raw.n_rows == 2 and raw.timestamp.tolist() == [1, 1]


def test_timestamps_at_the_int64_edges_still_read(tmp_path):
    p = tmp_path / "reviews.json"
    p.write_text("\n".join([_review(2**63 - 1), _review(-(2**63)), _review("1.5e9"), _review(12.9)]) + "\n")
    assert read_raw("amazon2018", [str(p)]).timestamp.tolist() == [2**63 - 1, -(2**63), 1_500_000_000, 12]


@pytest.mark.parametrize("first, value", [("a,u1,5.0,inf", "'inf'"), ("a,u1,5,soon", "'soon'"), ("a,u1,5,1e30", "'1e30'")])
def test_ratings_csv_first_line_with_a_bad_timestamp_is_a_bad_line_not_a_header(tmp_path, first, value):
    p = tmp_path / "r.csv"
    p.write_text(f"{first}\nb,u1,4,100\nc,u2,3,50\n")
    assert f"timestamp {value}" in bad_line_reason("ratings-csv", p, 1)
    assert rows(read_skipping_one_bad_line("ratings-csv", p, 1)) == [("u1", "b", 100), ("u2", "c", 50)]


def test_ratings_csv_header_is_recognised_by_column_names_in_every_file(tmp_path):
    (tmp_path / "a.csv").write_text("item,user,rating,timestamp\na,u1,5.0,100\n")
    (tmp_path / "b.csv").write_text("\nasin, reviewerID, overall, unixReviewTime\nb,u1,4,90\n")  # first non-blank line
    raw = read_raw("ratings-csv", [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert rows(raw) == [("u1", "a", 100), ("u1", "b", 90)] and raw.bad_lines == {}
    # a line of names after the first is not a header
    (tmp_path / "c.csv").write_text("a,u1,5,100\nitem,user,rating,timestamp\n")
    with pytest.raises(DataFormatError, match=r"c\.csv:2: could not convert"):
        read_raw("ratings-csv", [str(tmp_path / "c.csv")])


# (a P5 line that is not all ids, its first token that is not an id)
NOT_ID_LINES = [
    ('{"reviewerID": "u", "asin": "a"}', '{"reviewerID":'),
    ("u2 a,b,c d", "a,b,c"),
    ("u2 a 'b'", "'b'"),
    ("[u2] a b", "[u2]"),
]


@pytest.mark.parametrize("bad, token", NOT_ID_LINES)
def test_p5_tokens_that_are_not_ids_are_bad_lines(tmp_path, bad, token):
    p = tmp_path / "user_sequence.txt"
    p.write_text(f"u1 a b\n{bad}\nu3 b a\n")
    reason = bad_line_reason("p5", p, 2)
    assert repr(token) in reason and "is not an id" in reason
    assert rows(read_skipping_one_bad_line("p5", p, 2)) == [("u1", "a", 0), ("u1", "b", 1), ("u3", "b", 0), ("u3", "a", 1)]


def test_p5_reads_integer_and_raw_amazon_ids(tmp_path):
    # the shared Beauty file: reviewer ids, then ASINs (some all digits, ISBN-10 ones may end in X)
    p = tmp_path / "user_sequence.txt"
    p.write_text("A1YJEY40YUW4SE B004756YJA 7806397051 043935806X\n17 3 4\nuser_1.a-b item-2 item.3\n")
    raw = read_raw("p5", [str(p)])
    assert raw.user_ids == ["A1YJEY40YUW4SE", "17", "user_1.a-b"]
    assert raw.item_ids == ["B004756YJA", "7806397051", "043935806X", "3", "4", "item-2", "item.3"]


def test_p5_integer_ids_refuse_any_other_token(tmp_path, capsys):
    """P5's own indexed files (--integer-ids): `abc` is a malformed line, named; raw ids stay the default."""
    from vlm2rec_lab.cli import main

    p = tmp_path / "user_sequence.txt"
    p.write_text("1 2 3\n2 abc 3\n3 3 2\n")
    assert read_raw("p5", [str(p)]).item_ids == ["2", "3", "abc"]
    assert "'abc' is not an integer id" in bad_line_reason("p5", p, 2, integer_ids=True)
    raw = read_skipping_one_bad_line("p5", p, 2, integer_ids=True)
    assert rows(raw) == [("1", "2", 0), ("1", "3", 1), ("3", "3", 0), ("3", "2", 1)]
    with pytest.raises(ValueError, match="--integer-ids applies to --format p5"):
        read_raw("ratings-csv", [str(p)], integer_ids=True)
    out = tmp_path / "out"
    code = main(["data", "prepare", "--format", "p5", "--input", str(p), "--out", str(out), "--require-images", "no",
                 "--integer-ids"])
    err = capsys.readouterr().err
    assert code == 2 and f"{p}:2: 'abc' is not an integer id" in err and not out.exists()


def test_cli_prepare_with_an_inf_timestamp_exits_2_naming_file_and_line(tmp_path, capsys):
    from vlm2rec_lab.cli import main

    src = tmp_path / "ratings.csv"
    src.write_text("a,u1,5,100\nb,u1,4,inf\n")
    out = tmp_path / "out"
    code = main(["data", "prepare", "--format", "ratings-csv", "--input", str(src), "--out", str(out), "--require-images", "no"])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "OverflowError" not in err
    assert f"{src}:2: timestamp 'inf' is not a finite unix time" in err
    assert not out.exists()
