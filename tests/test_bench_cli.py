"""`mediaseal bench`: runs end to end with tiny sizes; checks the JSON shape and that every figure is positive.

No thresholds: the figures depend on the host (and on whatever else runs on it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mediaseal.agent.cli import main

KEYS = {"spool_digest", "spool", "e2e", "small_files"}
FIGURES = ("mb_per_s", "baseline_mb_per_s", "ratio", "paired_ratio", "recordings_per_s")


def test_bench_json_shape_and_positive_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--dir", str(tmp_path), "--size", "4MiB", "--rounds", "1", "--small-count", "10",
                 "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == 1
    assert doc["options"]["size"] == 4 << 20 and doc["options"]["rounds"] == 1
    assert {"cpu", "nproc", "python", "cryptography", "filesystem"} <= set(doc["machine"])
    assert set(doc["results"]) == KEYS
    for key, r in doc["results"].items():
        for f in FIGURES:
            assert r[f] > 0, (key, f, r)
        assert r["rounds"] == 1 and len(r["measured_s"]) == len(r["baseline_s"]) == 1
        assert r["other_load_cores"] >= 0
    assert doc["results"]["small_files"]["recordings_per_round"] == 10
    assert doc["left_in_repository"] == []
    assert list(tmp_path.iterdir()) == []  # everything it wrote is gone


def test_bench_table_and_given_file_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    code = main(["bench", "--dir", str(work), "--size", "1MiB", "--rounds", "1", "--warmup", "0",
                 "--small-count", "0", "--repository", f"file://{repo}"])
    assert code == 0
    out = capsys.readouterr().out
    for label in ("file -> spool", "end to end", "MB/s", "ratio", "plain copy"):
        assert label in out
    assert "small files" not in out
    assert [p for p in repo.rglob("*") if p.is_file()] == []  # its packages were removed again
    assert list(work.iterdir()) == []


def test_bench_bad_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(tmp_path / "missing"), "--size", "1MiB"]) == 1  # the one error mapping
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mediaseal: error:") and "not a directory" in err[0]


@pytest.mark.parametrize("argv", [["--size", "lots"], ["--rounds", "0"], ["--size", "0"]])
def test_bench_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2


def test_bench_rejects_unknown_repository_scheme(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--dir", str(tmp_path), "--repository", "ftp://x/y"]) == 1
    assert capsys.readouterr().err.startswith("mediaseal: error: --repository")
