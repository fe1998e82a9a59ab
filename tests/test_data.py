"""The data layer on the real mirrored files, and every way a data file can be missing or broken."""

import shutil

import pytest

from bsharedrag import data, paths
from bsharedrag.data import DataError


def test_epqa_loads_in_the_common_shape():
    with pytest.warns(UserWarning, match="skipped 1 record"):  # the public file has one row with no candidate
        ds = data.load_dataset("epqa")
    assert len(ds.queries) == 977 and len(ds.corpus) == 9063
    assert list(ds.corpus.columns) == ["doc_id", "title", "text", "lang"] and set(ds.corpus["lang"]) == {"en"}
    assert ds.corpus["doc_id"].is_unique
    gains = {g for judged in ds.qrels.values() for g in judged.values()}
    assert gains == {0, 1, 2}
    assert sum(bool(a) for a in ds.answers.values()) > 700


def test_ecomeval_loads_and_marks_documents_that_say_nothing_relevant():
    ds = data.load_dataset("ecomeval")
    assert len(ds.queries) == 500 and len(ds.corpus) == 1471 and set(ds.corpus["lang"]) == {"zh"}
    judged = [g for j in ds.qrels.values() for g in j.values()]
    assert judged.count(0) == 154  # the data's README counts 154 such documents
    assert all(ds.answers[q] for q in ds.queries["qid"])


def test_query_context_puts_the_product_title_before_an_epqa_question_and_leaves_ecomeval_alone(tmp_path):
    path = tmp_path / "epqa.csv"
    path.write_text("qid,question,ASIN,candidate,source,qa_pair_id,title,label,answer\n"
                    "1,does it fit?,A,fits a 1993 yj,review,,Cargo Net,2,yes\n"
                    "1,does it fit?,A,weight: 2 lb,attribute,,Cargo Net,0,\n"
                    "1,does it fit?,A,number_of_items: 1,attribute,,Crisper Pan,0,\n"  # a text shared by another product
                    "2,is it loud?,B,110 db,attribute,,Horn Kit,2,yes\n", encoding="utf-8")
    plain = data.load_dataset("epqa", path=path)
    titled = data.load_dataset("epqa", path=path, query_context=True)
    assert list(plain.queries["text"]) == list(plain.queries["question"]) == ["does it fit?", "is it loud?"]
    assert list(titled.queries["text"]) == ["Cargo Net: does it fit?", "Horn Kit: is it loud?"]
    assert list(titled.queries["question"]) == list(plain.queries["question"])
    ecom = data.load_dataset("ecomeval", query_context=True)
    assert (ecom.queries["text"] == ecom.queries["question"]).all() and set(ecom.queries["context"]) == {""}
    assert data.query_text("does it fit?", "Cargo Net") == "Cargo Net: does it fit?"  # what `bsharedrag ask --context` sends
    assert data.query_text("does it fit?", "") == data.query_text("does it fit?") == "does it fit?"


def test_split_is_deterministic_disjoint_and_sized():
    a = data.load_dataset("ecomeval", seed=1)
    b = data.load_dataset("ecomeval", seed=1)
    c = data.load_dataset("ecomeval", seed=2)
    assert a.queries.equals(b.queries)
    assert not a.queries["split"].equals(c.queries["split"])
    sizes = a.queries["split"].value_counts().to_dict()
    assert sizes == {"train": 350, "dev": 50, "test": 100}


def test_subsample_keeps_only_the_documents_its_questions_judge(small_epqa):
    assert len(small_epqa.queries) == 30
    judged = {d for j in small_epqa.qrels.values() for d in j}
    assert set(small_epqa.corpus["doc_id"]) == judged


def _isolated(monkeypatch, tmp_path, mirror):
    monkeypatch.setattr(paths, "DATA_RAW", tmp_path / "raw")
    monkeypatch.setenv(paths.MIRROR_ENV, str(mirror))
    monkeypatch.setenv(data.OFFLINE_ENV, "1")


def test_wrong_sha256_names_the_file_and_the_fix(monkeypatch, tmp_path, tally):
    tally("bad inputs tried")
    mirror = tmp_path / "mirror"
    (mirror / "ecomeval").mkdir(parents=True)
    (mirror / "ecomeval" / "rag.json").write_text('{"instruction": "tampered", "answer": ""}\n')
    _isolated(monkeypatch, tmp_path, mirror)
    with pytest.raises(DataError, match=r"rag\.json has sha256 .* expects 8be2d7a2.*delete it and run `make data`"):
        data.fetch("ecomeval")


def test_missing_from_mirror_and_network_says_where_to_put_it(monkeypatch, tmp_path, tally):
    tally("bad inputs tried")
    _isolated(monkeypatch, tmp_path, tmp_path / "empty-mirror")
    with pytest.raises(DataError, match=r"neither .*raw/epqa/dev\.csv nor the mirror.*Put the file at"):
        data.fetch("epqa")


def test_a_failed_download_is_reported_not_hung(monkeypatch, tmp_path, tally):
    tally("bad inputs tried")
    _isolated(monkeypatch, tmp_path, tmp_path / "empty-mirror")
    monkeypatch.delenv(data.OFFLINE_ENV)
    monkeypatch.setattr(data, "_download", lambda url, target, timeout=30.0: (_ for _ in ()).throw(OSError("no route")))
    with pytest.raises(DataError, match="download from https://.* failed .*no route"):
        data.fetch("epqa")


def test_data_raw_is_preferred_over_the_mirror(monkeypatch, tmp_path):
    _isolated(monkeypatch, tmp_path, tmp_path / "empty-mirror")
    (tmp_path / "raw" / "ecomeval").mkdir(parents=True)
    shutil.copy(paths.REPO_ROOT.parent / "shared" / "data" / "ecomeval" / "rag.json", tmp_path / "raw" / "ecomeval")
    assert data.fetch("ecomeval") == tmp_path / "raw" / "ecomeval" / "rag.json"


def test_corrupted_json_line_names_file_and_line(tmp_path, tally):
    tally("bad inputs tried")
    src = (paths.data_mirror() / "ecomeval" / "rag.json").read_text(encoding="utf-8").splitlines()
    broken = tmp_path / "rag.json"
    broken.write_text("\n".join(src[:3] + ['{"instruction": "cut off'] + src[3:6]), encoding="utf-8")
    with pytest.raises(DataError, match=r"rag\.json:4: broken EcomEval record"):
        data.load_dataset("ecomeval", path=broken)


def test_epqa_row_with_a_bad_label_names_the_row(tmp_path, tally):
    tally("bad inputs tried")
    path = tmp_path / "dev.csv"
    path.write_text("qid,question,ASIN,candidate,source,qa_pair_id,title,label,answer\n"
                    "1,is it big?,A,yes it is,cqa,1,Box,2,yes\n"
                    "1,is it big?,A,no,cqa,2,Box,7,\n")
    with pytest.raises(DataError, match=r"dev\.csv:3: .*label in 0/1/2"):
        data.load_dataset("epqa", path=path)


def test_non_utf8_file_is_a_clear_error(tmp_path, tally):
    tally("bad inputs tried")
    path = tmp_path / "rag.json"
    path.write_bytes(b'{"instruction": "\xff\xfe", "answer": "x"}\n')
    with pytest.raises(DataError, match=r"rag\.json:1: not UTF-8"):
        data.load_dataset("ecomeval", path=path)


def test_unknown_data_set_lists_the_known_ones(tally):
    tally("bad inputs tried")
    with pytest.raises(DataError, match="known: epqa, ecomeval"):
        data.load_dataset("msmarco")
