"""Bad input fails early with one line naming the file or line; every format reads the same pairs."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.cleaning import Cleaner
from data_pipeline.config import CleaningConfig, PrepareConfig, SourceConfig, TokenizerConfig
from data_pipeline.errors import InputError
from data_pipeline.prepare import plan_prepare
from data_pipeline.sources import check_split, read_split, split_inputs
from tests.data_pipeline.synthetic import write_parallel_corpus

PAIRS = [("a dog runs", "ein Hund läuft"), ("two cats", "zwei Katzen"), ("the end", "das Ende")]


def _pairs(source: SourceConfig) -> list:
    return list(read_split(source, split_inputs(source, "train"), skip_invalid=False))


def _write_text(tmp_path, en_lines, de_lines, gz=False):
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(tmp_path / f"c.en{suffix}", "wt", encoding="utf-8") as handle:
        handle.write("".join(f"{line}\n" for line in en_lines))
    with opener(tmp_path / f"c.de{suffix}", "wt", encoding="utf-8") as handle:
        handle.write("".join(f"{line}\n" for line in de_lines))
    return str(tmp_path / "c")


@pytest.mark.parametrize("gz", [False, True])
def test_text_files_plain_and_gzip(tmp_path, gz: bool) -> None:
    prefix = _write_text(tmp_path, [p[0] for p in PAIRS], [p[1] for p in PAIRS], gz)
    assert _pairs(SourceConfig(format="text", train=prefix)) == PAIRS


def test_tsv_jsonl_parquet_and_hf_read_the_same_pairs(tmp_path) -> None:
    (tmp_path / "c.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"translation": {"en": s, "de": t}}) + "\n" for s, t in PAIRS))
    pq.write_table(pa.table({"en": [p[0] for p in PAIRS], "de": [p[1] for p in PAIRS]}), tmp_path / "c.parquet")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"translation": [{"en": s, "de": t} for s, t in PAIRS]}
    )}).save_to_disk(str(tmp_path / "hf"))
    for fmt, path in [("tsv", "c.tsv"), ("jsonl", "c.jsonl"), ("parquet", "c.parquet"), ("hf", "hf")]:
        assert _pairs(SourceConfig(format=fmt, train=str(tmp_path / path))) == PAIRS, fmt


def test_a_dataset_repository_with_configurations_reads_the_one_named(tmp_path) -> None:
    """As the hub's wmt14 is laid out (one configuration per language pair: "de-en", "fr-en", ...),
    here as a local folder, which `datasets` reads as it reads a hub repository."""
    configs = []
    for config, lang in (("de-en", "de"), ("fr-en", "fr")):
        for split in ("train", "validation"):
            rows = [{"translation": {"en": s, lang: f"{lang}:{t}"}} for s, t in PAIRS]
            (tmp_path / "wmt" / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / "wmt" / config / f"{split}-00000.parquet")
        configs.append(f"- config_name: {config}\n  data_files:\n"
                       + "".join(f"  - split: {split}\n    path: {config}/{split}-*\n" for split in ("train", "validation")))
    (tmp_path / "wmt" / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    source = SourceConfig(format="hf", train=str(tmp_path / "wmt"), hf_config="fr-en", tgt_lang="fr")
    assert _pairs(source) == [(s, f"fr:{t}") for s, t in PAIRS]
    valid = list(read_split(source, split_inputs(source, "valid"), skip_invalid=False))
    assert valid == [(s, f"fr:{t}") for s, t in PAIRS]
    with pytest.raises(InputError, match=r"cannot load the Hugging Face dataset.*Config name is missing"):
        _pairs(SourceConfig(format="hf", train=str(tmp_path / "wmt")))


def test_named_columns(tmp_path) -> None:
    pq.write_table(pa.table({"source": ["x y"], "target": ["X Y"]}), tmp_path / "c.parquet")
    source = SourceConfig(format="parquet", train=str(tmp_path / "c.parquet"), src_field="source", tgt_field="target")
    assert _pairs(source) == [("x y", "X Y")]
    with pytest.raises(InputError, match=r"c.parquet:1: no field 'en'"):
        _pairs(SourceConfig(format="parquet", train=str(tmp_path / "c.parquet")))


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path) -> None:
    prefix = _write_text(tmp_path, ["a", "b", "c"], ["x", "y"])
    source = SourceConfig(format="text", train=prefix)
    with pytest.raises(InputError) as error:
        check_split(source, split_inputs(source, "train"), skip_invalid=False)
    message = str(error.value)
    assert "c.en has 3 lines" in message and "c.de has 2" in message and "\n" not in message


def test_invalid_utf8_names_file_and_line_or_is_skipped_and_counted(tmp_path) -> None:
    prefix = _write_text(tmp_path, ["good", "bad", "good"], ["gut", "schlecht", "gut"])
    raw = (tmp_path / "c.de").read_bytes().replace(b"schlecht", b"schl\xffcht")
    (tmp_path / "c.de").write_bytes(raw)
    source = SourceConfig(format="text", train=prefix)
    with pytest.raises(InputError, match=r"c\.de:2: invalid UTF-8"):
        check_split(source, split_inputs(source, "train"), skip_invalid=False)
    cleaner = Cleaner(CleaningConfig(invalid_utf8="skip", deduplicate=False), monolingual=False)
    kept = [p for p in read_split(source, split_inputs(source, "train"), skip_invalid=True) if cleaner.keep(p)]
    assert kept == [("good", "gut"), ("good", "gut")]
    assert cleaner.report()["dropped"]["invalid_utf8"] == 1


def test_empty_corpus_and_missing_tokenizer_fail_before_anything_is_written(tmp_path) -> None:
    prefix = _write_text(tmp_path, [], [])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="empty"):
        plan_prepare(PrepareConfig(source=SourceConfig(format="text", train=prefix), output_dir=str(out)))
    prefix = write_parallel_corpus(tmp_path / "ok", 20)
    with pytest.raises(InputError, match="tokenizer model not found"):
        plan_prepare(PrepareConfig(source=SourceConfig(format="text", train=prefix), output_dir=str(out),
                                   tokenizer=TokenizerConfig(path=str(tmp_path / "missing.model"))))
    assert not out.exists()


def test_malformed_rows_name_the_line(tmp_path) -> None:
    (tmp_path / "c.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(InputError, match=r"c.tsv:2: expected 2 tab-separated columns"):
        _pairs(SourceConfig(format="tsv", train=str(tmp_path / "c.tsv")))
    (tmp_path / "c.jsonl").write_text('{"en": "a", "de": "b"}\n{broken\n')
    with pytest.raises(InputError, match=r"c.jsonl:2: not valid JSON"):
        _pairs(SourceConfig(format="jsonl", train=str(tmp_path / "c.jsonl")))


def test_cleaning_counts_every_reason() -> None:
    cleaner = Cleaner(CleaningConfig(max_words=5, max_length_ratio=2.0), monolingual=False)
    pairs = [
        ("a b", "c d"),  # kept
        ("", "x"),  # empty
        ("a b c d e f", "a b c d e f"),  # too long
        ("a", "b c d"),  # ratio 3 > 2
        ("a b", "c d"),  # duplicate
        None,  # invalid utf-8
        ("e f", "g h"),  # kept
    ]
    assert [cleaner.keep(p) for p in pairs] == [True, False, False, False, False, False, True]
    assert cleaner.report() == {"kept": 2, "dropped": {"invalid_utf8": 1, "empty": 1, "too_long": 1,
                                                        "length_ratio": 1, "duplicate": 1}}


def test_builtin_multi30k_is_shipped_with_its_readme() -> None:
    source = SourceConfig()
    inputs = split_inputs(source, "test")
    described = check_split(source, inputs, skip_invalid=False)
    assert described["rows"] == 1000
    from data_pipeline.sources import BUILTIN_MULTI30K

    assert "Elliott" in (BUILTIN_MULTI30K / "README.md").read_text()


def _checked(source: SourceConfig) -> dict:
    return check_split(source, split_inputs(source, "train"), skip_invalid=False)


def test_a_truncated_gzip_file_is_one_line(tmp_path) -> None:
    prefix = _write_text(tmp_path, [p[0] for p in PAIRS] * 50, [p[1] for p in PAIRS] * 50, gz=True)
    whole = (tmp_path / "c.de.gz").read_bytes()
    (tmp_path / "c.de.gz").write_bytes(whole[: len(whole) // 2])  # the copy was cut short
    with pytest.raises(InputError, match=r"c\.de\.gz: cannot be read to its end"):
        _checked(SourceConfig(format="text", train=prefix))


def test_a_file_that_is_not_parquet_is_one_line(tmp_path) -> None:
    (tmp_path / "c.parquet").write_text("en,de\na,b\n")
    with pytest.raises(InputError, match=r"c\.parquet: not a readable Parquet file"):
        _checked(SourceConfig(format="parquet", train=str(tmp_path / "c.parquet")))


def test_a_json_line_that_is_not_an_object_names_its_line(tmp_path) -> None:
    (tmp_path / "c.jsonl").write_text('{"en": "a", "de": "b"}\n["a", "b"]\n')
    with pytest.raises(InputError, match=r"c\.jsonl:2: a JSON line must be an object"):
        _checked(SourceConfig(format="jsonl", train=str(tmp_path / "c.jsonl")))


def test_a_huge_line_is_refused_without_reading_it_whole(tmp_path) -> None:
    from data_pipeline.sources import MAX_LINE_BYTES

    prefix = _write_text(tmp_path, ["short", "x" * (MAX_LINE_BYTES + 10)], ["kurz", "y"])
    with pytest.raises(InputError, match=r"c\.en:2: a line longer than"):
        _checked(SourceConfig(format="text", train=prefix))
