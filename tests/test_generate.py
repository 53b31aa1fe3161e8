"""CLI smoke tests of generate.py on tiny untrained checkpoints built here (CPU, a few seconds).

Untrained models write scribbles that rarely reach the end of the text, so most runs pass a low
--max-steps-per-char to stay fast; the checks are about files, batching, priming and error messages.
"""
import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
import utils
import model as model_module
from model import HandwritingModel, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CHARS = " !',-.?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FAST = ["--max-steps-per-char", "6", "--seed", "1"]
SVG = "{http://www.w3.org/2000/svg}"


def tiny_checkpoint(path, task):
    torch.manual_seed(0)
    cfg = ModelConfig(task=task, hidden_size=16, mixtures=2, window_gaussians=2,
                      alphabet_size=len(CHARS) if task == "synthesis" else 0)
    torch.save({"model": HandwritingModel(cfg).state_dict(), "model_config": cfg.to_dict(), "alphabet": CHARS,
                "mean": [8.0, -0.1], "std": [40.0, 37.0], "step": 0}, path)
    return str(path)


def loops(text, y_down=True):
    """A fake handwritten line for `text`: one loop per letter, absolute points per stroke, in board units."""
    strokes, x = [], 0.0
    for k, ch in enumerate(text):
        if ch == " ":
            x += 120
            continue
        t = np.linspace(0, 2 * np.pi, 10) + k
        strokes.append(np.column_stack([x + 25 * np.cos(t) + 3 * np.arange(10), 40 * np.sin(t) * (1 if y_down else -1)]))
        x += 80
    return strokes


def to_offsets(strokes):
    points = np.concatenate(strokes)
    off = np.zeros((len(points), 3))
    off[1:, :2] = np.diff(points, axis=0)
    off[np.cumsum([len(s) for s in strokes]) - 1, 2] = 1
    return off


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    styles = [{"text": t, "writer": f"w{i}", "line_id": f"x{i}", "offsets": to_offsets(loops(t, y_down=False)).round().astype(int).tolist()}
              for i, t in enumerate(["the hat", "a sand lane"])]
    (d / "styles.json").write_text(json.dumps({"reference": {"height": 80.0, "step": 20.0}, "styles": styles}))
    (d / "prime.json").write_text(json.dumps({"text": "my notes", "strokes": [s.tolist() for s in loops("my notes")]}))
    return {"synthesis": tiny_checkpoint(d / "synthesis.pt", "synthesis"),
            "prediction": tiny_checkpoint(d / "prediction.pt", "prediction"),
            "styles": str(d / "styles.json"), "prime": str(d / "prime.json"), "dir": d}


def run(files, task, out, *extra):
    fast = FAST if task == "synthesis" else FAST[2:]                  # a text's flags stop a prediction run
    args = ["--task", task, "--checkpoint", files[task], "--out", str(out), *fast]
    if ("--style" in extra or "--prime-file" in extra) and "--styles" not in extra:
        args += ["--styles", files["styles"]]                            # the tiny styles and their reference size
    if task == "synthesis" and "--text" not in extra and "--text-file" not in extra:
        args += ["--text", "hi there"]
    if task == "prediction" and "--steps" not in extra:
        args += ["--steps", "60"]
    return generate.main(args + list(extra))


@pytest.fixture
def spy(monkeypatch):
    """Records the arguments of every HandwritingModel.sample call."""
    calls = []
    original = model_module.HandwritingModel.sample

    def sample(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(model_module.HandwritingModel, "sample", sample)
    return calls


@pytest.mark.parametrize("task", ["synthesis", "prediction"])
@pytest.mark.parametrize("ext", [".png", ".svg", ".gif"])
def test_every_format_is_a_valid_file(files, tmp_path, task, ext, capsys):
    from PIL import Image
    out = tmp_path / f"page{ext}"
    assert run(files, task, out) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    if ext == ".png":
        import matplotlib.image
        assert matplotlib.image.imread(out).shape[0] > 10
    elif ext == ".svg":
        root = ET.parse(out).getroot()
        assert root.tag == SVG + "svg" and len(root.findall(f".//{SVG}path")) > 1
    else:
        with Image.open(out) as im:
            assert im.n_frames > 1


@pytest.mark.parametrize("ext", [".png", ".svg", ".gif"])
def test_same_seed_same_bytes(files, tmp_path, ext):
    a, b, c = (tmp_path / f"{n}{ext}" for n in "abc")
    assert run(files, "synthesis", a) == 0 and run(files, "synthesis", b) == 0
    assert run(files, "synthesis", c, "--seed", "2") == 0                       # the later --seed wins
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


@pytest.mark.parametrize("ext", [".png", ".svg", ".pdf"])
def test_same_seed_same_attention_plot(files, tmp_path, ext):
    """--plot-attention in every format: the same bytes for the same seed (an SVG's element ids were random)."""
    a, b = (tmp_path / f"{n}{ext}" for n in "ab")
    for att in (a, b):
        assert run(files, "synthesis", tmp_path / "x.png", "--plot-attention", str(att)) == 0
    assert a.read_bytes() == b.read_bytes()


def test_lines_and_samples_are_one_batch(files, tmp_path, spy):
    out = tmp_path / "page.png"
    assert run(files, "synthesis", out, "--text", "ab cd\n\nef gh ij kl mn", "--max-chars-per-line", "8",
               "--num-samples", "3", "--retries", "0") == 0              # retries would add calls for stalled lines
    assert len(spy) == 1
    decoded = ["".join(CHARS[i - 1] for i in row if i > 0) for row in spy[0]["text"].tolist()]   # (B, U) ids
    assert decoded == ["ab cd", "ef gh ij", "kl mn"] * 3                # 3 lines (the blank one not sampled) x 3 samples


def test_npz_output_writes_any_number_of_lines_in_batches(files, tmp_path, spy, capsys):
    """--out FILE.npz: no page limit, --batch-size lines per sample() call, every line saved with its text, whether
    it finished and how many samplings it took; the same seed gives the same lines."""
    from utils import load_strokes
    words = [f"line {w}" for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz", "abc", "de")]
    (tmp_path / "t.txt").write_text("\n".join(words) + "\n\n", encoding="utf-8")
    out = tmp_path / "lines.npz"
    args = ["--text-file", str(tmp_path / "t.txt"), "--num-samples", "3", "--batch-size", "16", "--style", "0"]
    assert run(files, "synthesis", out, *args, "--retries", "0") == 0
    assert [len(c["text"]) for c in spy] == [16, 16, 13]                     # 15 lines x 3 samples, no blank rows
    assert all(c["prime"] is not None and c["prime_chars"] == len("the hat ") for c in spy)
    ids, texts, lines = load_strokes(out)
    assert texts == words * 3 and ids == [str(i + 1) for i in range(45)]
    with np.load(out) as f:
        finished, attempts = f["finished"], f["attempts"]
    assert finished.shape == attempts.shape == (45,) and (attempts == 1).all()
    assert all(1 < len(x) <= 6 * len(t) + 1 and x[-1, 2] == 1 for x, t in zip(lines, texts))  # own cap
    assert all((x[0, :2] == 0).all() for x in lines)        # a primed line starts at its own first point
    assert f"wrote {out} (45 line(s) = 15 x 3 sample(s)" in capsys.readouterr().out
    assert run(files, "synthesis", tmp_path / "again.npz", *args, "--retries", "0") == 0
    assert all(np.array_equal(a, b) for a, b in zip(lines, load_strokes(tmp_path / "again.npz")[2]))
    # prediction: --num-samples lines of --steps points each, no text
    assert run(files, "prediction", tmp_path / "p.npz", "--num-samples", "45", "--batch-size", "20") == 0
    ids, texts, lines = load_strokes(tmp_path / "p.npz")
    assert len(lines) == 45 and texts == [""] * 45 and all(len(x) == 60 for x in lines)
    assert run(files, "prediction", tmp_path / "p.png", "--num-samples", "2", "--save-strokes", str(tmp_path / "s.npz")) == 0
    assert load_strokes(tmp_path / "s.npz")[1] == ["", ""]               # so with a picture too (it was a made-up text)


@pytest.mark.parametrize("task", ["synthesis", "prediction"])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_npz_output_stopped_with_ctrl_c_keeps_the_lines_done(files, tmp_path, monkeypatch, capsys, task, how):
    import os
    import signal
    from utils import load_strokes
    calls, original = [], model_module.HandwritingModel.sample

    def sample(self, *args, **kwargs):                                       # stopped during the third batch
        calls.append(1)
        if len(calls) == 3:
            if how == "sigterm":                                              # `timeout`, `kill`
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)                                                 # the handler raises here
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)
    monkeypatch.setattr(model_module.HandwritingModel, "sample", sample)
    out = tmp_path / "stopped.npz"
    what = ["--text", "ab\ncd ef\ng\nhij\nk l", "--retries", "0"] if task == "synthesis" else []
    total = 25 if task == "synthesis" else 10                                # 5 lines x 5 samples, or 10 samples
    assert run(files, task, out, *what, "--num-samples", str(total // 5 if what else total), "--batch-size", "4") == 130
    assert f"interrupted: wrote the 8 of {total} lines" in capsys.readouterr().err
    ids, texts, lines = load_strokes(out)
    assert len(ids) == len(set(ids)) == 8 and all(1 <= int(i) <= total for i in ids)
    assert ids == sorted(ids, key=int)
    calls[:] = [1, 1]                                                        # stopped in the first batch: an earlier
    assert run(files, task, out, *what, "--batch-size", "4") == 130                    # file is left alone
    assert "nothing written" in capsys.readouterr().err and load_strokes(out)[0] == ids


def test_npz_output_reports_unfinished_lines_in_one_warning(files, tmp_path, capsys):
    out = tmp_path / "u.npz"
    assert run(files, "synthesis", out, "--text", "abc\ndefgh\nij", "--max-steps-per-char", "1", "--retries", "1") == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 line(s) did not reach the end" in err and "line id(s) 1, 2, 3" in err
    with np.load(out) as f:
        assert not f["finished"].any() and (f["attempts"] == 2).all()


@pytest.mark.parametrize("ext", [".png", ".svg"])
def test_a_long_text_fills_numbered_pages(files, tmp_path, spy, capsys, ext):
    """More lines than a page holds (40): pages of 40 lines, one batch each, OUT-1, OUT-2, ...; no page starts with
    a blank row; --save-strokes gets every line; warnings number the lines of the whole text."""
    from utils import load_strokes
    words = [f"w{chr(97 + i % 26)}" for i in range(50)]
    text = "\n".join(words[:40]) + "\n\n" + "\n".join(words[40:])    # a blank row falls at the top of page 2
    out = tmp_path / f"letter{ext}"
    assert run(files, "synthesis", out, "--text", text, "--save-strokes", str(tmp_path / "all.npz"),
               "--max-steps-per-char", "1", "--retries", "0") == 0
    assert [c["text"].shape[0] for c in spy] == [40, 10]
    assert not out.exists() and (tmp_path / f"letter-1{ext}").stat().st_size > 0
    assert (tmp_path / f"letter-2{ext}").stat().st_size > 0 and not (tmp_path / f"letter-3{ext}").exists()
    captured = capsys.readouterr()
    assert f"wrote {tmp_path / f'letter-1{ext}'} (40 line(s)" in captured.out and "10 lines on 2 pages" not in captured.out
    assert f"wrote {tmp_path / f'letter-2{ext}'} (10 line(s)" in captured.out and "on 2 pages" in captured.out
    assert "line 42 ('wo')" in captured.err and "line 41 " not in captured.err      # row 41 is the blank one
    assert load_strokes(tmp_path / "all.npz")[1] == words
    assert run(files, "synthesis", out, "--text", "ab") == 0 and out.exists()    # one page now: the old pages stay,
    pages = f"{tmp_path / f'letter-1{ext}'}, {tmp_path / f'letter-2{ext}'}"       # and the run says so
    assert f"note: {pages} from an earlier run are still there" in capsys.readouterr().err
    assert (tmp_path / f"letter-2{ext}").exists()


def test_paginate():
    assert generate.paginate(["a", "b", "", "c", "d", "", "", "e"], 3) == [[(0, "a"), (1, "b")], [(3, "c"), (4, "d")],
                                                                            [(7, "e")]]
    assert generate.paginate(["a", "", "", "", "b"], 2) == [[(0, "a")], [(4, "b")]]
    assert generate.page_path("out/a.png", 0, 1) == "out/a.png" and generate.page_path("out/a.png", 1, 3) == "out/a-2.png"


def test_wrapping_and_cleaning():
    lines, dropped, folded = generate.prepare_lines("  one two\tthree \u2019four\u2019 five six seven\n\n\nend  ", CHARS,
                                                    12, False)
    assert lines == ["one two", "three 'four'", "five six", "seven", "", "", "end"]
    assert all(len(ln) <= 12 for ln in lines) and dropped == [] and folded == {}
    # --drop-unknown: accents left off (and compatibility forms: a ligature, full-width letters), the rest left out
    lines, dropped, folded = generate.prepare_lines("na\u00efve caf\u00e9 \ufb01sh \uff21\uff22 5\u20ac", CHARS, 40, True)
    assert lines == ["naive cafe fish AB"] and dropped == ["5", "\u20ac"]
    assert folded == {"\u00ef": "i", "\u00e9": "e", "\ufb01": "fi", "\uff21": "A", "\uff22": "B"}
    with pytest.raises(generate.GenerateError, match=r"alphabet: '\u00e9' U\+0301; remove them or pass --drop-unknown"):
        generate.prepare_lines("\u00e9 e\u0301", CHARS, 40, False)          # a combining accent named by its code


@pytest.mark.parametrize("prime", ["style", "file", "curly"])
def test_priming_joins_the_texts(files, tmp_path, spy, prime):
    """The priming text leads the new one; a prime file's curly quote (a phone's keyboard) is written plain."""
    curly = tmp_path / "curly.json"
    curly.write_text(json.dumps({**json.loads(Path(files["prime"]).read_text()), "text": "my notes\u2019"}))
    how = {"style": ["--style", "1"], "file": ["--prime-file", files["prime"]], "curly": ["--prime-file", str(curly)]}[prime]
    assert run(files, "synthesis", tmp_path / "p.png", "--text", "new words", "--show-prime", *how) == 0
    alphabet_text = "".join(CHARS[i - 1] for i in spy[0]["text"][0] if i > 0)
    assert alphabet_text == {"style": "a sand lane", "file": "my notes", "curly": "my notes'"}[prime] + " new words"
    assert spy[0]["prime"].ndim == 2 and spy[0]["prime"].shape[1] == 3
    assert spy[0]["prime_chars"] == len(alphabet_text) - len("new words")   # the cap counts the new words only


def paced_checkpoint(path, files, chars_per_step):
    """The tiny synthesis checkpoint with its window moving chars_per_step characters per step: 0.5 finishes every
    line within a few points per character, 1e-13 never does."""
    ckpt = torch.load(files["synthesis"], weights_only=True)
    ckpt["model"]["window.bias"][4:] = math.log(chars_per_step)      # window_gaussians=2: kappa_hat is outputs 4, 5
    ckpt["model"]["window.weight"][4:] = 0
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("out", ["p.png", "p.npz"])
def test_save_hand_keeps_the_first_line_as_a_prime_file_for_later_texts(files, tmp_path, spy, capsys, out):
    """--save-hand: the first line written (not its prime) becomes a prime file, exactly the line drawn (or saved),
    read back at its size (not scaled as a hand's own strokes are); a later text is primed with it; a line that did not
    finish is not saved (exit status 1), and a short one is saved with a warning."""
    paced = {**files, "synthesis": paced_checkpoint(tmp_path / "paced.pt", files, 0.25)}   # ink enough for a prime file
    hand, strokes = tmp_path / "hand.json", tmp_path / ("lines.npz" if out == "p.png" else out)
    save = ["--save-strokes", str(strokes)] if out == "p.png" else []
    assert run(paced, "synthesis", tmp_path / out, "--text", "hi there\nab", "--save-hand", str(hand), *save) == 0
    data = json.loads(hand.read_text())
    _, texts, lines = utils.load_strokes(strokes)
    assert data["text"] == texts[0] == "hi there" and "--seed 1," in data["source"] and data["data_units"]
    ink = np.concatenate(data["strokes"]) * [1, -1]                     # screen coordinates: y down
    np.testing.assert_allclose(ink, np.cumsum(lines[0][:, :2], axis=0), atol=0.006)
    assert [len(s) for s in data["strokes"]] == np.diff(np.r_[0, np.flatnonzero(lines[0][:, 2]) + 1]).tolist()
    text, offsets = utils.load_prime_file(hand)                         # at its size, not scaled to a reference
    span = lambda off: np.ptp(np.cumsum(off[:, :2], axis=0), axis=0)
    np.testing.assert_allclose(span(offsets), span(lines[0]), rtol=0.1)
    assert abs(span(offsets)[1] - span(utils.load_prime_file(files["prime"])[1])[1]) > 0.2 * span(offsets)[1]
    said = capsys.readouterr()
    assert "writes in its hand" in said.out and "is 8 characters long: a line of 25-40" in said.err
    spy.clear()
    assert run(files, "synthesis", tmp_path / "q.png", "--text", "new", "--prime-file", str(hand)) == 0
    assert "".join(CHARS[i - 1] for i in spy[0]["text"][0] if i > 0) == "hi there new"
    stalled = {**files, "synthesis": paced_checkpoint(tmp_path / "stalled.pt", files, 1e-13)}
    hand.unlink()
    assert run(stalled, "synthesis", tmp_path / out, "--text", "hi there", "--save-hand", str(hand), "--retries", "0") == 1
    assert "did not finish its text, so it was not saved as a hand" in capsys.readouterr().err and not hand.exists()


def test_prediction_primed_with_a_style(files, tmp_path, spy):
    assert run(files, "prediction", tmp_path / "p.svg", "--style", "0", "--num-samples", "2") == 0
    assert spy[0]["batch_size"] == 2 and spy[0]["steps"] == 60 and spy[0]["prime"] is not None


def test_prime_file_scale_and_direction_do_not_matter(files):
    """Strokes in screen coordinates at any scale give the same offsets (brought to the reference size)."""
    a = utils.load_prime_file(files["prime"], files["styles"])[1]
    big = files["dir"] / "big.json"
    big.write_text(json.dumps({"text": "my notes", "y_up": True,
                               "strokes": [(s * [3, -3] + 500).tolist() for s in loops("my notes")]}))
    b = utils.load_prime_file(str(big), files["styles"])[1]
    assert a.shape == b.shape and np.allclose(a, b, atol=1e-6)
    assert a[0, :2].tolist() == [0, 0] and a[:, 2].sum() == 7                 # one stroke per letter
    height = np.ptp(np.percentile(np.cumsum(a[:, 1]), [5, 95]))
    assert abs(height - 80.0) < 8                                             # the styles file's reference height


@pytest.mark.parametrize("view", ["plain", "strokes", "eos", "density"])
def test_views_and_attention(files, tmp_path, view, monkeypatch):
    out, att = tmp_path / f"{view}.png", tmp_path / "att.png"
    assert run(files, "synthesis", out, "--view", view, "--plot-attention", str(att), "--text", "ab\ncd") == 0
    assert out.stat().st_size > 500 and att.stat().st_size > 500
    assert run(files, "synthesis", tmp_path / f"{view}.svg", "--view", view) == 0
    ET.parse(tmp_path / f"{view}.svg")
    # blank rows (an empty line, the gap between samples) and a priming line do not shift the views' rows
    paired, density_map = [], generate.density_map
    monkeypatch.setattr(generate, "density_map", lambda page, results, rows, *a: paired.append(list(rows))
                        or density_map(page, results, rows, *a))
    assert run(files, "synthesis", out, "--view", view, "--text", "ab\n\ncd e", "--num-samples", "2",
               "--style", "0", "--show-prime") == 0
    assert paired == ([[0, 1, 2, 3]] if view == "density" else [])        # the drawn lines' batch rows, in order


def test_show_prime_draws_the_priming_line_once_per_sample(files, tmp_path, monkeypatch):
    """--show-prime: the grey priming line before the first line of each sample, not before every line of a letter."""
    pages, original = [], utils.layout_page
    monkeypatch.setattr(utils, "layout_page", lambda *a, **k: pages.append(a[0]) or original(*a, **k))
    assert run(files, "synthesis", tmp_path / "p.png", "--text", "ab\n\ncd\ne", "--num-samples", "2", "--style", "0",
               "--show-prime") == 0
    primed = len(utils.load_style(files["styles"], 0)[1])
    assert [None if ln is None else ln.start for ln in pages[0]] == [primed, None, 0, 0, None, primed, None, 0, 0]
    pages.clear()                                              # a text of two pages: on page 1 only
    assert run(files, "synthesis", tmp_path / "q.png", "--text", "\n".join(["ab"] * 45), "--style", "0",
               "--show-prime") == 0
    assert len(pages) == 2 and [ln.start for ln in pages[0]][:2] == [primed, 0] and pages[1][0].start == 0


def test_unfinished_line_is_reported(files, tmp_path, capsys):
    assert run(files, "synthesis", tmp_path / "x.png", "--text", "abc\ndefgh", "--max-steps-per-char", "1") == 0
    err = capsys.readouterr().err
    assert "line 1" in err and "line 2" in err and "did not reach the end of its text" in err and "--bias" in err
    assert "in 3 attempt(s)" in err                                          # --retries 2 by default
    assert run(files, "synthesis", tmp_path / "x.png", "--text", "abc", "--max-steps-per-char", "1", "--retries", "0") == 0
    assert "in 1 attempt(s)" in capsys.readouterr().err


def test_a_text_file_from_a_windows_editor(files, tmp_path, spy):
    """A byte-order mark and CRLF line ends (Notepad's UTF-8) are not text to write; a prime or styles file edited
    there (a byte-order mark before the JSON) loads too."""
    (tmp_path / "bom.txt").write_bytes("\ufeffthe hat\r\nsand\r\n".encode("utf-8"))
    assert run(files, "synthesis", tmp_path / "b.png", "--text-file", str(tmp_path / "bom.txt")) == 0
    assert ["".join(CHARS[i - 1] for i in row if i > 0) for row in spy[0]["text"].tolist()] == ["the hat", "sand"]
    for name in ("prime", "styles"):
        (tmp_path / f"{name}.json").write_bytes(b"\xef\xbb\xbf" + Path(files[name]).read_bytes().replace(b"\n", b"\r\n"))
    assert run(files, "synthesis", tmp_path / "p.png", "--prime-file", str(tmp_path / "prime.json")) == 0
    assert run(files, "synthesis", tmp_path / "s.png", "--styles", str(tmp_path / "styles.json"), "--style", "0") == 0


def errors(files, tmp_path):
    d = files["dir"]
    (d / "bad.json").write_text("{not json")
    (d / "shape.json").write_text(json.dumps({"text": "ab", "strokes": "nope"}))
    (d / "foreign.pt").write_text("not a checkpoint")
    (d / "empty.txt").write_text("\n  \n")
    (d / "yup.json").write_text(json.dumps({"text": "ab", "strokes": [s.tolist() for s in loops("ab")], "y_up": "yes"}))
    (d / "euro.json").write_text(json.dumps({"text": "\u20ac5", "strokes": [s.tolist() for s in loops("ab")]}))
    torch.save({"weights": torch.zeros(3)}, d / "dict.pt")
    np.savez(d / "prepared.npz", split=np.zeros(1), alphabet=np.array("ab"))          # prepare_data.py's keys
    good = torch.load(files["synthesis"], weights_only=True)
    damaged = {"nan": {"model": {k: v * float("nan") if k == "mdn.bias" else v for k, v in good["model"].items()}},
               "std0": {"std": [0.0, 0.0]}, "meanabc": {"mean": "abc"}, "stdinf": {"std": [1.0, float("inf")]},
               "repeat": {"alphabet": good["alphabet"][:-1] + good["alphabet"][0]}, "short": {"alphabet": "ab"}}
    for name, change in damaged.items():
        torch.save({**good, **change}, d / f"{name}.pt")
    torch.save({"recognizer_config": {}, "model": {}}, d / "rec.pt")
    torch.save({**good, "model": {k: v for k, v in good["model"].items() if k != "mdn.bias"}}, d / "missing.pt")
    style = {"text": "ab", "offsets": to_offsets(loops("ab")).tolist()}
    (d / "text5.json").write_text(json.dumps({"styles": [{**style, "text": 5}]}))
    (d / "nan.json").write_text(json.dumps({"styles": [{**style, "offsets": [[0, 0, 0], [1, float("nan"), 1]]}]}))
    (d / "ref0.json").write_text(json.dumps({"reference": {"height": 0, "step": 0}, "styles": [style]}))
    (d / "huge.json").write_text(json.dumps({"text": "ab", "strokes": [[[0, 0], [1, 1e308], [2, -1e308]]]}))
    (d / "wide.json").write_text(json.dumps({"text": "ab", "strokes": [[[0, 0], [1e200, 1], [2, -1]]]}))
    (d / "sparse.json").write_text(json.dumps({"text": "a text of many words", "strokes": [[[0, 0], [10, 5], [20, 0]]]}))
    syn = ["--checkpoint", files["synthesis"]]
    styled = lambda args: args + ["--styles", files["styles"]] if ("--style" in args or "--prime-file" in args) \
        and "--styles" not in args else args
    return [(styled(args), message) for args, message in [
        (syn + ["--text", "h\u00e9llo \u20ac"], "not in the model's alphabet: '\u00e9' '\u20ac'"),
        (syn + ["--text", "   \n  "], "the text is empty"),
        (syn + ["--text", "\u20ac", "--drop-unknown"], "the text is empty"),
        (syn + ["--text", " ".join(["words"] * 400), "--num-samples", "2"], "at most 40 fit: write fewer samples"),
        (syn + ["--text", " ".join(["words"] * 400), "--num-samples", "2"], "or --out FILE.npz"),
        (syn + ["--text", " ".join(["words"] * 3000)], "would fill 13 pages of 40 lines (500 lines"),
        (syn + ["--text", " ".join(["words"] * 3000)], "at most 10: split it into several runs, or write --out FILE.npz"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--view", "eos"], "--view is for pictures"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--show-prime"], "--show-prime is for pictures"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--align", "right"], "--align is for pictures"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--line-height", "50"], "--line-height is for pictures"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--color", "black"], "--color is for pictures"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--retries", "0"],
         "--retries is for --task synthesis (writing a text)"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--drop-unknown"], "--drop-unknown is for --task"),
        (syn + ["--text", "ab", "--save-hand", ""], "--save-hand"),
        (syn + ["--text", "ab", "--out", str(tmp_path / ("x" * 300 + ".png"))], "cannot be written"),   # name too long
        (syn + ["--text", "ab", "--prime-file", files["prime"], "--save-hand", files["prime"]], "is a file this run reads"),
        (syn + ["--text", "ab", "--style", "0", "--save-hand", files["styles"]], "is a file this run reads"),
        (syn + ["--text", "ab", "--save-hand", files["styles"]], "exists and is a styles file, not to be written over"),
        (syn + ["--text", "ab", "--out", str(d / "prepared.npz")], "is a prepared IAM-OnDB file (prepare_data.py)"),
        (syn + ["--text", "ab", "--save-strokes", str(d / "prepared.npz")], "is a prepared IAM-OnDB file"),
        (syn + ["--text", "ab", "--save-hand", str(tmp_path / "h.png")], "--save-hand"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--save-hand", str(tmp_path / "h.json")],
         "--save-hand needs --task synthesis"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.npz"), "--num-samples", "100001"], "between 1 and 100000"),
        (syn + ["--text", "ab", "--batch-size", "0"], "--batch-size must be between 1 and 4096"),
        (syn + ["--text", "ab", "--num-samples", "41"], "--num-samples must be between"),
        (syn + ["--text", "ab", "--max-chars-per-line", "200"], "--max-chars-per-line must be between"),
        (syn + ["--text-file", str(d / "none.txt")], "cannot read --text-file"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "none.pt")], "does not exist"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "foreign.pt")], "foreign.pt"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "dict.pt")], "not a handwriting checkpoint"),
        (syn[2:] + ["--text", "ab", "--checkpoint", files["prediction"]], "is a prediction model, not synthesis"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "nan.pt")], "weights are not finite (mdn.bias): the run"),
        *((syn[2:] + ["--text", "ab", "--checkpoint", str(d / f"{name}.pt")], "normalisation is damaged")
          for name in ("std0", "meanabc", "stdinf")),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "repeat.pt")], "alphabet is damaged"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "short.pt")], "its alphabet has 2 characters but"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "rec.pt")], "rec.pt is a recognizer checkpoint (recognizer.py)"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d / "missing.pt")], 'Missing key(s) in state_dict: "mdn.bias"'),
        (syn + ["--text", "ab", "--bias", "1e308"], "--bias must be between 0 (unbiased) and 100"),
        (syn + ["--text", "ab", "--threads", "100000"], "--threads must be between 1 and"),
        (["--task", "prediction", "--checkpoint", files["synthesis"]], "is a synthesis model, not prediction"),
        (syn + ["--text", "ab", "--prime-file", str(d / "bad.json")], "is not valid JSON"),
        (syn + ["--text", "ab", "--prime-file", str(d / "shape.json")], "must hold"),
        (syn + ["--text", "ab", "--prime-file", str(d / "none.json")], "does not exist"),
        (syn + ["--text", "ab", "--style", "2"], "--style 2 does not exist"),
        (syn[:2] + ["--text", "ab", "--style", "0", "--styles", str(d / "none.json")], "none.json does not exist"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "no" / "x.png")], "does not exist; create it"),
        (syn + ["--text", "ab", "--out", str(Path(files["prime"]) / "x.png")], "is a file, not a folder"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "x.jpg")], "unsupported extension '.jpg'"),
        (syn + ["--text", "ab", "--plot-attention", str(tmp_path / "a.gif")], "unsupported extension '.gif'"),
        (syn + ["--text", "ab", "--color", "sparkly"], "is not a colour"),
        (syn + ["--text", "ab", "--bias", "-1"], "--bias must be between 0"),
        (syn + ["--text", "ab", "--retries", "-1"], "--retries must be between 0 and 20"),
        (syn + ["--text", "ab", "--retries", "1000"], "--retries must be between 0 and 20"),
        (syn + ["--text", "ab", "--max-steps-per-char", "100000"], "--max-steps-per-char must be between 1 and 200"),
        (syn + ["--text", "ab", "--out", "x.npz", "--batch-size", "100000"], "--batch-size must be between 1 and 4096"),
        (syn + ["--text", "ab", "--retry-above", "-1"], "--retry-above must be >= 0"),
        (syn + ["--text", "ab", "--pick-with", "r.pt"], "give --candidates 2 or more"),
        (syn + ["--text", "ab", "--retries", "0", "--retry-above", "10"], "and --retries is 0: drop one of them"),
        (syn + ["--text", "ab", "--batch-size", "4"], "--batch-size is for --out FILE.npz; a page"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--batch-size", "4"], "--batch-size is for --out"),
        (syn + ["--text", "ab", "--device", "nonsense"], "--device nonsense is not a device"),
        (syn + ["--text", "ab", "--device", "meta"], "--device meta holds shapes, not numbers"),
        (syn + ["--text", "ab", "--view", "strokes", "--color", "red"], "--view strokes colours the ink itself"),
        (syn + ["--text", "ab", "--view", "eos", "--color", "black"], "--view eos colours the ink itself"),
        (syn + [], "nothing to write"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--text", "ab"], "are for --task synthesis"),
        (["--task", "prediction", "--checkpoint", files["prediction"], "--steps", "0"], "--steps must be between"),
        (syn + ["--text", "ab", "--steps", "50"], "--steps is for --task prediction"),
        (syn + ["--text", "ab", "--show-prime"], "--show-prime draws the priming line: give --style N"),
        (syn + ["--text", "ab\ncd", "--num-samples", "15"], "44 lines (2 line(s) x 15 samples at 40 characters per "
                                                               "line, a blank line between samples)"),
        (syn + ["--text", "ab", "--num-samples", "21"], "--num-samples must be between 1 and 20 for a page"),
        (syn + ["--text", "ab", "--style", "0", "--styles", str(d / "text5.json")], "style 0 is not a text with finite"),
        (syn + ["--text", "ab", "--style", "0", "--styles", str(d / "nan.json")], "style 0 is not a text with finite"),
        (syn + ["--text", "ab", "--prime-file", files["prime"], "--styles", str(d / "ref0.json")],
         "'reference' must be"),
        (syn + ["--text", "ab", "--prime-file", str(d / "huge.json")], "the coordinates are too large"),
        (syn + ["--text", "ab", "--prime-file", str(d / "wide.json")], "times as wide as high; give one line"),
        (syn + ["--text", "ab", "--prime-file", str(d / "sparse.json")], "points for 20 characters of text, too few"),
        (syn + ["--text", "ab", "--out", str(tmp_path / "s.png"), "--plot-attention", str(tmp_path / "s.png")],
         "is where the handwriting goes"),
        (syn + ["--text", "\n".join(["ab"] * 41), "--out", str(tmp_path / "s.png"), "--plot-attention",
                str(tmp_path / "s-2.png")], "is where the handwriting goes"),                  # page 2's file
        (syn + ["--text", "ab", "--color", "#ff000080"], "is see-through"),
        (syn + ["--text", "ab", "--num-samples", "41"], "for a page (or write --out FILE.npz"),
        (syn[2:] + ["--text", "ab", "--checkpoint", str(d)], "is a folder; pass a .pt file in it"),
        (syn + ["--text", "ab", "--out", str(d)], "is a folder; give a file name, e.g."),
        (syn + ["--text-file", str(d / "empty.txt")], f"--text-file {d / 'empty.txt'} is empty"),
        (syn + ["--text", "ab", "--prime-file", str(d / "yup.json")], '"y_up" must be true or false'),
        (syn + ["--text", "ab", "--prime-file", str(d / "euro.json")], "'\u20ac'; edit the prime file's \"text\""),
        (syn + ["--text", "ab", "--styles", files["styles"]], "--styles holds the styles of --style N"),
        (syn + ["--text", "ab", "--prime-file", files["prime"], "--styles", str(d / "none.json")],
         f"--styles {d / 'none.json'} does not exist"),
    ]]


def test_every_error_is_one_line(files, tmp_path, capsys):
    for args, message in errors(files, tmp_path):
        assert generate.main(args + ["--out", str(tmp_path / "e.png")] if "--out" not in args else args) == 1, args
        out, err = capsys.readouterr()
        assert message in err and err.count("\n") == 1 and err.startswith("generate.py: error:"), (args, err)
    assert not list(tmp_path.glob("e.png*"))


def test_a_write_that_fails_late_is_one_line_naming_the_users_path(files, tmp_path, monkeypatch, capsys):
    """A disk that fills up while writing (after the checks up front): one line naming --out, not its temp file."""
    from PIL import Image

    def full(image, path, **kwargs):
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(Image.Image, "save", full)
    assert run(files, "synthesis", tmp_path / "x.png") == 1
    last = capsys.readouterr().err.splitlines()[-1]          # after any warning about the lines themselves
    assert last == f"generate.py: error: cannot write {tmp_path / 'x.png'}: No space left on device"


def test_missing_default_checkpoint_says_how_to_get_one(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "DEFAULT_CHECKPOINTS", {"synthesis": str(tmp_path / "none.pt")})
    assert generate.main(["--text", "ab", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "train one with `python train.py --task synthesis`" in err and "--checkpoint" in err


@pytest.mark.parametrize("args, code, message", [
    (["--text", "ab\u00e9"], 1, "pass --drop-unknown"),
    (["--text", "ab", "--out", "no/such/folder/x.png"], 1, "the folder no/such/folder does not exist"),
    (["--text", "ab", "--view", "fancy"], 2, "invalid choice: 'fancy'"),
    (["--text", "ab", "--seed", "99999999999999999999"], 2, "expected an integer >= 0 and < 9223372036854775808"),
])
def test_command_line_exit_codes(files, args, code, message):
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", files["synthesis"], *args],
                          capture_output=True, text=True, cwd=files["dir"], timeout=120)
    assert proc.returncode == code and message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("name, task, hidden", [("synthesis.pt", "synthesis", 256), ("synthesis_h100.pt", "synthesis", 400),
                                                ("synthesis_h100_ft.pt", "synthesis", 400),
                                                ("prediction.pt", "prediction", 400)])
def test_shipped_checkpoints_load_plainly_and_write(name, task, hidden, tmp_path):
    """Every shipped model: weights only, float16, under 16 MB, loadable with weights_only=True, the size
    checkpoints/README.md gives, and generate.py writes with it."""
    path = ROOT / "checkpoints" / name
    ckpt = torch.load(path, weights_only=True)
    assert path.stat().st_size < 16e6 and "optimizer" not in ckpt
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values())
    assert ckpt["model_config"]["task"] == task and ckpt["model_config"]["hidden_size"] == hidden
    what = ["--text", "hi"] if task == "synthesis" else ["--task", "prediction", "--steps", "40"]
    assert generate.main(["--checkpoint", str(path), *what, "--seed", "1", "--out", str(tmp_path / "x.png")]) == 0


def test_shipped_styles():
    path = ROOT / "data" / "styles.json"
    if not path.exists():
        pytest.skip("data/styles.json not made yet (utils.make_styles)")
    styles = json.loads(path.read_text())["styles"]
    assert len(styles) >= 8 and len({s["writer"] for s in styles}) == len(styles)
    for s in styles:
        off = np.asarray(s["offsets"])
        assert off.shape[1] == 3 and off[0, :2].tolist() == [0, 0] and off[-1, 2] == 1 and s["text"]
    assert (ROOT / "docs" / "styles.png").exists()


def test_density_map_follows_each_drawn_line_past_blank_rows():
    """density_map pairs page lines with batch rows: a blank row between them must not shift the pairing."""
    g = torch.Generator().manual_seed(0)
    offsets = [torch.randn(n, 3, generator=g).numpy() * [20, 5, 0] + [30, 0, 0] for n in (9, 9)]
    lines = [utils.PageLine(offsets[0]), None, utils.PageLine(offsets[1])]
    page = utils.layout_page(lines, line_height=60, margin=10)
    results = {"lengths": torch.tensor([9, 9]), "mixture": torch.randn(2, 9, 1 + 6 * 2, generator=g)}
    heat = generate.density_map(page, results, [0, 1], np.zeros(2), np.full(2, 20.0), 0.0, (page.height, page.width))
    assert heat.shape == (page.height, page.width)
    box = lambda ln: (slice(max(int(ln.xy[:, 1].min()) - 3, 0), int(ln.xy[:, 1].max()) + 4),
                      slice(max(int(ln.xy[:, 0].min()) - 3, 0), int(ln.xy[:, 0].max()) + 4))
    for ln in (lines[0], lines[2]):                               # density around both lines' pens
        assert heat[box(ln)].sum() > 0
    # each line's density is its own row's: paired with the other row, it changes
    for rows, ln in (([0, 0], lines[2]), ([1, 1], lines[0])):
        other = generate.density_map(page, results, rows, np.zeros(2), np.full(2, 20.0), 0.0, (page.height, page.width))
        assert not np.allclose(heat[box(ln)], other[box(ln)])


def test_the_size_of_the_writing_does_not_depend_on_the_text():
    """Rows are at least a typical IAM-OnDB line apart (1.4 x its 5-95 % height): a line without tall letters, or a
    dash, is drawn at the size it is written at beside any other, not blown up to fill the row; a line taller than
    that still gets a row of its own height (no overlap)."""
    def zigzag(n, height):                                  # n points, y alternating over `height` board units
        off = np.zeros((n, 3))
        off[:, 0], off[1:, 1] = 15.0, height * (-1.0) ** np.arange(1, n)
        return off
    ref, line_height = utils.PRIME_REFERENCE["height"], 100
    flat, dash, tall = zigzag(30, 0.4 * ref), zigzag(4, 0.0), zigzag(30, 2 * ref)
    alone = utils.layout_page([utils.PageLine(flat)], line_height=line_height)
    assert alone.scale == pytest.approx(line_height / (1.4 * ref))
    for others in ([dash], [flat * [1, 0.5, 1]]):
        assert utils.layout_page([utils.PageLine(o) for o in [flat, *others]], line_height=line_height).scale == alone.scale
    assert utils.layout_page([utils.PageLine(dash)], line_height=line_height).scale == alone.scale
    both = utils.layout_page([utils.PageLine(flat), utils.PageLine(tall)], line_height=line_height)
    assert both.scale == pytest.approx(line_height / (1.4 * 2 * ref))


def test_align_centres_or_right_aligns_each_row_on_the_widest(files, tmp_path, monkeypatch):
    """--align center / right: every row's ink has the same middle / right edge as the widest row's, at the same
    height and scale as left-aligned; blank rows stay blank."""
    g = torch.Generator().manual_seed(0)
    lines = [torch.randn(n, 3, generator=g).numpy() * [20, 5, 0] + [30, 0, 0] for n in (5, 12, 8)]
    pages = {a: utils.layout_page([utils.PageLine(lines[0]), None, utils.PageLine(lines[1]), utils.PageLine(lines[2])],
                                  align=a) for a in utils.ALIGNS}
    for align, page in pages.items():
        ink = [ln.xy for ln in page.lines if ln is not None]
        left, right = [xy[:, 0].min() for xy in ink], [xy[:, 0].max() for xy in ink]
        edge = {"left": left, "center": [(a + b) / 2 for a, b in zip(left, right)], "right": right}[align]
        assert np.ptp(edge) < 1e-6 and page.lines[1] is None, align
        assert (page.width, page.height, page.scale) == (pages["left"].width, pages["left"].height, pages["left"].scale)
        for ln, base in zip(page.lines, pages["left"].lines):   # moved sideways only
            if ln is not None:
                np.testing.assert_allclose(ln.xy - ln.xy[0], base.xy - base.xy[0], atol=1e-9)
                assert ln.xy[0, 1] == pytest.approx(base.xy[0, 1])
    with pytest.raises(ValueError, match="align must be one of left, center, right"):
        utils.layout_page([utils.PageLine(lines[0])], align="middle")
    laid = []
    original = utils.layout_page
    monkeypatch.setattr(utils, "layout_page", lambda *a, **k: laid.append(k["align"]) or original(*a, **k))
    assert run(files, "synthesis", tmp_path / "card.svg", "--text", "ab\nabab", "--align", "center") == 0
    assert laid == ["center"] and (tmp_path / "card.svg").exists()


def test_the_readme_python_example_runs(tmp_path):
    """README, Generating handwriting, *From Python*: the block as written, with the shipped model, from the repo root
    (the picture goes to tmp_path)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("### From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    out = tmp_path / "from_python.png"
    code = block.replace('"from_python.png"', repr(str(out)))
    assert code != block
    code += "\nassert len(lines) == 2 and all(x.shape[1] == 3 and len(x) == n for x, n in zip(lines, steps))"
    code += "\nassert len(strokes) > 1 and strokes[0].shape[1] == 2 and all(a >= 1 for a in attempts)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[0] > 50


@pytest.mark.parametrize("texts, kwargs, error, words", [
    ("hi there", {}, TypeError, "list of strings"),
    (["hi", ""], {}, ValueError, "texts[1] is empty"),
    (["hi", "a na\u00efve line"], {"batch_size": 1}, ValueError, "texts[1] has characters not in"),
    (["hi"], {"batch_size": 0}, ValueError, "batch_size"),
    (["hi"], {"bias": -1.0}, ValueError, "bias"),
    (["hi"], {"bias": float("nan")}, ValueError, "bias"),
    (["hi"], {"retries": -1}, ValueError, "retries"),
    (["hi"], {"retry_above": -5}, ValueError, "retry_above"),
    (["hi"], {"retry_above": 20}, ValueError, "retry_above chooses the lines that retries samples again, and retries is 0"),
    (["hi"], {"score": lambda strokes, lengths, text: lengths}, ValueError, "give candidates > 1 too, or drop score"),
    (["hi"], {"max_steps_per_char": 2.5}, ValueError, "max_steps_per_char"),
    (["hi"], {"generator": 0}, TypeError, "torch.Generator"),
    (["he hat hi"], {"prime": torch.zeros(4, 3), "prime_chars": 20}, ValueError, "prime_chars"),
    (["he hat hi"], {"prime": np.zeros((4, 3)), "prime_chars": 7}, TypeError, "dataset.prime_strokes"),
])
def test_write_lines_checks_its_arguments_before_sampling(files, monkeypatch, texts, kwargs, error, words):
    """The Python API refuses what generate.py's flags refuse, naming the argument, before any line is sampled."""
    import re
    from dataset import Alphabet
    sampled = []
    original = model_module.HandwritingModel._sample
    monkeypatch.setattr(model_module.HandwritingModel, "_sample", lambda *a: sampled.append(1) or original(*a))
    model, ckpt = model_module.load_model(files["synthesis"])
    with pytest.raises(error, match=re.escape(words)):
        model_module.write_lines(model, texts, Alphabet(ckpt["alphabet"]), (ckpt["mean"], ckpt["std"]),
                                 **{"max_steps_per_char": 6, **kwargs})
    assert not sampled


def test_sample_and_load_refuse_what_they_cannot_use(files):
    from dataset import Alphabet
    model, ckpt = model_module.load_model(files["synthesis"])
    with pytest.raises(ValueError, match="model's"):                         # another alphabet than the model's
        model_module.write_lines(model, ["hi"], Alphabet(CHARS + "\u00e9"), (ckpt["mean"], ckpt["std"]))
    with pytest.raises(TypeError, match=r"\(B, U\) LongTensor"):             # 1-D text
        model.sample(Alphabet(CHARS).encode("hi"))
    for ids in ([[1, len(CHARS) + 1]], [[1, -3]]):                           # not the model's character ids
        with pytest.raises(ValueError, match=f"text holds ids outside 0..{len(CHARS)}"):
            model.sample(torch.tensor(ids))
    with pytest.raises(ValueError, match="a row of text has no characters"):
        model.sample(torch.tensor([[3, 4], [0, 0]]))
    with pytest.raises(ValueError, match=r"padding \(0\) before a character"):    # positions count from the row's start
        model.sample(torch.tensor([[3, 4, 5], [0, 3, 4]]))
    with pytest.raises(ValueError, match="batch_size is for the prediction model"):   # it would write 1 line, not 4
        model.sample(torch.tensor([[3, 4]]), batch_size=4)
    predictor = model_module.load_model(files["prediction"])[0]
    with pytest.raises(ValueError, match="steps=N"):
        predictor.sample()
    with pytest.raises(ValueError, match="retries is for the synthesis model"):
        predictor.sample(steps=5, retries=2)
    with pytest.raises(ValueError, match="prime_chars is for the synthesis model"):
        predictor.sample(steps=5, prime=torch.zeros(4, 3), prime_chars=2)
    with pytest.raises(ValueError, match="float32"):
        model.half().sample(Alphabet(CHARS).encode("hi")[None])
    newer = dict(torch.load(files["synthesis"], weights_only=True))
    newer["model_config"] = {**newer["model_config"], "layer_norm": True}
    with pytest.raises(ValueError, match="layer_norm.*newer version"):
        model_module.load_model(newer)
    with pytest.raises(ValueError, match="lacks model_config or model"):
        model_module.load_model({"foo": 1})
    model, norm = model.float(), (ckpt["mean"], ckpt["std"])                # texts: any iterable of strings, read once
    assert len(model_module.write_lines(model, (t for t in ["hi", "ab"]), Alphabet(CHARS), norm, max_steps_per_char=2)[0]) == 2
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        model_module.write_lines(model, 5, Alphabet(CHARS), norm)


def test_write_lines_gives_each_text_its_own_prime(files, monkeypatch):
    """A (len(texts), Tp, 3) prime: row i primes texts[i], though lines are batched by length (they got another text's
    prime); a (1, Tp, 3) one primes every line, in sample() too (it crashed for B > 1)."""
    from dataset import Alphabet
    model, ckpt = model_module.load_model(files["synthesis"])
    alphabet = Alphabet(ckpt["alphabet"])
    texts = ["ab a long second text", "ab hi", "ab the third"]
    prime = torch.zeros(3, 4, 3)
    prime[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0])                             # a mark per row
    paired, original = [], model.sample

    def spy(text=None, prime=None, **k):
        paired.extend(zip(["".join(alphabet.chars[i - 1] for i in row if i > 0) for row in text.tolist()],
                          prime[:, 0, 0].tolist()))
        return original(text=text, prime=prime, **k)
    monkeypatch.setattr(model, "sample", spy)
    model_module.write_lines(model, texts, alphabet, (ckpt["mean"], ckpt["std"]), prime=prime, prime_chars=3,
                             max_steps_per_char=2, batch_size=2)
    assert sorted(paired) == sorted(zip(texts, [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="prime has 2 lines and texts 3"):
        model_module.write_lines(model, texts, alphabet, (ckpt["mean"], ckpt["std"]), prime=prime[:2], prime_chars=3)
    ids = torch.nn.utils.rnn.pad_sequence([alphabet.encode(t) for t in texts], batch_first=True)
    out = original(text=ids, prime=prime[:1], prime_chars=3, max_steps_per_char=2)
    assert out["strokes"].shape[0] == 3
    predictor = model_module.load_model(files["prediction"])[0]
    with pytest.raises(ValueError, match="prime has 2 lines and batch_size is 3"):
        predictor.sample(steps=5, batch_size=3, prime=torch.zeros(2, 4, 3))
    assert predictor.sample(steps=5, batch_size=3, prime=torch.zeros(1, 4, 3))["strokes"].shape[0] == 3


def test_write_lines_warns_of_texts_longer_than_any_line_the_model_saw(files):
    from dataset import Alphabet
    model, ckpt = model_module.load_model(files["synthesis"])
    with pytest.warns(UserWarning, match="longer than 64"):
        model_module.write_lines(model, ["hi " * 22], Alphabet(ckpt["alphabet"]), (ckpt["mean"], ckpt["std"]),
                                 max_steps_per_char=1)


def test_strokes_files_and_pictures_refuse_mismatched_arguments(tmp_path):
    off = to_offsets(loops("ab"))
    with pytest.raises(ValueError, match="2 lines but 1 texts"):
        utils.save_strokes(tmp_path / "a.npz", [off, off], ["a"])
    utils.save_strokes(tmp_path / "b.npz", [off, off], ["a", "b"], line_ids=np.array(["x", "y"]))
    assert utils.load_strokes(tmp_path / "b.npz")[0] == ["x", "y"]
    with pytest.raises(FileNotFoundError):
        utils.load_strokes(tmp_path / "missing.npz")
    page = utils.layout_page([utils.PageLine(off)])
    utils.save_png(page, tmp_path / "navy.png", color="navy")                # a colour name, as --color takes
    with pytest.raises(ValueError, match="view must be one of"):
        utils.save_svg(page, tmp_path / "x.svg", view="nope")


def test_pages_of_one_text_share_one_size_and_no_ink_is_cut(files, tmp_path, monkeypatch, capsys):
    """Every page of a long text is drawn at the same pixels per board unit (a letter keeps its size at a page
    break), round caps of thick ink stay inside the picture, and SVG has no pixel limit (PNG warns when it applies)."""
    pages = []
    original = utils.layout_page
    monkeypatch.setattr(utils, "layout_page", lambda *a, **k: pages.append(original(*a, **k)) or pages[-1])
    text = "\n".join(["ab cd"] * 39 + ["", "", "hat", "sand"])
    assert run(files, "synthesis", tmp_path / "p.png", "--text", text, "--max-steps-per-char", "3") == 0
    assert len(pages) == 2 and pages[0].scale == pages[1].scale
    for k, name in enumerate(["p-1.png", "p-2.png"]):
        import matplotlib.image
        assert matplotlib.image.imread(tmp_path / name).shape[:2] == (pages[k].height, pages[k].width)
    assert run(files, "synthesis", tmp_path / "thick.png", "--line-height", "30", "--stroke-width", "20") == 0
    import matplotlib.image
    im = matplotlib.image.imread(tmp_path / "thick.png")[..., :3]
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
    assert (border > 0.99).all()                                         # white all round
    monkeypatch.setattr(generate, "MAX_SIDE", 1000)
    capsys.readouterr()
    assert run(files, "synthesis", tmp_path / "big.svg", "--line-height", "1000") == 0
    assert float(ET.parse(tmp_path / "big.svg").getroot().get("width")) > 1000 and "wider than" not in capsys.readouterr().err
    assert run(files, "synthesis", tmp_path / "big.png", "--line-height", "1000") == 0
    assert "big.png would be over 1,000 pixels a side" in capsys.readouterr().err
    assert run(files, "synthesis", tmp_path / "dense.svg", "--line-height", "1000", "--view", "density") == 0
    assert "(lower it, or write a plain .svg (no --view density), which has no limit)" in capsys.readouterr().err
    assert max(matplotlib.image.imread(tmp_path / "big.png").shape[:2]) <= 1000
    assert run(files, "synthesis", tmp_path / "one.png", "--plot-attention", str(tmp_path / "one-1.png")) == 0   # 1 page
    pages.clear()                                                        # shrunk to fit: still one size for all pages
    assert run(files, "synthesis", tmp_path / "q.png", "--text", text, "--max-steps-per-char", "3",
               "--line-height", "1000") == 0
    assert len(pages) == 4 and (pages[0].shrunk or pages[1].shrunk)     # laid out, then again at the smaller scale
    assert pages[2].scale == pages[3].scale == pytest.approx(min(pages[0].scale, pages[1].scale), rel=1e-12)   # (s p) / p
    assert max(max(matplotlib.image.imread(tmp_path / f"q-{k}.png").shape[:2]) for k in (1, 2)) <= 1000


def test_a_long_word_stays_whole():
    lines, *_ = generate.prepare_lines("Supercalifragilistic is long", CHARS, 10, False)
    assert lines == ["Supercalifragilistic", "is long"]
    lines, *_ = generate.prepare_lines("x" * 70, CHARS, 10, False)       # longer than any line the model saw: cut
    assert [len(ln) for ln in lines] == [64, 6]


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_piped_into_head_ends_quietly(files, tmp_path, unbuffered):
    """`generate.py ... | head -1`: the reader gone, every file is still written, and nothing but warnings is said."""
    import os
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--checkpoint", files["synthesis"], "--text",
                             "ab", *FAST, "--out", str(tmp_path / "x.png"), "--save-strokes", str(tmp_path / "x.npz")],
                            cwd=files["dir"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": unbuffered})
    proc.stdout.close()                                                   # the reader is gone before anything is written
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "Exception" not in err
    assert (tmp_path / "x.png").exists() and (tmp_path / "x.npz").exists()


def test_a_strokes_file_reads_back_whole_for_merging(tmp_path):
    """load_strokes(per_line=True) gives the per-line arrays too, so that files merge without losing them."""
    off = to_offsets(loops("ab"))
    utils.save_strokes(tmp_path / "a.npz", [off, off[:5]], ["ab", "a"], finished=[True, False], attempts=[1, 3])
    ids, texts, lines, extra = utils.load_strokes(tmp_path / "a.npz", per_line=True)
    assert sorted(extra) == ["attempts", "finished"] and extra["attempts"].tolist() == [1, 3]
    utils.save_strokes(tmp_path / "b.npz", lines + lines, texts + texts, [f"{i}" for i in range(4)],
                       **{k: np.concatenate([v, v]) for k, v in extra.items()})
    assert utils.load_strokes(tmp_path / "b.npz", per_line=True)[3]["finished"].tolist() == [True, False] * 2



@pytest.mark.skipif(not shutil.which("node"), reason="needs node to run docs/capture.html's script")
def test_capture_page_saves_a_prime_file_of_the_line_written_on_it(tmp_path):
    """docs/capture.html (write your own prime file in a browser), its script run in node with a fake DOM
    (tests/capture_dom.js): the example line written with pointer events is saved as a file that --prime-file reads
    as that line, though a second finger touched it meanwhile, a right click pressed on it, and a stroke's pointerup
    was lost; it refuses to save without ink or text, and Undo takes back a stroke."""
    html = (ROOT / "docs" / "capture.html").read_text()
    (tmp_path / "capture.js").write_text(html.split("<script>")[1].split("</script>")[0])
    example = ROOT / "docs" / "prime_example.json"
    r = subprocess.run(["node", ROOT / "tests" / "capture_dom.js", tmp_path / "capture.js", example],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["said"][0] == "bad: Write a line of handwriting first."
    assert out["said"][1] == "bad: Type what you wrote first."
    assert out["said"][2].startswith(": Downloading prime.json (23 strokes) to your downloads") and len(out["saved"]) == 1
    assert json.loads(out["pure"]) == {"text": "a b", "strokes": [[[1.3, 2]]]}   # 0.1 px, no empty strokes
    (tmp_path / "prime.json").write_text(json.dumps(out["saved"][0]))
    text, offsets = utils.load_prime_file(tmp_path / "prime.json")
    want_text, want = utils.load_prime_file(example)
    assert text == want_text
    np.testing.assert_array_equal(offsets, want)


@pytest.mark.parametrize("script", ["generate", "evaluate", "train", "recognizer", "bench", "prepare_data"])
def test_ctrl_c_while_a_script_loads_its_libraries_stops_it_without_a_traceback(script):
    """A SIGINT while numpy (and torch) import, before main() installs its handler: the script stops at once, as
    Ctrl-C stops any program, with nothing on stderr (Python's own handler printed a traceback of the imports). The
    signal is sent from an import hook, at the import of numpy, so the test does not race the imports."""
    code = textwrap.dedent(f"""
        import os, runpy, signal, sys
        class Hook:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy":
                    os.kill(os.getpid(), signal.SIGINT)
        sys.meta_path.insert(0, Hook())
        sys.argv = ["{script}.py", "--help"]
        runpy.run_path("{script}.py", run_name="__main__")
        print("not stopped")""")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGINT and r.stdout == "" and r.stderr == "", (r.returncode, r.stderr[-500:])


@pytest.mark.parametrize("script", ["generate", "evaluate", "train", "recognizer", "bench"])
def test_scripts_let_idle_threads_sleep_unless_told_otherwise(script):
    """Every script sets OMP_WAIT_POLICY=PASSIVE before torch loads (spinning OpenMP threads made runs on a busy
    2-core machine 10-40x slower), and leaves a value the environment gives alone."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"import os, sys; import {script}; print(os.environ.get('OMP_WAIT_POLICY'))"
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=env if given is None else {**env, "OMP_WAIT_POLICY": given})
        assert r.returncode == 0 and r.stdout.split() == [want], r.stderr[-500:]


def test_a_prime_file_whose_text_lacks_a_word_its_strokes_write_gives_no_empty_finished_line(tmp_path, capsys):
    """docs/prime_example.json with its last word left out of the text: the window runs past the end of the priming
    text, and past a short new text altogether. The line stops at once: a picture is refused in one line (it crashed
    on an empty page), a strokes file keeps the line with finished = 0 (it said 1), and the recognizer reads it as
    an empty line (it crashed)."""
    import recognizer
    data = json.loads((ROOT / "docs" / "prime_example.json").read_text())
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({**data, "text": data["text"].rsplit(" ", 1)[0]}))
    base = ["--prime-file", str(cut), "--text", "Hi", "--seed", "1"]
    assert generate.main(base + ["--out", str(tmp_path / "a.png")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "characters past the end of their text" in err[0] and "stopped before writing its text" in err[1]
    assert err[-1] == "generate.py: error: nothing to draw: every line stopped before writing (see the warnings above)"
    assert not (tmp_path / "a.png").exists()
    assert generate.main(base + ["--out", str(tmp_path / "a.npz")]) == 0
    _, _, lines, more = utils.load_strokes(tmp_path / "a.npz", per_line=True)
    assert len(lines[0]) < 2 and more["finished"].tolist() == [0]
    capsys.readouterr()
    assert recognizer.main(["read", str(tmp_path / "a.npz")]) == 0
    assert capsys.readouterr().out == "\n"


def test_a_prime_file_whose_text_has_a_word_its_strokes_lack_is_warned_of_once(tmp_path, capsys):
    """The shipped model reads docs/prime_example.json to the end of its text; with a word added to the text the
    window is about 8 characters short of its end when the prime ends, and generate.py says so in one line (every line
    would start with the rest of the text), once for a file written in two batches."""
    example = ROOT / "docs" / "prime_example.json"
    data = json.loads(example.read_text())
    words = data["text"].split()
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**data, "text": " ".join(words[:2] + ["really"] + words[2:])}))
    for prime, out, warned in ((example, "a.png", 0), (extra, "b.png", 1), (extra, "c.npz", 1)):
        more = ["--num-samples", "2", "--batch-size", "1"] if out.endswith(".npz") else []
        assert generate.main(["--prime-file", str(prime), "--text", "hi", "--seed", "3", "--out", str(tmp_path / out),
                              *more]) == 0
        err = capsys.readouterr().err
        assert err.count("generate.py: warning: the priming strokes end") == warned, err


@pytest.mark.parametrize("past, saved, said", [
    (3.0, False, "run 3.0 characters past the end of their text"),   # your own strokes: the text may lack a word
    (3.0, True, None),                                               # a saved hand: how every sampled line ends
    (4.5, True, "the saved hand's window runs 4.5 characters past the end of its text"),
    (-3.0, True, "end 3.0 characters short of the end of their text"),
])
def test_a_saved_hand_is_warned_of_only_when_its_window_runs_far_past(files, tmp_path, monkeypatch, capsys, past, saved,
                                                                        said):
    """A hand saved by --save-hand writes its text, yet read back its window is nearly always past it (2.5-3.9
    characters for 14 of 18 hands: a sampled line ends as the window passes its text), so generate.py and evaluate.py
    say so only beyond SAVED_HAND_PAST (4), where lines misread their first word twice as often, with what to do. The
    same strokes as a prime file of one's own are warned of at WINDOW_MISFIT (2.5). The window is set here."""
    text = "hi there"
    offsets = utils.load_prime_file(files["prime"], files["styles"])[1]
    hand = tmp_path / "hand.json"
    utils.save_prime_file(hand, text, offsets)
    if not saved:
        hand.write_text(json.dumps({**json.loads(hand.read_text()), "data_units": False}))
    monkeypatch.setattr(model_module.HandwritingModel, "window_centre",
                        lambda self, state, positions: torch.full((state.h[0].shape[0],), len(text) + past))
    capsys.readouterr()
    assert run(files, "synthesis", tmp_path / "a.png", "--text", "ab", "--prime-file", str(hand)) == 0
    misfit = [ln for ln in capsys.readouterr().err.splitlines() if "of the end of their text" in ln
              or "past the end of" in ln]                            # (the tiny model's lines may not finish: said too)
    assert misfit == [] if said is None else len(misfit) == 1 and said in misfit[0], misfit
    assert ("save the hand again with another --seed" in "".join(misfit)) == (saved and past > utils.SAVED_HAND_PAST)


def test_relay_warnings_rewords_or_passes_over(capsys):
    """relay_warnings prints the first warning its reword keeps (a passed-over one does not use up the one line)."""
    import warnings
    from model import PrimeMisfitWarning
    with utils.relay_warnings("x.py", PrimeMisfitWarning, utils.saved_hand_misfit):
        for fit in (3.9, 4.2, 5.0):
            warnings.warn(PrimeMisfitWarning(f"raw {fit}", fit))
    assert capsys.readouterr().err.splitlines() == [
        "x.py: warning: the saved hand's window runs 4.2 characters past the end of its text (beyond 4, lines misread "
        "their first word about twice as often): save the hand again with another --seed"]


@pytest.mark.parametrize("past", [3.0, 4.5])
def test_save_hand_warns_of_a_hand_whose_window_runs_far_past(files, tmp_path, monkeypatch, capsys, past):
    """--save-hand reads the hand back, followed by "the", as --prime-file will: beyond SAVED_HAND_PAST characters past
    its text it says to save it again (the window is set here)."""
    seen = []

    def centre(self, state, positions):
        seen.append(positions)
        return torch.full((state.h[0].shape[0],), len("hi there") + past)
    monkeypatch.setattr(model_module.HandwritingModel, "window_centre", centre)
    hand, paced = tmp_path / "hand.json", {**files, "synthesis": paced_checkpoint(tmp_path / "paced.pt", files, 0.25)}
    assert run(paced, "synthesis", tmp_path / "a.png", "--text", "hi there", "--save-hand", str(hand)) == 0
    err = capsys.readouterr().err
    assert hand.exists() and seen == [2 * len("hi there the") + 1]                    # read back once, before "the"
    assert ("runs 4.5 characters past the end of its text" in err and "save it again with another --seed" in err) == (
        past > utils.SAVED_HAND_PAST), err
