"""prepare_data.py on small IAM-format fixtures written by the tests themselves."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_DATA, ROOT, line_xml, make_archives, run_prepare, tiny_forms, write_fake_iam, write_writers

import prepare_data
from utils import atomic_write

# three lines of one form; XML coordinates, y growing downward
STROKES = [
    [[(100, 500), (110, 490), (110, 490), (125, 470)], [(200, 520)], [(210, 500), (230, 505), (260, 480)]],
    [[(50, 900), (60, 920), (75, 950), (90, 980)], [(150, 930), (160, 940)]],
    [[(300, 300), (320, 310)], [(400, 320), (420, 330)], [(500, 300), (520, 290), (540, 300)]],
]
TEXTS = ["first line", "second, line", "the third"]


def lines_of(data):
    """{line id: (offsets (T, 2), eos (T,), text)} of a loaded npz."""
    s = data["line_starts"]
    return {str(i): (data["offsets"][s[k]:s[k + 1]].astype(int), data["eos"][s[k]:s[k + 1]], str(data["texts"][k]))
            for k, i in enumerate(data["line_ids"])}


@pytest.fixture
def one_form(tmp_path):
    return write_fake_iam(tmp_path / "raw", {"a01-000u": (TEXTS, STROKES)})


def test_offsets_sum_back_to_points_with_y_up(one_form, tmp_path):
    lines = lines_of(run_prepare(one_form, tmp_path / "out"))
    for n, strokes in enumerate(STROKES, start=1):
        offsets, eos, _ = lines[f"a01-000u-{n:02d}"]
        # expected: repeated points dropped, y flipped to point up
        kept = [[p for j, p in enumerate(s) if j == 0 or p != s[j - 1]] for s in strokes]
        points = np.array([(x, -y) for s in kept for (x, y) in s])
        assert (offsets[0] == 0).all()
        np.testing.assert_array_equal(points[0] + np.cumsum(offsets, axis=0), points)
        ends = np.cumsum([len(s) for s in kept]) - 1
        np.testing.assert_array_equal(np.flatnonzero(eos), ends)    # eos on the last point of each stroke
    offsets, _, _ = lines["a01-000u-02"]
    assert offsets[1, 1] < 0          # the pen moves down the board (XML y grows), so dy < 0 with y up


def test_keep_repeats_keeps_every_point(one_form, tmp_path):
    """--keep-repeats: Graves' preprocessing, every recorded point; the zero steps within a stroke stay."""
    data = run_prepare(one_form, tmp_path / "out", "--keep-repeats")
    lines = lines_of(data)
    for n, strokes in enumerate(STROKES, start=1):
        offsets, eos, _ = lines[f"a01-000u-{n:02d}"]
        points = np.array([(x, -y) for s in strokes for (x, y) in s])
        np.testing.assert_array_equal(points[0] + np.cumsum(offsets, axis=0), points)
        np.testing.assert_array_equal(np.flatnonzero(eos), np.cumsum([len(s) for s in strokes]) - 1)
    assert (lines["a01-000u-01"][0][2] == 0).all()                     # the repeated (110, 490)
    meta = json.loads(str(data["meta"]))
    assert meta["keep_repeats"] and meta["duplicate_points_removed"] == 0


def test_fill_gaps_puts_missed_readings_on_the_line():
    """A step spanning n sampling intervals becomes n steps; steps between strokes, long pauses and points
    without a time stay as they are."""
    dt = prepare_data.SAMPLE_INTERVAL
    points = np.array([[0, 0], [10, 0], [40, 30], [41, 30], [50, 0], [60, 0], [70, 0]])
    stroke = np.array([0, 0, 0, 1, 1, 1, 1])
    time = np.array([0, dt, 4 * dt, 4.6 * dt, 6.6 * dt, 6.6 * dt + prepare_data.MAX_GAP, np.nan])
    p, s = prepare_data.fill_gaps(points, stroke, time)
    assert p.tolist() == [[0, 0], [10, 0], [20, 10], [30, 20], [40, 30], [41, 30], [46, 15], [50, 0], [60, 0], [70, 0]]
    assert s.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    p, s = prepare_data.fill_gaps(points[:2], stroke[:2], time[:2])     # nothing missed: unchanged
    assert p.tolist() == [[0, 0], [10, 0]] and s.tolist() == [0, 0]


def test_csr_lines_map_to_their_xml(one_form, tmp_path):
    lines = lines_of(run_prepare(one_form, tmp_path / "out"))
    assert {k: v[2] for k, v in lines.items()} == {f"a01-000u-{n:02d}": t for n, t in enumerate(TEXTS, start=1)}
    # line 3 has 3 strokes, line 2 has 2: the right strokes went with the right text
    assert lines["a01-000u-03"][1].sum() == 3 and lines["a01-000u-02"][1].sum() == 2


def test_bad_lines_are_dropped_counted_and_named(tmp_path, capsys):
    good = STROKES[0]
    jump = [[(100, 500), (120, 500), (120 + prepare_data.MAX_PEN_DOWN_STEP + 50, 500)]]
    forms = {
        "b01-000": (["good one", "Please Enter Transcription here", "good two", "ok", "jumpy"],
                    [good, good, good, b"<WhiteboardCaptureSession><StrokeSet><Stroke><Point x=", jump]),
        "b01-001": (["only one line transcribed"], [good, good]),             # line 2 has no CSR line
        "b01-002": (["a single point", "no points at all"], [[[(5, 5)]], []]),   # one point; an empty StrokeSet
    }
    raw = write_fake_iam(tmp_path / "raw", forms)
    data = run_prepare(raw, tmp_path / "out")
    meta = json.loads(str(data["meta"]))
    assert sorted(map(str, data["line_ids"])) == ["b01-000-01", "b01-000-03", "b01-001-01"]
    assert meta["dropped"] == {"no_transcription": 1, "placeholder_text": 1, "corrupt_xml": 1, "pen_jump": 1,
                               "too_few_points": 2}
    assert meta["dropped_lines"]["corrupt_xml"] == ["b01-000-04"]
    out = capsys.readouterr().out
    assert "corrupt, skipped: b01-000-04.xml" in out and "placeholder_text 1" in out


def test_archives_and_folders_give_the_same_data(tmp_path):
    forms, writers = tiny_forms(n_forms=3, lines_per_form=3)
    tree = write_fake_iam(tmp_path / "tree", forms)
    archives = make_archives(tree, tmp_path / "archives")
    a = run_prepare(tree, tmp_path / "out_a", splits=tmp_path / "splits")
    b = run_prepare(archives, tmp_path / "out_b", splits=tmp_path / "splits", workers=2)
    assert len(a["line_ids"]) == 9
    for k in a:
        if k != "meta":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads(str(b["meta"]))["source"]["lineStrokes"] == "lineStrokes-all.tar.gz"


def test_output_is_byte_stable(tmp_path):
    forms, writers = tiny_forms(n_forms=4, lines_per_form=3)
    raw = make_archives(write_fake_iam(tmp_path / "tree", forms), tmp_path / "raw")
    run_prepare(raw, tmp_path / "o1", splits=tmp_path / "s1", workers=2)
    run_prepare(raw, tmp_path / "o2", splits=tmp_path / "s2", workers=2)
    assert (tmp_path / "o1/iam_ondb.npz").read_bytes() == (tmp_path / "o2/iam_ondb.npz").read_bytes()


def test_split_by_writer_and_lists(tmp_path, capsys):
    forms, writers = tiny_forms(n_forms=20, lines_per_form=5)
    raw = write_fake_iam(tmp_path / "raw", forms)
    write_writers(raw / "writers.tsv", {f: w for f, w in list(writers.items())[:-2]})   # 2 forms of unknown writer
    data = run_prepare(raw, tmp_path / "out", splits=tmp_path / "splits")
    split, writer = data["split"], data["writer_ids"]
    for w in set(writer) - {""}:
        assert len(set(split[writer == w])) == 1, f"writer {w} in two splits"
    assert (split[writer == ""] == 0).all()                                  # unknown writers -> train
    assert [int(np.sum(split == k)) for k in range(3)] == [80, 10, 10]       # 10 % each, whole writers of 5 lines
    lists = {name: (tmp_path / "splits" / f"{name}.txt").read_text().split() for name in ("train", "valid", "test")}
    for k, name in enumerate(("train", "valid", "test")):
        assert lists[name] == sorted(map(str, data["line_ids"][split == k]))
    # the lists, once written, decide the split; lines they do not name go to train
    moved = lists["train"][0]
    (tmp_path / "splits" / "test.txt").write_text("\n".join(lists["test"][1:] + [moved]) + "\n")
    (tmp_path / "splits" / "train.txt").write_text("\n".join(lists["train"][1:]) + "\n")
    capsys.readouterr()
    data2 = run_prepare(raw, tmp_path / "out2", splits=tmp_path / "splits")
    ids2 = list(map(str, data2["line_ids"]))
    assert data2["split"][ids2.index(moved)] == 2 and data2["split"][ids2.index(lists["test"][0])] == 0
    assert "1 lines not listed went to train" in capsys.readouterr().out
    # lists that name none of the lines of a split: written, with a warning
    (tmp_path / "splits" / "valid.txt").write_text("zz-000-01\n")
    run_prepare(raw, tmp_path / "out3", splits=tmp_path / "splits")
    assert "warning: the valid split is empty (the split lists in" in capsys.readouterr().err
    import train                                         # which training refuses, saying what to do
    with pytest.raises(SystemExit, match="has no valid lines: the split lists it was prepared with name none of its "
                                         "lines .*prepare it again with --splits NEW_FOLDER"):
        train.main(["--data", str(tmp_path / "out3"), "--out", str(tmp_path / "run")])
    data4 = run_prepare(raw, tmp_path / "out4", splits=tmp_path / "new_splits")   # as it says: a split by writer
    assert [int(np.sum(data4["split"] == k)) for k in range(3)] == [80, 10, 10]


def test_mean_std_and_alphabet_come_from_train(tiny_prepared):
    with np.load(tiny_prepared) as f:
        d = {k: f[k] for k in f.files}
    train = np.repeat(d["split"] == 0, np.diff(d["line_starts"]))
    np.testing.assert_allclose(d["mean"], d["offsets"][train].mean(0), rtol=1e-5)
    np.testing.assert_allclose(d["std"], d["offsets"][train].std(0), rtol=1e-5)
    assert str(d["alphabet"]) == "".join(sorted(set("".join(d["texts"][d["split"] == 0]))))
    assert d["offsets"].dtype == np.int16 and d["eos"].dtype == np.uint8 and d["line_starts"].dtype == np.int64
    assert d["split"].dtype == np.int8 and d["mean"].dtype == np.float32 and d["alphabet"].shape == ()
    assert sorted(np.bincount(d["split"])) == [5, 5, 30]


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_out_that_is_a_file_is_refused_before_parsing(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run_script("--raw", tmp_path / "nowhere", "--out", tmp_path / "afile")
    assert r.returncode == 1 and "--out " + str(tmp_path / "afile") + " is a file; give a folder" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag, make, message", [
    ("--out", lambda d: d / "afile" / "sub", "cannot write to --out"),              # under a file: cannot be made
    ("--splits", lambda d: d / "afile", "is a file; give a folder"),
    ("--splits", lambda d: d / "afile" / "sub", "cannot write to --splits"),
    ("--writers", lambda d: d, "is a folder; give the TSV file"),
    ("--writers", lambda d: d / "latin1.tsv", "is not UTF-8 text"),
])
def test_unusable_output_or_writer_map_is_one_line_before_parsing(one_form, tmp_path, flag, make, message):
    """Found before a minute of parsing, not after it in a traceback (an unwritable --out or --splits, --splits or
    --writers naming the wrong kind of thing, a writer map in another encoding)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.tsv").write_bytes("form_id\twriter_id\na01-000u\tJos\xe9\n".encode("latin-1"))
    args = {"--raw": one_form, "--out": tmp_path / "out", "--splits": tmp_path / "splits", flag: make(tmp_path)}
    r = run_script(*[x for kv in args.items() for x in kv])
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr and not (tmp_path / "out" / "iam_ondb.npz").exists()


@pytest.mark.parametrize("case", ["no_dir", "no_strokes", "no_ascii", "damaged", "ascii_cut_short"])
def test_missing_or_damaged_input_gives_one_line(tmp_path, case):
    raw = tmp_path / "raw"
    if case != "no_dir":
        make_archives(write_fake_iam(tmp_path / "tree", {"a01-000u": (TEXTS, STROKES)}), raw)
        missing = {"no_strokes": "lineStrokes-all.tar.gz", "no_ascii": "ascii-all.tar.gz"}.get(case)
        if missing:
            (raw / missing).unlink()
        elif case == "damaged":
            data = (raw / "lineStrokes-all.tar.gz").read_bytes()
            (raw / "lineStrokes-all.tar.gz").write_bytes(data[: len(data) // 2])
        else:   # the last bytes missing, as from a cut download: tar alone read every file and went on silently
            data = (raw / "ascii-all.tar.gz").read_bytes()
            (raw / "ascii-all.tar.gz").write_bytes(data[:-12])
    r = run_script("--raw", raw, "--out", tmp_path / "out", "--splits", tmp_path / "splits")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    err = lines[-1]                                   # a damaged archive is found while the progress bar runs
    assert err.startswith("error: ") and (case == "damaged" or len(lines) == 1)
    if case == "ascii_cut_short":
        assert "ascii-all.tar.gz" in err and "damaged" in err
    assert str(raw) in err and "fki.tic.heia-fr.ch" in err
    if case in ("no_strokes", "no_ascii"):
        assert missing in err
    assert not (tmp_path / "out" / "iam_ondb.npz").exists()


def test_ctrl_c_is_one_line_and_writes_nothing(one_form, tmp_path, monkeypatch, capsys):
    def interrupted(task):
        raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, "process_line", interrupted)
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--raw", str(one_form), "--out", str(tmp_path / "out"), "--splits", str(tmp_path / "s"),
                           "--workers", "1"])
    assert stop.value.code == 130 and not (tmp_path / "out" / "iam_ondb.npz").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("prepare_data.py: interrupted; nothing written (run it "
                                                                "again: it starts from the beginning)")
    monkeypatch.undo()                                         # stopped while drawing --plot: the data file stands
    monkeypatch.setattr(prepare_data, "plot_lines", lambda *a: interrupted(None))
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--raw", str(one_form), "--out", str(tmp_path / "out"), "--splits", str(tmp_path / "s"),
                           "--workers", "1", "--plot", "2"])
    assert stop.value.code == 130 and (tmp_path / "out" / "iam_ondb.npz").exists()
    assert "interrupted after writing" in capsys.readouterr().err


def test_help_lists_every_flag():
    r = run_script("--help")
    assert r.returncode == 0
    for flag in ("--raw", "--out", "--writers", "--splits", "--workers", "--resample", "--keep-repeats", "--fill-gaps", "--plot"):
        assert flag in r.stdout


def test_resample_and_plot(tmp_path):
    forms, _ = tiny_forms(n_forms=2, lines_per_form=2)
    raw = write_fake_iam(tmp_path / "raw", forms)
    full = run_prepare(raw, tmp_path / "full")
    coarse = run_prepare(raw, tmp_path / "coarse", "--resample", 40, "--plot", 2)
    assert len(coarse["offsets"]) < len(full["offsets"])
    assert coarse["eos"].sum() == full["eos"].sum()                       # every stroke keeps its end
    assert (tmp_path / "coarse" / "lines.png").stat().st_size > 1000


def test_atomic_write_leaves_no_half_file(tmp_path):
    target = tmp_path / "x.bin"

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_goes_through_links_keeps_modes_and_takes_any_legal_name(tmp_path):
    """A symlink is written through (its target replaced, the link kept); an existing file keeps its permissions;
    a 255-byte name, the most a file system allows, is written (its temp name was 4 bytes longer once)."""
    import os
    import stat
    from utils import output_extension
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "x.png", tmp_path / "link.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link.symlink_to(target)
    assert output_extension(str(link), (".png",), "--out") == ".png"
    atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link.png", "real", "x.png"]
    longest = tmp_path / ("n" * 251 + ".png")
    assert output_extension(str(longest), (".png",), "--out") == ".png" and not longest.exists()
    atomic_write(longest, lambda tmp: Path(tmp).write_bytes(b"ok"))
    assert longest.read_bytes() == b"ok"
    with pytest.raises(ValueError, match="cannot be written: File name too long"):
        output_extension(str(tmp_path / ("n" * 252 + ".png")), (".png",), "--out")
    if os.geteuid() != 0:                               # (root may write any file)
        os.chmod(target, 0o444)
        with pytest.raises(ValueError, match="is read-only; make it writable, or choose another path"):
            output_extension(str(target), (".png",), "--out")


def test_line_xml_fixture_matches_the_real_format():
    """The fixture writer produces what the parser reads from real files."""
    points, stroke, time = prepare_data.parse_strokes(line_xml([[(1, 2), (3, 4)], [(5, 6)]]).encode("latin-1"))
    assert points.tolist() == [[1, -2], [3, -4], [5, -6]] and stroke.tolist() == [0, 0, 1]
    assert time.tolist() == [0.0, 0.01, 0.0]


@pytest.mark.skipif(not (REAL_DATA / "lineStrokes-all.tar.gz").is_file(), reason="needs the real IAM-OnDB archives")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_main_process_alone_stops_the_parse(tmp_path, sig):
    """`kill -INT PID` or `kill -TERM PID` (the main process only, not its workers: `timeout`, a job scheduler) while
    the workers parse: one line and status 130 at once. With Python's own SIGINT handler such a run hung."""
    import signal
    import time
    p = subprocess.Popen([sys.executable, "prepare_data.py", "--raw", str(REAL_DATA), "--out", str(tmp_path / "out"),
                          "--splits", str(tmp_path / "splits"), "--workers", "2"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "parsing lines" not in (p.stderr.read(64) or "parsing lines"):
        pass
    time.sleep(1)                                   # the pool is busy
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].endswith("interrupted; nothing written (run it again: it starts from the beginning)")
