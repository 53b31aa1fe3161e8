"""The recognizer (recognition.py, recognizer.py) and evaluate.py --legibility: CTC decoding and error rates exactly, learning
on tiny data, checkpoints, and every command end to end on tiny models (CPU, one thread)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import generate
import recognition
import recognizer
import train
from dataset import Alphabet, HandwritingDataset, collate, denormalize, normalize, prime_strokes
from model import load_model, pick_candidates
from recognition import (Recognizer, RecognizerConfig, ctc_loss, edit_distance, error_rates, greedy_decode, load_recognizer,
                         read_lines, write_and_read)
from utils import load_prime_file, load_strokes, save_prime_file, save_strokes, size_drift

ROOT = Path(__file__).resolve().parents[1]
TINY_REC = ["--conv-channels", "16", "--hidden-size", "16", "--layers", "1", "--batch-size", "8", "--no-progress"]


def one_hot_log_probs(paths, classes=5):
    """(B, T, C) log-probabilities whose argmax follows the given id paths."""
    lp = torch.full((len(paths), max(map(len, paths)), classes), -5.0)
    for b, path in enumerate(paths):
        for t, i in enumerate(path):
            lp[b, t, i] = -0.1
    return lp


def test_greedy_decode_collapses_repeats_then_drops_blanks():
    lp = one_hot_log_probs([[0, 1, 1, 0, 1, 2, 2, 0, 0, 3], [2, 2, 0, 3, 3, 3, 1, 1, 4, 4], [0] * 10])
    frames = torch.tensor([10, 4, 10])                    # the second line ends after 4 frames
    assert greedy_decode(lp, frames) == [[1, 1, 2, 3], [2, 3], []]


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    r = error_rates(["the cat", "dog"], ["the bat", "dog"])
    assert r["cer"] == pytest.approx(1 / 10) and r["wer"] == pytest.approx(1 / 3)
    assert (r["lines"], r["chars"], r["words"]) == (2, 10, 3)
    assert error_rates(["ab"], [""])["cer"] == 1.0 and error_rates(["ab"], ["abcd"])["cer"] == 1.0
    # where the errors fall: lines of one word do not count; an empty reading misses both ends
    r = error_rates(["the cat sat", "a dog", "one", "to be"], ["the cat set", "o dog", "once", ""])
    assert (r["first_word_wrong"], r["last_word_wrong"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    r = error_rates(["the cat sat", "a dog"], ["the cat sat", "a dig"])
    assert (r["first_word_wrong"], r["last_word_wrong"]) == (0, 1 / 2)
    assert error_rates(["one"], ["one"])["last_word_wrong"] is None


def test_size_drift():
    # 13 pen-down steps: the first four of length 2, the last four of length 1 (3-4-5 triangles); the long jump
    # after the pen lifts (a pen-up step) does not count
    down = lambda n, scale: [[3 * scale, 4 * scale, 0]] * n
    line = np.array([[0, 0, 0]] + down(4, 0.4) + down(3, 0.3) + [[0, 0, 1], [500, 0, 0]] + down(1, 0.3) + down(4, 0.2),
                    dtype=np.float32)
    assert size_drift(line) == pytest.approx(0.5)
    assert size_drift(line * np.array([2, 2, 1], dtype=np.float32)) == pytest.approx(0.5)    # not the scale
    assert size_drift(line[:6]) is None                                                   # too short to say


def test_frames_and_padding_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = Recognizer(RecognizerConfig(conv_channels=8, hidden_size=8, layers=2, alphabet_size=6)).eval()
    short, long = torch.randn(37, 3), torch.randn(90, 3)
    x = torch.nn.utils.rnn.pad_sequence([short, long], batch_first=True)
    lp, frames = model(x, torch.tensor([37, 90]))
    alone, f_alone = model(short[None], torch.tensor([37]))
    assert frames.tolist() == [10, 23] and f_alone.tolist() == [10]       # ceil(points / 4)
    assert lp.dtype == torch.float32 and torch.allclose(lp[0, :10], alone[0], atol=1e-5)


def test_ctc_learns_to_read_four_lines(tiny_prepared):
    data = HandwritingDataset(tiny_prepared, "train", max_lines=4)
    batch = collate([data[i] for i in range(4)])
    lengths, target_lengths = batch["stroke_mask"].sum(1), batch["text_mask"].sum(1)
    torch.manual_seed(0)
    model = Recognizer(RecognizerConfig(conv_channels=32, hidden_size=32, layers=1, dropout=0.0,
                                        alphabet_size=len(data.alphabet.chars)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        log_probs, frames = model(batch["strokes"], lengths)
        loss = ctc_loss(log_probs, frames, batch["text"], target_lengths) / target_lengths.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.1 * losses[0]
    assert read_lines(model, [data[i][0] for i in range(4)], data.alphabet) == data.texts


@pytest.fixture(scope="module")
def trained(tiny_prepared, tmp_path_factory):
    """A tiny recognizer run folder and a tiny synthesis checkpoint, both on tiny_prepared."""
    d = tmp_path_factory.mktemp("recognizer")
    recognizer.main(["train", "--data", str(tiny_prepared), "--out", str(d / "rec"), *TINY_REC,
                     "--max-steps", "12", "--eval-interval", "6"])
    train.main(["--data", str(tiny_prepared), "--out", str(d / "syn"), "--hidden-size", "16", "--mixtures", "2",
                "--window-gaussians", "2", "--batch-size", "8", "--tbptt", "25", "--no-progress", "--sample-text", "hat",
                "--max-steps", "2", "--eval-interval", "2"])
    return d


def test_training_writes_self_describing_checkpoints(trained):
    rows = [json.loads(line) for line in open(trained / "rec" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [6, 12] and all(0 <= r["val_cer"] for r in rows)
    assert all(np.isfinite(r["train_loss"]) and r["lines_per_s"] > 0 for r in rows)
    last = torch.load(trained / "rec" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "recognizer_config", "alphabet", "mean", "std", "step", "run", "rng"} <= last.keys()
    assert last["step"] == 12 and last["recognizer_config"]["hidden_size"] == 16
    shipped = torch.load(trained / "rec" / "model.pt", weights_only=True)
    assert "optimizer" not in shipped and all(v.dtype == torch.float16 for v in shipped["model"].values())
    model, ckpt = load_recognizer(str(trained / "rec" / "model.pt"))
    assert isinstance(model, Recognizer) and ckpt["alphabet"] == last["alphabet"]


def test_resume_matches_an_unbroken_run(tiny_prepared, tmp_path, capsys):
    common = ["train", "--data", str(tiny_prepared), *TINY_REC, "--eval-interval", "4", "--max-steps", "8"]
    recognizer.main([*common, "--out", str(tmp_path / "a")])
    recognizer.main([*common[:-1], "4", "--out", str(tmp_path / "b")])
    recognizer.main([*common, "--out", str(tmp_path / "b"), "--resume", "auto"])
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    # at its --max-steps a resumed run does nothing; a size flag that asks for another network is refused (before, the
    # run's network was trained on silently); a training flag given otherwise is named
    before = {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in ("last.pt", "best.pt", "metrics.jsonl")}
    assert recognizer.main([*common, "--out", str(tmp_path / "b"), "--resume", "auto"]) == 0
    assert "already at --max-steps 8 (step 8): nothing to do" in capsys.readouterr().out
    assert before == {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in before}
    with pytest.raises(SystemExit, match=r"network cannot be changed: --hidden-size 32 \(it has 16\); drop the flag"):
        recognizer.main([*common[:-1], "10", "--out", str(tmp_path / "b"), "--resume", "auto", "--hidden-size", "32"])
    recognizer.main(["train", "--data", str(tiny_prepared), "--batch-size", "8", "--no-progress", "--eval-interval", "4",
                     "--max-steps", "10", "--out", str(tmp_path / "b"), "--resume", "auto", "--lr", "0.01"])
    assert "note: flags that differ from the run's: --lr 0.01 (was 0.002), --max-steps 10 (was 8);" in capsys.readouterr().out
    recognizer.main([*common[:-1], "12", "--out", str(tmp_path / "b"), "--resume", "auto", "--eval-lines", "3"])
    assert "best figure reset: the validation CER is measured otherwise now (--eval-lines)" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "best.pt", weights_only=True)["step"] == 12
    # resumed into another folder: its best.pt and model.pt are written there, however the figure compares with the
    # run's best so far (it ended in an error when the CER did not improve)
    recognizer.main([*common[:-1], "14", "--out", str(tmp_path / "c"), "--resume", str(tmp_path / "b" / "last.pt"),
                     "--eval-lines", "3", "--lr", "1e-9"])
    assert f"goes on in {tmp_path / 'c'}: best figure reset" in capsys.readouterr().out
    assert torch.load(tmp_path / "c" / "best.pt", weights_only=True)["step"] == 14 and (tmp_path / "c" / "model.pt").exists()
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["recognizer_config"]["hidden_size"] == 16


def test_read_and_evaluate_commands(trained, tiny_prepared, tmp_path, capsys):
    ckpt = str(trained / "rec" / "model.pt")
    ids, texts, lines = load_strokes(tiny_prepared)
    recognizer.main(["read", f"{tiny_prepared}:{ids[0]}", "--checkpoint", ckpt])
    assert len(capsys.readouterr().out.splitlines()) == 1
    # generated lines: generate.py --save-strokes, then read all of them, and one by its number
    assert generate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--text", "the hat\nsand", "--seed", "1",
                          "--max-steps-per-char", "5", "--out", str(tmp_path / "g.png"),
                          "--save-strokes", str(tmp_path / "g.npz")]) == 0
    g_ids, g_texts, g_lines = load_strokes(tmp_path / "g.npz")
    assert g_ids == ["1", "2"] and g_texts == ["the hat", "sand"] and all(ln.shape[1] == 3 for ln in g_lines)
    capsys.readouterr()
    recognizer.main(["read", str(tmp_path / "g.npz"), f"{tmp_path / 'g.npz'}:2", "--checkpoint", ckpt, "--compare"])
    out = capsys.readouterr().out
    assert out.count("recognised:") == 3 and "text:       sand" in out and "total: CER" in out
    # lines without text (unconditional scribbles): no CER of their own, left out of the total
    save_strokes(tmp_path / "blank.npz", g_lines + g_lines, ["", "", "the hat", "sand"])
    recognizer.main(["read", str(tmp_path / "blank.npz"), "--checkpoint", ckpt, "--compare"])
    out = capsys.readouterr().out
    assert out.count("no text to compare with") == 2 and "over 2 lines (2 without text left out)" in out
    recognizer.main(["evaluate", "--checkpoint", ckpt, "--data", str(tiny_prepared), "--split", "test",
                     "--out", str(tmp_path / "rows.jsonl")])
    result = json.loads(capsys.readouterr().out)
    assert result["lines"] == 5 and 0 <= result["cer"] and 0 <= result["wer"]
    assert len(open(tmp_path / "rows.jsonl").readlines()) == 5


def test_legibility_end_to_end(trained, tiny_prepared, tmp_path, capsys):
    base = ["--checkpoint", str(trained / "syn" / "last.pt"), "--legibility", "--data", str(tiny_prepared),
            "--recognizer", str(trained / "rec" / "model.pt"), "--bias", "1", "--max-steps-per-char", "5",
            "--batch-size", "3"]
    evaluate.main([*base, "--out", str(tmp_path / "a")])
    result = json.loads(capsys.readouterr().out)
    assert {"cer_generated", "cer_real", "finished_fraction", "lines", "bias", "first_word_wrong_generated",
            "last_word_wrong_generated", "last_word_wrong_real"} <= result.keys()
    assert result["lines"] == result["real_lines"] == 5 and result["bias"] == 1.0
    assert 0 <= result["finished_fraction"] <= 1 and result["cer_real"] >= 0
    rows = [json.loads(line) for line in open(tmp_path / "a" / "legibility.jsonl")]
    assert len(rows) == 5 and {"text", "recognised", "cer", "finished", "steps", "real_cer"} <= rows[0].keys()
    assert all(r["steps"] <= 5 * len(r["text"]) + 1 for r in rows)
    assert (tmp_path / "a" / "worst.png").stat().st_size > 0
    assert len(load_strokes(tmp_path / "a" / "generated.npz")[2]) == 5
    # size drift: the generated lines' figure from the strokes file, the real ones' from the data as stored
    drifts = [d for d in map(size_drift, load_strokes(tmp_path / "a" / "generated.npz")[2]) if d is not None]
    assert result["size_drift_generated"] == (pytest.approx(np.mean(drifts), rel=1e-3) if drifts else None)
    test = HandwritingDataset(tiny_prepared, "test")
    real_ids = {r["real_line_id"] for r in rows}
    drifts = [size_drift(test.raw(j)) for j in range(len(test)) if test.line_ids[j] in real_ids]
    assert len(drifts) == 5 and result["size_drift_real"] == pytest.approx(np.mean(drifts))
    with np.load(tmp_path / "a" / "generated.npz") as f:                   # as generate.py's strokes files
        assert list(f["finished"]) == [r["finished"] for r in rows] and list(f["attempts"]) == [r["attempts"] for r in rows]
    # --retries (as generate.py), all lines in one batch: unfinished lines get more tries (that finished ones stay as
    # they were: test_model's test_lines_that_hit_the_cap_are_sampled_again; this tiny model finishes none here)
    one_batch = [*base, "--batch-size", "8"]
    evaluate.main([*one_batch, "--out", str(tmp_path / "r0"), "--retries", "0"])
    first = json.loads(capsys.readouterr().out)
    evaluate.main([*one_batch, "--out", str(tmp_path / "r2"), "--retries", "2"])
    retried = json.loads(capsys.readouterr().out)
    assert retried["retries"] == 2 and retried["finished_fraction"] >= first["finished_fraction"]
    rows0, rows2 = ([json.loads(line) for line in open(tmp_path / d / "legibility.jsonl")] for d in ("r0", "r2"))
    assert [r["attempts"] > 1 for r in rows2] == [not r["finished"] for r in rows0]   # (sample() tests --retry-above)
    assert retried["retry_above"] == 32 and retried["attempts_per_line"] == sum(r["attempts"] for r in rows2) / 5
    # a prompts file: one text with a real test line, one without
    real_text = HandwritingDataset(tiny_prepared, "test").texts[2]
    (tmp_path / "prompts.txt").write_text(f"{real_text}\n\nnot a r\u00e9al  line \u20ac\n", encoding="utf-8")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "worst.png").write_bytes(b"an earlier run's")
    evaluate.main([*base, "--out", str(tmp_path / "b"), "--prompts", str(tmp_path / "prompts.txt"), "--worst", "0"])
    assert not (tmp_path / "b" / "worst.png").exists()                  # --worst 0: no figure, not a stale one
    said = capsys.readouterr()
    result = json.loads(said.out)
    assert result["lines"] == 2 and result["real_lines"] == 1
    left_out = said.err.split("left out ")[-1]
    assert "wrote '\u00e9' as 'e'" in said.err and "'\u20ac'" in left_out and "'\u00e9'" not in left_out
    rows = [json.loads(line) for line in open(tmp_path / "b" / "legibility.jsonl")]
    alphabet = HandwritingDataset(tiny_prepared, "test").alphabet
    assert rows[1]["text"] == alphabet.writable("not a real line")       # as generate.py --drop-unknown writes it
    (tmp_path / "long.txt").write_text("the hat " * 9 + "\n", encoding="utf-8")       # 71 characters: one line said
    evaluate.main([*base, "--out", str(tmp_path / "c"), "--prompts", str(tmp_path / "long.txt")])
    err = capsys.readouterr().err
    assert "evaluate.py: warning: 1 prompt(s) longer than 64 characters" in err and "UserWarning" not in err


def test_legibility_in_a_style(trained, tiny_prepared, tmp_path, capsys, monkeypatch):
    """--style N: every prompt is written after style N's line and text (as generate.py --style N); only the new
    writing is read and scored, and the cap counts the prompt's characters only."""
    import model as model_module
    ids, texts, lines = load_strokes(tiny_prepared)
    style = {"text": texts[0], "writer": "w", "line_id": ids[0], "offsets": lines[0].tolist()}
    (tmp_path / "styles.json").write_text(json.dumps({"styles": [style]}))
    calls, original = [], model_module.HandwritingModel.sample
    monkeypatch.setattr(model_module.HandwritingModel, "sample",
                        lambda self, *a, **kw: calls.append(kw) or original(self, *a, **kw))
    evaluate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--legibility", "--data", str(tiny_prepared),
                   "--recognizer", str(trained / "rec" / "model.pt"), "--max-steps-per-char", "5", "--retries", "0",
                   "--style", "0", "--styles", str(tmp_path / "styles.json"), "--out", str(tmp_path / "s")])
    result = json.loads(capsys.readouterr().out)
    assert result["style"] == 0 and result["lines"] == 5
    alphabet = Alphabet(torch.load(trained / "syn" / "last.pt", weights_only=True)["alphabet"])
    prompts = HandwritingDataset(tiny_prepared, "test").texts
    written = [alphabet.decode([i for i in row.tolist() if i > 0]) for c in calls for row in c["text"]]
    assert sorted(written) == sorted(f"{texts[0]} {p}" for p in prompts)
    assert all(c["prime"].shape == (len(lines[0]) - 1, 3) and c["prime_chars"] == len(texts[0]) + 1 for c in calls)
    rows = [json.loads(line) for line in open(tmp_path / "s" / "legibility.jsonl")]
    assert sorted(r["text"] for r in rows) == sorted(prompts)
    assert all(r["steps"] <= 5 * len(r["text"]) + 1 for r in rows)
    # what is read starts at its own first point, as a real line does (not with the jump from the style's end)
    assert all((x[0, :2] == 0).all() for x in load_strokes(tmp_path / "s" / "generated.npz")[2])
    # --prime-file: your own handwriting, primed as generate.py --prime-file primes it
    points = np.cumsum(lines[0][:, :2], axis=0) * [1, -1]                  # screen coordinates, y down
    ends = np.flatnonzero(lines[0][:, 2]) + 1
    prime = {"text": texts[0], "strokes": [s.tolist() for s in np.split(points, ends[:-1])]}
    (tmp_path / "me.json").write_text(json.dumps(prime))
    calls.clear()
    evaluate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--legibility", "--data", str(tiny_prepared),
                   "--recognizer", str(trained / "rec" / "model.pt"), "--max-steps-per-char", "5", "--retries", "0",
                   "--prime-file", str(tmp_path / "me.json"), "--styles", str(tmp_path / "styles.json"),
                   "--out", str(tmp_path / "p")])
    result = json.loads(capsys.readouterr().out)
    assert result["prime_file"] == str(tmp_path / "me.json") and result["style"] is None and result["lines"] == 5
    ckpt = torch.load(trained / "syn" / "last.pt", weights_only=True)
    expected = prime_strokes(load_prime_file(str(tmp_path / "me.json"), str(tmp_path / "styles.json"))[1],
                             ckpt["mean"], ckpt["std"])
    assert calls and all(torch.allclose(c["prime"], expected) for c in calls)
    # a saved hand (--save-hand) whose window reads 3 characters past its text: nothing said (how sampled lines end);
    # the same strokes as one's own prime file: warned of (generate.py's test covers the other cases)
    import model
    save_prime_file(tmp_path / "hand.json", texts[0], lines[0])
    monkeypatch.setattr(model.HandwritingModel, "window_centre",
                        lambda self, state, positions: torch.full((state.h[0].shape[0],), len(texts[0]) + 3.0))
    for name, warned in (("hand.json", False), ("me.json", True)):
        capsys.readouterr()
        evaluate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--legibility", "--data", str(tiny_prepared),
                       "--recognizer", str(trained / "rec" / "model.pt"), "--max-steps-per-char", "5", "--retries", "0",
                       "--prime-file", str(tmp_path / name), "--styles", str(tmp_path / "styles.json"),
                       "--out", str(tmp_path / "h")])
        assert ("run 3.0 characters past the end of their text" in capsys.readouterr().err) == warned, name


def test_train_checks_legibility_and_selects_best_by_cer(trained, tiny_prepared, tmp_path, capsys):
    rec = str(trained / "rec" / "model.pt")
    train.main(["--data", str(tiny_prepared), "--out", str(tmp_path), "--hidden-size", "16", "--mixtures", "2",
                "--window-gaussians", "2", "--batch-size", "8", "--tbptt", "0", "--no-progress", "--sample-text", "hat",
                "--max-steps", "6", "--eval-interval", "2", "--lr", "3e-3", "--recognizer", rec, "--select-by", "cer",
                "--legibility-lines", "4", "--legibility-bias", "0.5", "--eval-lines", "2"])   # legibility: 4 lines, not 2
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) >= 2 and all(0 <= r["val_cer"] and 0 <= r["val_finished"] <= 1 for r in rows)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["metrics"]["val_cer"] == min(r["val_cer"] for r in rows)              # picked by CER, the first lowest
    assert best["step"] == next(r["step"] for r in rows if r["val_cer"] == best["metrics"]["val_cer"])
    # the figure is the evaluate.py measure: the same texts, seed and bias give the same CER
    syn, ckpt = load_model(str(tmp_path / "last.pt"))
    rmodel, rckpt = load_recognizer(rec)
    data = HandwritingDataset(tiny_prepared, "valid")
    texts = data.texts[:4]
    _, read, finished, *_ = write_and_read(syn, rmodel, texts, data.alphabet, Alphabet(rckpt["alphabet"]),
                                          (ckpt["mean"], ckpt["std"]), (rckpt["mean"], rckpt["std"]), 0.5,
                                          torch.Generator().manual_seed(1337), 8)
    rates = error_rates(texts, read)
    assert rows[-1]["val_cer"] == pytest.approx(rates["cer"])
    assert rows[-1]["val_last_word_wrong"] == rates["last_word_wrong"]
    assert rows[-1]["val_finished"] == pytest.approx(sum(finished) / 4)
    assert (tmp_path / "loss.png").stat().st_size > 0
    # a run chosen by NLL so far, resumed with --select-by cer: a CER is never compared with the best (negative) NLL,
    # so the first evaluation after the resume makes best.pt
    common = ["--data", str(tiny_prepared), "--out", str(tmp_path / "r"), "--no-progress", "--sample-text", "hat",
              "--hidden-size", "16", "--mixtures", "2", "--window-gaussians", "2", "--batch-size", "8", "--eval-interval",
              "2", "--eval-lines", "2"]
    train.main([*common, "--max-steps", "4"])
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    last["run"]["best_val"] = -1000.0                   # a trained model's NLL per line (the tiny one's is still positive)
    torch.save(last, tmp_path / "r" / "last.pt")
    train.main([*common, "--max-steps", "6", "--resume", "auto", "--recognizer", rec, "--select-by", "cer",
                "--legibility-lines", "4"])
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert best["step"] == 6 and best["run"]["best_by"] == "cer" and best["run"]["best_val"] == best["metrics"]["val_cer"]
    # resumed without --select-by, the run goes on choosing by CER (given its recognizer), else says how to go on
    with pytest.raises(SystemExit, match=r"chose best.pt by legibility \(--select-by cer\): pass --recognizer PATH again"):
        train.main([*common, "--max-steps", "8", "--resume", "auto"])
    same_file = os.path.join(os.path.dirname(rec), ".", os.path.basename(rec))   # the run's recognizer, named otherwise
    capsys.readouterr()
    train.main([*common, "--max-steps", "8", "--resume", "auto", "--recognizer", same_file, "--legibility-lines", "4"])
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["run"]["best_by"] == "cer"
    assert "best figure reset" not in capsys.readouterr().out
    # a figure measured on other lines is not compared with best.pt's: the next evaluation replaces it
    train.main([*common, "--max-steps", "10", "--resume", "auto", "--recognizer", rec, "--legibility-lines", "3"])
    out = capsys.readouterr().out
    assert "best figure reset: cer is measured otherwise now (--legibility-lines)" in out
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=True)["step"] == 10
    for args, message in [(["--select-by", "cer"], "needs --recognizer"),
                          (["--task", "prediction", "--recognizer", rec], "--recognizer is for --task synthesis")]:
        r = subprocess.run([sys.executable, "train.py", "--data", str(tiny_prepared), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_missing_files_give_one_line_errors(trained, tiny_prepared, tmp_path, capsys):
    rec, syn = str(trained / "rec" / "model.pt"), str(trained / "syn" / "last.pt")
    in_process = [
        (recognizer.main, ["read", str(tmp_path / "none.npz"), "--checkpoint", rec], "not found"),
        (recognizer.main, ["read", f"{tiny_prepared}:zz-000-99", "--checkpoint", rec], "no line 'zz-000-99'"),
        (recognizer.main, ["read", str(tiny_prepared), "--checkpoint", syn], "is a handwriting checkpoint (train.py); pass a .pt file written by recognizer.py train"),
        (recognizer.main, ["evaluate", "--checkpoint", rec, "--data", str(tmp_path / "nowhere")], "prepare_data.py"),
        (recognizer.main, ["train", "--data", str(tmp_path / "nowhere")], "prepare_data.py"),
        (recognizer.main, ["train", "--data", str(tiny_prepared), "--out", str(trained / "rec"), *TINY_REC],
         "already holds a run"),
        (recognizer.main, ["train", "--data", str(tiny_prepared), "--resume", rec, "--out", str(tmp_path / "r2"),
                           *TINY_REC], "holds weights only (no optimiser state, like model.pt and the shipped files): "
                                       "resume from a run's last.pt"),
        (recognizer.main, ["evaluate", "--checkpoint", rec, "--data", str(tiny_prepared), "--out", str(tmp_path)],
         "is a folder; give a file name, e.g."),
        *((recognizer.main, ["evaluate", "--checkpoint", rec, "--data", str(tiny_prepared), "--out", path], message)
          for path, message in ((str(tiny_prepared), "unsupported extension '.npz'; use .jsonl"),
                                (rec, "unsupported extension '.pt'; use .jsonl"),
                                (str(tmp_path / "no" / "rows.jsonl"), "does not exist; create it"))),
        (evaluate.main, ["--checkpoint", rec, "--legibility", "--data", str(tiny_prepared)], "is a recognizer checkpoint (recognizer.py); pass a .pt file written by train.py"),
        (evaluate.main, ["--checkpoint", syn, "--legibility", "--prompts", str(tmp_path / "none.txt"),
                         "--recognizer", rec, "--data", str(tiny_prepared)], "cannot read --prompts"),
        (evaluate.main, ["--checkpoint", syn, "--legibility", "--recognizer", rec, "--data", str(tiny_prepared),
                         "--style", "-1", "--styles", str(ROOT / "data" / "styles.json")], "does not exist"),
        (evaluate.main, ["--checkpoint", syn, "--legibility", "--recognizer", rec, "--data", str(tiny_prepared),
                         "--prime-file", str(tmp_path / "none.json")], "--prime-file"),
        (recognizer.main, ["read", str(tmp_path / "empty.npz"), "--checkpoint", rec], "no lines in"),
        (evaluate.main, ["--checkpoint", syn, "--legibility", "--recognizer", rec, "--data", str(tiny_prepared),
                         "--prompts", str(tmp_path / "blank.txt")], "has no text lines; give one prompt per line"),
        (evaluate.main, ["--checkpoint", syn, "--legibility", "--recognizer", rec, "--data", str(tiny_prepared),
                         "--out", str(tmp_path / "empty.npz")], "empty.npz is a file; give a folder"),   # before sampling
        (recognizer.main, ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "empty.npz"), *TINY_REC],
         "empty.npz is a file; give a folder"),
        (recognizer.main, ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "k"), "--kernel-size", "4",
                           *TINY_REC], "kernel_size (--kernel-size) must be odd"),
        (recognizer.main, ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "k"), "--dropout", "1.5",
                           *TINY_REC], "dropout (--dropout) is a probability in [0, 1), not 1.5"),
    ]
    for args, message in [(["--style", "0"], "--style is for --legibility"),
                          (["--prime-file", "me.json"], "--prime-file is for --legibility"),
                          (["--bias", "2"], "--bias is for --legibility"),               # was ignored
                          (["--bias", "1"], "--bias is for --legibility"),               # typed, though the default
                          (["--legibility", "--dtype", "float32"], "--dtype is for the NLL"),
                          (["--legibility", "--text-ablation"], "--text-ablation is for the NLL"),
                          (["--legibility", "--per-line", "x.jsonl"], "--per-line is for the NLL"),
                          (["--legibility", "--bias", "1e308"], "expected a number from 0 (unbiased) to 100"),
                          (["--legibility", "--styles", "data/styles.json"], "--styles holds the styles of --style N"),
                          (["--legibility", "--style", "0", "--styles", "none.json"], "--styles none.json does not exist"),
                          (["--legibility", "--pick-with", "r.pt"], "--pick-with ranks the attempts of --candidates K"),
                          (["--legibility", "--retries", "0", "--retry-above", "20"],
                           "--retry-above chooses the lines that --retries samples again")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--checkpoint", syn, "--data", str(tiny_prepared), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    save_strokes(tmp_path / "empty.npz", [], [])
    (tmp_path / "blank.txt").write_text("\n  \n")
    for main, args, message in in_process:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert message in str(e.value) and "\n" not in str(e.value), (args, e.value)
    for args, message in [(["recognizer.py", "read", str(tiny_prepared), "--checkpoint", str(tmp_path / "r.pt")],
                           "recognizer.py train"),
                          (["evaluate.py", "--checkpoint", syn, "--legibility", "--recognizer", str(tmp_path / "r.pt"),
                            "--data", str(tiny_prepared)], "recognizer.py train")]:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_legibility_score_is_each_lines_ctc_loss(trained):
    """recognition.legibility_score on a batch: each line's CTC loss -log p(its text) as the recognizer reads that line
    alone in its own units (padding and batch change nothing); a prime's text is not scored; a line too short for its
    text scores inf (never chosen over a readable one)."""
    syn, ck = load_model(str(trained / "syn" / "last.pt"))
    rec, rck = load_recognizer(str(trained / "rec" / "model.pt"))
    alphabet, rec_alphabet = Alphabet(ck["alphabet"]), Alphabet(rck["alphabet"])
    norm, rec_norm = (ck["mean"], ck["std"]), (np.asarray(rck["mean"], np.float32), np.asarray(rck["std"], np.float32))
    g = torch.Generator().manual_seed(0)
    texts = ["at as", "s a", "at"]
    ids = torch.nn.utils.rnn.pad_sequence([alphabet.encode(t) for t in texts], batch_first=True)
    lengths = torch.tensor([60, 41, 2])                                        # the last: 1 frame for 2 characters
    strokes = torch.randn(3, 60, 3, generator=g)
    strokes[..., 2] = (strokes[..., 2] > 1).float()
    strokes *= (torch.arange(60)[None] < lengths[:, None]).unsqueeze(-1)       # as sample() returns them
    for prime_chars in (0, 2):
        got = recognition.legibility_score(rec, rck, alphabet, norm, prime_chars)(strokes, lengths, ids)
        for b in range(2):
            raw = denormalize(strokes[b, :lengths[b]].double().numpy(), *norm)
            if prime_chars:
                raw[0, :2] = 0
            x = torch.from_numpy(normalize(raw.astype(np.float32), *rec_norm))[None]
            with torch.no_grad():
                log_probs, frames = rec(x, lengths[b:b + 1])
            target = rec_alphabet.encode(texts[b][prime_chars:])[None]
            want = ctc_loss(log_probs, frames, target, torch.tensor([target.shape[1]]), per_line=True)
            assert float(got[b]) == pytest.approx(want.item(), rel=1e-4, abs=1e-4)
        assert got.shape == (3,) and bool(torch.isfinite(got[:2]).all())
        assert got[2] == float("inf") if not prime_chars else torch.isfinite(got[2])   # "at" in 1 frame; "" is fine


def test_candidates_keep_the_best_attempt_of_each_line(trained, tiny_prepared, tmp_path, capsys):
    """sample(candidates=K, score=...) is the K-fold batch sampled as usual, then per line the attempt with the lowest
    score, a finished one before any unfinished one; generate.py and evaluate.py --candidates use the recognizer."""
    syn, ck = load_model(str(trained / "syn" / "last.pt"))
    alphabet = Alphabet(ck["alphabet"])
    text = torch.nn.utils.rnn.pad_sequence([alphabet.encode(t) for t in ("at a", "s", "a t")], batch_first=True)
    K = 4
    kw = dict(bias=0.5, max_steps_per_char=9, retries=0)           # "s" finishes, the others do not
    every = syn.sample(text=text.repeat_interleave(K, 0), generator=torch.Generator().manual_seed(3), **kw)
    calls = []

    def score(strokes, lengths, t):                                             # the longest line wins
        calls.append(t)
        return -lengths.float()
    best = syn.sample(text=text, generator=torch.Generator().manual_seed(3), candidates=K, score=score, **kw)
    assert len(calls) == 1 and torch.equal(calls[0], text.repeat_interleave(K, 0))
    for b in range(3):
        rows = range(b * K, (b + 1) * K)
        done = [r for r in rows if every["finished"][r]] or list(rows)
        r = max(done, key=lambda r: (int(every["lengths"][r]), -r))            # the first of the longest
        n = int(best["lengths"][b])
        assert n == int(every["lengths"][r]) and bool(best["finished"][b]) == bool(every["finished"][r])
        assert torch.equal(best["strokes"][b, :n], every["strokes"][r, :n])
    assert not all(every["finished"]) and any(every["finished"])
    # a finished attempt beats an unfinished one however it scores; with none finished, the best score wins
    result = {"finished": torch.tensor([False, True, True, False, False, False]), "lengths": torch.arange(6),
              "strokes": torch.arange(6.0)[:, None, None].expand(6, 2, 3)}
    picked = pick_candidates(result, None, 3, lambda strokes, lengths, t: torch.tensor([0.0, 5, 2, 1, 3, -1]))
    assert picked["lengths"].tolist() == [2, 5] and picked["strokes"][:, 0, 0].tolist() == [2, 5]
    # retries: a line is written again only when none of its attempts is good (finished within retry_above): "s"
    # has one (8 points), so its lingering ones (9 > 8.5) are not retried, and the longest of them is kept
    kw.update(retries=1, retry_above=8.5)
    alone = syn.sample(text=text.repeat_interleave(K, 0), generator=torch.Generator().manual_seed(3), **kw)
    assert alone["attempts"][K:2 * K].tolist().count(2) >= 1                   # on its own, a lingering one is retried
    again = syn.sample(text=text, generator=torch.Generator().manual_seed(3), candidates=K, score=score, **kw)
    assert again["attempts"].tolist() == [2, 1, 2] and again["lengths"][1] == 9 and bool(again["finished"][1])
    with pytest.raises(TypeError, match="needs score"):
        syn.sample(text=text, candidates=2)
    # the scripts: generate.py picks with --pick-with, evaluate.py says which recognizer picked
    rec = str(trained / "rec" / "model.pt")
    assert generate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--text", "at a", "--candidates", "3",
                          "--pick-with", rec, "--out", str(tmp_path / "c.png"), "--seed", "1"]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0 and "best of 3" in capsys.readouterr().out
    assert generate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--text", "at", "--candidates", "2",
                          "--pick-with", str(tmp_path / "none.pt"), "--out", str(tmp_path / "d.png")]) == 1
    assert "none.pt" in capsys.readouterr().err
    evaluate.main(["--checkpoint", str(trained / "syn" / "last.pt"), "--legibility", "--data", str(tiny_prepared),
                   "--recognizer", rec, "--pick-with", rec, "--candidates", "2", "--max-lines", "2",
                   "--out", str(tmp_path / "e")])
    said = capsys.readouterr()
    assert json.loads(said.out)["candidates"] == 2 and "the recognizer that chose them" in said.err


@pytest.mark.parametrize("script", ["evaluate.py", "recognizer.py"])
def test_output_piped_into_a_reader_that_stops_ends_quietly(trained, tiny_prepared, script):
    """`evaluate.py ... | head -c 10`, `recognizer.py read FILE | head -1`: the reader gone, status 0 and no traceback."""
    args = (["--checkpoint", str(trained / "syn" / "model.pt"), "--data", str(tiny_prepared)] if script == "evaluate.py"
            else ["read", str(tiny_prepared), "--checkpoint", str(trained / "rec" / "model.pt")])
    proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                                   # the reader is gone before anything is printed
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "Exception" not in err, err
