"""Shared fixtures: a tiny fake IAM-OnDB in the official layout, and a prepared npz made from it.

Other test files may use `tiny_prepared` (path of a small prepared npz with train / valid / test lines) and the
helpers below (write_fake_iam, make_archives, run_prepare, synthetic_strokes).
"""
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the real IAM-OnDB archives: where the README puts them (data/raw), else beside the repo (CI clones it with shared/)
REAL_DATA = next((p for p in (ROOT / "data" / "raw", ROOT.parent / "shared" / "iam-ondb")
                  if (p / "lineStrokes-all.tar.gz").is_file()), ROOT.parent / "shared" / "iam-ondb")

import prepare_data  # noqa: E402


def pytest_configure(config):
    """One CPU thread for the tests' tiny models, here and in the scripts they start: several OpenMP threads on a
    shared 2-core machine wait on each other and run 10-30x slower."""
    import os
    import torch
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_WORDS = "the a and hat than ten dots sole lane notes head sand".split()


def synthetic_strokes(text, rng):
    """A plausible pen trajectory for `text` in XML board units (y down): one loop per letter, a gap per space."""
    strokes, x = [], 1000
    for ch in text:
        if ch == " ":
            x += 120
            continue
        n = int(rng.integers(8, 14))
        theta = np.linspace(0, 2 * np.pi, n) + rng.uniform(0, 1)
        w, h = rng.uniform(20, 35), rng.uniform(30, 60) * (2 if ch in "hdtl" else 1)
        stroke = np.column_stack([x + w * np.cos(theta) + 3 * np.arange(n), 2000 + h * np.sin(theta)])
        strokes.append(stroke.round().astype(int).tolist())
        x += 80
    return strokes


def line_xml(strokes):
    """IAM lineStrokes XML for strokes given as lists of (x, y) with y growing downward."""
    rows = []
    for s in strokes:
        rows.append('    <Stroke colour="black" start_time="0.00" end_time="1.00">')
        rows += [f'      <Point x="{x}" y="{y}" time="{0.01 * i:.2f}"/>' for i, (x, y) in enumerate(s)]
        rows.append("    </Stroke>")
    return "\n".join(['<?xml version="1.0" encoding="ISO-8859-1"?>', "<WhiteboardCaptureSession>",
                      "  <WhiteboardDescription>", '    <SensorLocation corner="top_left"/>',
                      '    <DiagonallyOppositeCoords x="6512" y="1376"/>', "  </WhiteboardDescription>",
                      "  <StrokeSet>", *rows, "  </StrokeSet>", "</WhiteboardCaptureSession>", ""])


def form_txt(csr_lines):
    """IAM ascii form file: OCR block, then 'CSR: ', a blank line and one line per text line (CRLF, as the real ones)."""
    body = ["OCR: ", "", "some OCR text that must be ignored", "", "CSR: ", ""] + [t + " " for t in csr_lines]
    return "\r\n".join(body) + "\r\n"


def write_fake_iam(root, forms):
    """forms: {form id: (csr_lines, [strokes of line 1, line 2, ...])} -> root/lineStrokes/ and root/ascii/ trees.

    A strokes entry may be bytes: written as the XML file as is (for corrupt files)."""
    root = Path(root)
    for form, (csr_lines, lines) in forms.items():
        sub = Path(form[:3]) / form[:7]
        (root / "ascii" / sub).mkdir(parents=True, exist_ok=True)
        (root / "ascii" / sub / f"{form}.txt").write_bytes(form_txt(csr_lines).encode("latin-1"))
        (root / "lineStrokes" / sub).mkdir(parents=True, exist_ok=True)
        for n, strokes in enumerate(lines, start=1):
            data = strokes if isinstance(strokes, bytes) else line_xml(strokes).encode("latin-1")
            (root / "lineStrokes" / sub / f"{form}-{n:02d}.xml").write_bytes(data)
    return root


def make_archives(root, dest):
    """Pack root/lineStrokes and root/ascii as dest/lineStrokes-all.tar.gz and dest/ascii-all.tar.gz."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("lineStrokes", "ascii"):
        with tarfile.open(dest / f"{name}-all.tar.gz", "w:gz") as tar:
            tar.add(Path(root) / name, arcname=name)
    return dest


def tiny_forms(n_forms=8, lines_per_form=5, seed=0):
    """{form id: (texts, strokes)} of synthetic lines, and {form id: writer id} with one writer per form."""
    rng = np.random.default_rng(seed)
    forms, writers = {}, {}
    for i in range(n_forms):
        form = f"t{i // 4 + 1:02d}-{i % 4:03d}z"
        texts = [" ".join(rng.choice(TINY_WORDS, size=int(rng.integers(2, 5)))) for _ in range(lines_per_form)]
        forms[form] = (texts, [synthetic_strokes(t, rng) for t in texts])
        writers[form] = f"w{i}"
    return forms, writers


def write_writers(path, writers):
    Path(path).write_text("form_id\twriter_id\n" + "".join(f"{f}\t{w}\n" for f, w in writers.items()))
    return path


def run_prepare(raw, out, *extra, splits=None, workers=1):
    """Run prepare_data.main in this process; returns the loaded npz as a dict (strings left as numpy)."""
    splits = splits or Path(out) / "splits"
    prepare_data.main(["--raw", str(raw), "--out", str(out), "--splits", str(splits), "--workers", str(workers),
                       *map(str, extra)])
    with np.load(Path(out) / "iam_ondb.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """Path of a prepared npz of 40 synthetic lines by 8 writers: 30 train, 5 valid, 5 test."""
    base = tmp_path_factory.mktemp("tiny_iam")
    forms, writers = tiny_forms()
    write_fake_iam(base / "raw", forms)
    write_writers(base / "raw" / "writers.tsv", writers)
    run_prepare(base / "raw", base / "processed", splits=base / "splits")
    return base / "processed" / "iam_ondb.npz"
