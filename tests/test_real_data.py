"""Integration: prepare the real IAM-OnDB from ../shared/iam-ondb (about 10-20 s on 2 cores)."""
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
        pytest.skip(f"real IAM-OnDB not found at {REAL_DATA}; the integration test needs it")
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
