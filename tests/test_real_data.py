"""Integration: prepare the real IAM-OnDB from data/raw or ../shared/iam-ondb (about 10-60 s on 2 cores)."""
import json
import os
import time

import numpy as np
import pytest

from conftest import REAL_DATA, ROOT, run_prepare
from dataset import HandwritingDataset


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not (REAL_DATA / "lineStrokes-all.tar.gz").is_file():
        pytest.skip(f"real IAM-OnDB not found in data/raw or {REAL_DATA}; the integration test needs it")
    out = tmp_path_factory.mktemp("real")
    t0 = time.time()
    data = run_prepare(REAL_DATA, out, splits=out / "splits", workers=os.cpu_count() or 1)
    return data, out, time.time() - t0


def test_real_database_counts_and_size(real):
    data, out, seconds = real
    meta = json.loads(str(data["meta"]))
    n = len(data["line_ids"])
    assert n >= 12_000 and len(data["offsets"]) > 7_000_000
    assert (out / "iam_ondb.npz").stat().st_size <= 40e6
    assert meta["dropped"]["placeholder_text"] >= 1 and meta["dropped"]["no_transcription"] >= 1
    assert "a08-551z-09" in meta["dropped_lines"]["no_transcription"]          # known defect: no CSR line
    assert len(str(data["alphabet"])) >= 80
    assert data["line_starts"][-1] == len(data["offsets"]) == len(data["eos"])
    assert seconds < 120, f"preparing took {seconds:.0f} s"


def test_real_split_by_writer(real):
    data, out, _ = real
    split, writer = data["split"], data["writer_ids"]
    parts = {}
    for k in range(3):
        parts[k] = set(writer[split == k]) - {""}
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), "a writer in two splits"
    frac = np.bincount(split, minlength=3) / len(split)
    assert 0.08 <= frac[1] <= 0.12 and 0.08 <= frac[2] <= 0.12
    committed = ROOT / "data" / "splits"
    if (committed / "train.txt").is_file():          # the committed lists are what this code makes from writers.tsv
        for name in ("train", "valid", "test"):
            assert (committed / f"{name}.txt").read_text() == (out / "splits" / f"{name}.txt").read_text()


def test_real_dataset_loads(real):
    _, out, _ = real
    valid = HandwritingDataset(out / "iam_ondb.npz", "valid")
    strokes, text = valid[0]
    assert strokes.shape[1] == 3 and len(text) > 0 and len(valid) > 1000


def test_shipped_models_read_and_write_real_text(real, tmp_path, capsys):
    """The shipped recognizer reads real test lines, and reads the shipped synthesis model's lines of the same texts
    (whole splits: 5.3 % and 9.6 % CER, checkpoints/README.md; these 32 lines get loose bounds)."""
    import evaluate
    import recognizer
    _, out, _ = real
    data, rec, syn = str(out / "iam_ondb.npz"), str(ROOT / "checkpoints" / "recognizer.pt"), str(ROOT / "checkpoints" / "synthesis.pt")
    recognizer.main(["evaluate", "--checkpoint", rec, "--data", data, "--split", "test", "--max-lines", "32"])
    real_lines = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert real_lines["lines"] == 32 and real_lines["cer"] < 0.12
    evaluate.main(["--checkpoint", syn, "--legibility", "--recognizer", rec, "--data", data, "--split", "test",
                   "--max-lines", "32", "--bias", "1", "--out", str(tmp_path)])
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["lines"] == 32 and written["cer_generated"] < 0.2 and written["finished_fraction"] >= 0.85
    assert written["cer_real"] == pytest.approx(real_lines["cer"])     # the same lines, the same reading


def test_the_judge_reads_the_best_of_four(real, tmp_path, capsys):
    """checkpoints/judge.pt, the second recognizer, reads real test lines; the shipped synthesis model's best of four
    attempts per line (--candidates 4, ranked by recognizer.pt) read well by it (whole test split: 7.1 % and 1.8 %
    CER, README Legibility; these 32 lines get loose bounds)."""
    import evaluate
    import recognizer
    _, out, _ = real
    data, judge = str(out / "iam_ondb.npz"), str(ROOT / "checkpoints" / "judge.pt")
    recognizer.main(["evaluate", "--checkpoint", judge, "--data", data, "--split", "test", "--max-lines", "32"])
    real_lines = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert real_lines["lines"] == 32 and real_lines["cer"] < 0.15
    evaluate.main(["--checkpoint", str(ROOT / "checkpoints" / "synthesis.pt"), "--legibility", "--recognizer", judge,
                   "--pick-with", str(ROOT / "checkpoints" / "recognizer.pt"), "--candidates", "4", "--data", data,
                   "--split", "test", "--max-lines", "32", "--bias", "1", "--out", str(tmp_path)])
    said = capsys.readouterr()
    written = json.loads(said.out.strip().splitlines()[-1])
    assert written["candidates"] == 4 and written["lines"] == 32 and written["finished_fraction"] == 1.0
    assert written["cer_generated"] < 0.1 and "chose them" not in said.err
