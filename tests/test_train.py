"""End-to-end runs of train.py and evaluate.py on a tiny prepared dataset (CPU)."""
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import model
import train
import utils
from dataset import HandwritingDataset
from model import load_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden-size", "16", "--mixtures", "2", "--window-gaussians", "2", "--batch-size", "8",
        "--tbptt", "25", "--no-progress", "--sample-text", "hat"]


def tiny_flags(task):
    """TINY, less the synthesis-only flags for a prediction run (train.py refuses them there)."""
    skip = {"--window-gaussians", "--sample-text"} if task == "prediction" else set()
    return [a for i, a in enumerate(TINY) if a not in skip and (i == 0 or TINY[i - 1] not in skip)]


def run_train(data, out, *extra, task="synthesis"):
    train.main(["--task", task, "--data", str(data), "--out", str(out), *tiny_flags(task), *extra])
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("task", ["synthesis", "prediction"])
def test_training_lowers_the_loss_and_writes_a_run(tiny_prepared, tmp_path, task):
    rows = run_train(tiny_prepared, tmp_path, "--max-steps", "60", "--eval-interval", "20", "--lr", "3e-3", task=task)
    assert rows[-1]["val_nll_per_line"] < rows[0]["val_nll_per_line"] - 1.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all((0 < row.get("val_window_focus", 0) <= 1) == (task == "synthesis") for row in rows)
    # evaluations at the end of the batch that reaches a multiple of --eval-interval; the run stops at the end of the
    # batch that reaches --max-steps: a batch is one step per --tbptt 25 points of its longest line
    steps = [row["step"] for row in rows]
    assert [s // 20 for s in steps] == sorted(set(s // 20 for s in steps)) and steps[0] >= 20
    longest = max(HandwritingDataset(tiny_prepared, "train").lengths)
    assert 60 <= steps[-1] < 60 + math.ceil(longest / 25)
    for name in ("last.pt", "best.pt", "loss.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    assert list(tmp_path.glob("sample_*.png"))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)           # a plain dict of tensors and config
    assert ckpt["model_config"]["task"] == task and ckpt["step"] == rows[-1]["step"]
    model, _ = load_model(tmp_path / "best.pt", expect_task=task)
    assert model.config.hidden_size == 16
    shipped = torch.load(tmp_path / "model.pt", weights_only=True)        # weights only, float16
    assert "optimizer" not in shipped and all(v.dtype == torch.float16 for v in shipped["model"].values())
    small, _ = load_model(tmp_path / "model.pt", expect_task=task)
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    for k, v in small.state_dict().items():
        assert torch.allclose(v, best[k], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("extra", [[], ["--dropout", "0.2"]])
def test_resume_matches_an_unbroken_run(tiny_prepared, tmp_path, extra):
    """Stopped off the evaluation grid (step 14 of 10, 20, 30) and resumed: the same weights, and evaluations at the
    same steps (dropout: the stop's extra evaluation draws nothing from torch's global random numbers)."""
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "30", "--eval-interval", "10", *extra)
    run_train(tiny_prepared, tmp_path / "b", "--max-steps", "14", "--eval-interval", "10", *extra)
    rows = run_train(tiny_prepared, tmp_path / "b", "--max-steps", "30", "--eval-interval", "10", "--resume", "auto",
                     *extra)
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        unbroken = [json.loads(line)["step"] for line in f]
    resumed = [r["step"] for r in rows]                                   # (a batch is 3-4 steps: 10, 22, 31)
    assert set(unbroken) <= set(resumed) and len(resumed) == len(unbroken) + 1   # + the stop's own evaluation
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == rows[-1]["step"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        assert json.loads(f.readlines()[-1])["val_nll_per_line"] == pytest.approx(rows[-1]["val_nll_per_line"], abs=1e-3)


def test_init_from_starts_a_new_run_from_shipped_weights(tiny_prepared, tmp_path, capsys):
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "20", "--eval-interval", "20", "--lr", "3e-3")
    first = json.loads(open(tmp_path / "a" / "metrics.jsonl").readlines()[-1])["val_nll_per_line"]
    # the float16 weights-only file; TINY's model-size flags, the checkpoint's own, may be typed
    rows = run_train(tiny_prepared, tmp_path / "b", "--init-from", str(tmp_path / "a" / "model.pt"), "--mixtures", "2",
                     "--max-steps", "1", "--eval-interval", "1", "--lr", "1e-9")
    scratch = run_train(tiny_prepared, tmp_path / "c", "--max-steps", "1", "--eval-interval", "1", "--lr", "1e-9")
    assert rows[0]["step"] == scratch[0]["step"] < 20                   # counters start afresh
    assert rows[0]["val_nll_per_line"] == pytest.approx(first, abs=0.5)  # ... from the trained weights
    assert abs(scratch[0]["val_nll_per_line"] - first) > 5
    last = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert last["model_config"]["hidden_size"] == last["train_args"]["hidden_size"] == 16   # the args say what ran
    out = capsys.readouterr().out
    assert "initialised from the weights" in out and "normalised otherwise" not in out      # the same data
    ckpt = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    ckpt["std"] = [s * 1.1 for s in ckpt["std"]]                             # trained on data prepared otherwise
    torch.save(ckpt, tmp_path / "other.pt")
    run_train(tiny_prepared, tmp_path / "d", "--init-from", str(tmp_path / "other.pt"), "--max-steps", "1")
    assert "was trained on data normalised otherwise" in capsys.readouterr().out


def test_kappa_init_sets_the_windows_starting_pace_and_is_kept(tiny_prepared, tmp_path):
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "1", "--eval-interval", "1", "--lr", "1e-9", "--kappa-init", "-1.5")
    ckpt = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    K = ckpt["model_config"]["window_gaussians"]
    assert ckpt["model_config"]["kappa_init"] == ckpt["train_args"]["kappa_init"] == -1.5
    assert torch.allclose(ckpt["model"]["window.bias"][2 * K:], torch.tensor(-1.5), atol=1e-3)   # lr 1e-9: as set
    run_train(tiny_prepared, tmp_path / "b", "--init-from", str(tmp_path / "a" / "model.pt"), "--max-steps", "1",
              "--eval-interval", "1")                # an architecture setting: the checkpoint's, whatever the flag
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["train_args"]["kappa_init"] == -1.5


def test_dropout_is_saved_and_the_flag_wins_over_a_checkpoint(tiny_prepared, tmp_path):
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "3", "--eval-interval", "3", "--dropout", "0.3")
    assert torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model_config"]["dropout"] == 0.3
    run_train(tiny_prepared, tmp_path / "b", "--init-from", str(tmp_path / "a" / "model.pt"), "--max-steps", "1",
              "--eval-interval", "1")                # a training setting, like the learning rate: not inherited
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model_config"]["dropout"] == 0.0
    r = subprocess.run([sys.executable, "train.py", "--dropout", "1", "--data", str(tiny_prepared)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--dropout" in r.stderr and "Traceback" not in r.stderr


def check_resume_needs_the_flag(data, trained, plain, flag, value, bad):
    """A run trained with `flag value` refuses --resume without it, a run without it refuses --resume with it, and
    `flag bad` is refused: one-line errors, no traceback."""
    run_train(data, plain, "--max-steps", "2", "--eval-interval", "2")
    for out, flags, says in [(trained, [], f"pass {flag} again"), (plain, [flag, value], "--init-from")]:
        r = subprocess.run([sys.executable, "train.py", "--data", str(data), "--out", str(out), *TINY,
                            "--resume", "auto", "--max-steps", "40", *flags], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "train.py", flag, bad, "--data", str(data)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and flag in r.stderr and "Traceback" not in r.stderr


def test_weight_noise_learns_sigmas_resumes_exactly_and_refuses_a_mismatched_resume(tiny_prepared, tmp_path):
    noise = ["--weight-noise", "0.02", "--eval-interval", "10", "--lr", "3e-3"]
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "30", *noise)
    run_train(tiny_prepared, tmp_path / "b", "--max-steps", "14", *noise)
    rows = run_train(tiny_prepared, tmp_path / "b", "--max-steps", "30", *noise, "--resume", "auto")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == rows[-1]["step"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    for x, y in zip(a["weight_noise"]["log_sigma"], b["weight_noise"]["log_sigma"], strict=True):
        assert torch.allclose(x, y, atol=1e-6)
    sigmas = torch.cat([v.exp().flatten() for v in a["weight_noise"]["log_sigma"]])
    assert sigmas.std() > 0 and rows[-1]["sigma_rms"] != pytest.approx(0.02, abs=1e-4)   # learnt, weight by weight
    assert rows[-1]["kl_per_point"] > 0
    assert "weight_noise" not in torch.load(tmp_path / "a" / "model.pt", weights_only=True)   # ships the means only
    check_resume_needs_the_flag(tiny_prepared, tmp_path / "a", tmp_path / "plain", "--weight-noise", "0.02", "-1")


def test_weight_average_follows_the_weights_and_swaps_back():
    """WeightAverage against the EMA written out step by step; swapped_in() puts the average in and the training
    weights back (also after an error); its state dict is the model's, buffers included."""
    from utils import WeightAverage
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    average = WeightAverage(net, decay=0.9)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))     # 0.1, 0.18, ... then 0.9 from step 71 on: the ramp matters here
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    for a, e in zip(average.average, expected, strict=True):
        assert torch.allclose(a, e, atol=1e-6)
    training = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(KeyError):
        with average.swapped_in() as model:
            assert model is net
            assert all(torch.equal(p, e) for p, e in zip(net.parameters(), average.average))
            raise KeyError("evaluation failed")
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), training))
    state = average.state_dict()
    assert state.keys() == net.state_dict().keys() and torch.equal(state["0.weight"], average.average[0])
    assert torch.equal(state["1.running_var"], net.state_dict()["1.running_var"])
    other = WeightAverage(net, decay=0.9)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.average, average.average))


def test_ema_evaluates_and_ships_the_average_resumes_exactly_and_refuses_a_mismatched_resume(tiny_prepared, tmp_path):
    from dataset import HandwritingDataset, make_loader
    from model import evaluate_nll, summarize_nll
    ema = ["--ema", "0.9", "--eval-interval", "10", "--lr", "3e-3"]
    rows = run_train(tiny_prepared, tmp_path / "a", "--max-steps", "30", *ema)
    run_train(tiny_prepared, tmp_path / "b", "--max-steps", "14", *ema)
    run_train(tiny_prepared, tmp_path / "b", "--max-steps", "30", *ema, "--resume", "auto")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == rows[-1]["step"] >= 30
    for key in ("model", "train_weights"):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], atol=1e-6), (key, k)
    assert not torch.equal(a["model"]["mdn.weight"], a["train_weights"]["mdn.weight"])
    # "model" holds the average and scored val_nll_per_line; the training weights scored val_raw_nll_per_line
    batches = list(make_loader(HandwritingDataset(tiny_prepared, "valid"), 8, shuffle=False))
    for key, metric in (("model", "val_nll_per_line"), ("train_weights", "val_raw_nll_per_line")):
        model, _ = load_model({**a, "model": a[key]})
        score = summarize_nll(evaluate_nll(model, batches, torch.device("cpu")))["nll_per_line"]
        assert score == pytest.approx(rows[-1][metric], abs=1e-3), key
    assert rows[-1]["val_nll_per_line"] != pytest.approx(rows[-1]["val_raw_nll_per_line"], abs=1e-3)
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)
    shipped = torch.load(tmp_path / "a" / "model.pt", weights_only=True)    # the average, without the training weights
    assert "train_weights" not in shipped and torch.equal(shipped["model"]["mdn.weight"], best["model"]["mdn.weight"].half())
    check_resume_needs_the_flag(tiny_prepared, tmp_path / "a", tmp_path / "plain", "--ema", "0.9", "1")


def test_learning_rate_schedule():
    from utils import learning_rate
    assert learning_rate(0, 100, 1.0, warmup=10) == pytest.approx(0.1)            # linear warm-up
    assert learning_rate(50, 100, 1.0, warmup=10) == 1.0                          # then constant
    assert learning_rate(10, 100, 1.0, warmup=10, schedule="cosine") == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, warmup=10, schedule="cosine") == pytest.approx(0.525)   # half way
    assert learning_rate(100, 100, 1.0, warmup=10, schedule="cosine") == pytest.approx(0.05)   # lr / 20 at the end
    # by a given share of the decay (of a time budget) instead of steps; warm-up still by steps
    assert learning_rate(5, 0, 1.0, warmup=10, schedule="cosine", progress=0.9) == pytest.approx(0.6)
    assert learning_rate(50, 0, 1.0, warmup=10, schedule="cosine", progress=0.5) == pytest.approx(0.525)
    assert learning_rate(50, 0, 1.0, warmup=10, schedule="cosine", progress=1.3) == pytest.approx(0.05)
    assert learning_rate(50, 0, 1.0, warmup=10, progress=0.5) == 1.0


def test_cosine_schedule_over_the_time_limit(tiny_prepared, tmp_path, capsys):
    """Without --max-steps, --schedule cosine decays over --time-limit's minutes (wall time: how many steps fit is the
    machine's business, so only the shape is checked)."""
    rows = run_train(tiny_prepared, tmp_path, "--time-limit", "0.05", "--eval-interval", "5", "--lr", "2e-3",
                     "--schedule", "cosine")
    assert "done (time limit)" in capsys.readouterr().out
    lrs = [r["lr"] for r in rows]
    assert len(lrs) >= 2 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * 2e-3


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_clipped_step_skips_non_finite_updates_and_matches_a_plain_step(name):
    """Fused Adam skips on the device (no host sync); either way a bad step leaves weights and moments untouched, and
    a good one is the plain clip-then-step."""
    from utils import clipped_step, make_optimizer
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = make_optimizer(name, nets[0].parameters(), 1e-2)
    plain = (torch.optim.Adam(nets[1].parameters(), lr=1e-2) if name == "adam" else
             torch.optim.RMSprop(nets[1].parameters(), lr=1e-2, alpha=0.95, momentum=0.9, eps=1e-4, centered=True))
    assert bool(ours.defaults.get("fused")) == (name == "adam")
    x = torch.randn(8, 4)
    for i, scale in enumerate([1.0, float("nan"), 100.0, float("inf"), 1.0]):
        before = [p.detach().clone() for p in nets[0].parameters()]
        moments = {k: v.clone() for k, v in ours.state_dict()["state"].get(0, {}).items()}
        losses = [(net(x) ** 2).sum() * scale for net in nets]
        for net, loss in zip(nets, losses):
            net.zero_grad()
            loss.backward()
        ok = clipped_step(ours, nets[0].parameters(), losses[0].detach(), clip=1.0)
        assert bool(ok) == math.isfinite(scale)
        if not ok:    # skipped: nothing moved, not even the optimiser's step count
            assert all(torch.equal(a, b) for a, b in zip(before, nets[0].parameters()))
            assert all(torch.equal(v, ours.state_dict()["state"][0][k]) for k, v in moments.items())
            continue
        torch.nn.utils.clip_grad_norm_(nets[1].parameters(), 1.0)
        plain.step()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.allclose(a, b, atol=1e-6), i
    assert int(ours.state_dict()["state"][0]["step"]) == 3


def test_rare_chars_draws_lines_with_rare_characters_more_often(tiny_prepared, tmp_path, monkeypatch, capsys):
    import dataset
    seen = []
    original = dataset.make_loader
    def loader(*a, **k):
        made = original(*a, **k)
        if k["shuffle"]:                                                     # the training loader
            seen.append(made)
        return made
    monkeypatch.setattr(train, "make_loader", loader)
    rows = run_train(tiny_prepared, tmp_path, "--max-steps", "4", "--eval-interval", "4", "--rare-chars", "1000")
    assert rows and "lines drawn more often" in capsys.readouterr().out
    texts = dataset.HandwritingDataset(tiny_prepared, "train").texts
    copies = dataset.rare_char_copies(texts, 1000)
    drawn = np.bincount(np.concatenate(list(seen[0].batch_sampler)), minlength=len(texts))   # an epoch's draws per line
    assert drawn.tolist() == copies.tolist() and copies.max() > 1


def test_cosine_schedule_and_augmentation_in_a_run(tiny_prepared, tmp_path, monkeypatch):
    changed = []                                    # the lines trained on are the augmented ones, changed

    def spy(strokes, mask, *a, **k):
        out = dataset_augment(strokes, mask, *a, **k)
        changed.append(not torch.allclose(out, strokes))
        return out
    from dataset import augment as dataset_augment
    monkeypatch.setattr(train, "augment", spy)
    rows = run_train(tiny_prepared, tmp_path, "--max-steps", "24", "--eval-interval", "12", "--lr", "2e-3",
                     "--schedule", "cosine", "--warmup", "4", "--augment-scale", "0.1", "--augment-shear", "0.15")
    assert rows[-1]["step"] >= 24 and changed and all(changed)
    from utils import learning_rate
    for r in rows:                                  # the lr of the last update before each evaluation
        assert r["lr"] == pytest.approx(learning_rate(r["step"] - 1, 24, 2e-3, 4, "cosine"))
    assert rows[-1]["lr"] < 0.2 * 2e-3 and all(map(math.isfinite, (r["val_nll_per_line"] for r in rows)))
    r = subprocess.run([sys.executable, "train.py", "--schedule", "cosine", "--data", str(tiny_prepared)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--max-steps" in r.stderr and "--time-limit" in r.stderr and "Traceback" not in r.stderr


def test_progress_bar_without_a_step_limit(tiny_prepared, tmp_path):
    """With no --max-steps the bar has no total (the run is bounded by --epochs or --time-limit); it once crashed."""
    flags = [a for a in tiny_flags("prediction") if a != "--no-progress"]
    train.main(["--task", "prediction", "--data", str(tiny_prepared), "--out", str(tmp_path), *flags, "--epochs", "1",
                "--eval-interval", "1000"])
    assert (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("extra", [[], ["--weight-noise", "0.02"], ["--ema", "0.9"]], ids=["plain", "weight_noise", "ema"])
def test_cuda_graph_path_trains_like_the_plain_one(tiny_prepared, tmp_path, extra):
    """--cuda-graph (here without CUDA: the same static buffers, run eagerly) takes the same optimiser steps,
    with weight noise too (it perturbs the weights the graph reads, in place), and with --ema (its average is
    swapped into those weights at every evaluation)."""
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "12", "--eval-interval", "12", *extra)
    rows = run_train(tiny_prepared, tmp_path / "b", "--max-steps", "12", "--eval-interval", "12", "--cuda-graph", *extra)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == rows[-1]["step"] >= 12
    for key in ("model", "train_weights") if "--ema" in extra else ("model",):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], atol=1e-5), (key, k)
    r = subprocess.run([sys.executable, "train.py", "--cuda-graph", "--data", str(tiny_prepared)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--tbptt" in r.stderr and "Traceback" not in r.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model, "nll", lambda y, t, m: (y.sum() * float("nan")).expand(y.shape[0]))   # chunk_backward's
    with pytest.raises(SystemExit) as e:
        run_train(tiny_prepared, tmp_path, "--max-steps", "50", "--max-bad-steps", "3")
    assert "NaN/Inf" in str(e.value)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 0 and ckpt["run"]["bad_steps"] >= 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_exclude_lines_leaves_listed_training_lines_out(tiny_prepared, tmp_path, capsys):
    """--exclude-lines FILE: the training lines it lists are left out (and said); a list with no training line is
    refused in one line, and the flag is one a resumed run must keep."""
    train_ids, valid_ids = (HandwritingDataset(tiny_prepared, s).line_ids for s in ("train", "valid"))
    listed = tmp_path / "bad.txt"
    listed.write_text(f"{train_ids[0]}\n{train_ids[5]}  # -4.0\n{valid_ids[0]}\n")
    run_train(tiny_prepared, tmp_path / "run", "--max-steps", "2", "--eval-interval", "2", "--exclude-lines", str(listed))
    assert f"left out 2 training lines listed in {listed} (--exclude-lines)" in capsys.readouterr().out
    assert "exclude_lines" in train.RESUME_FLAGS
    listed.write_text(f"{valid_ids[0]}\n")
    with pytest.raises(SystemExit) as e:
        run_train(tiny_prepared, tmp_path / "run2", "--exclude-lines", str(listed))
    assert str(e.value) == f"error: --exclude-lines {listed}: none of its 1 line ids is a training line of {tiny_prepared}"


def test_evaluate_prints_graves_units(tiny_prepared, tmp_path, capsys):
    run_train(tiny_prepared, tmp_path, "--max-steps", "5", "--eval-interval", "5")
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tiny_prepared), "--split", "test"])
    result = json.loads(capsys.readouterr().out)
    assert {"nll_per_line", "nll_per_point", "lines", "points", "sse", "window_focus"} <= result.keys()
    assert result["lines"] > 0 and result["points"] > result["lines"]
    assert result["nll_per_line"] == pytest.approx(result["nll_per_point"] * result["points"] / result["lines"])
    # --per-line: every line's scores, in the split's order, summing to the same figures
    rows_path = tmp_path / "lines.jsonl"
    evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tiny_prepared), "--split", "test",
                   "--per-line", str(rows_path)])
    each = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    test_lines = HandwritingDataset(tiny_prepared, "test")
    assert [r["line_id"] for r in rows] == test_lines.line_ids and [r["text"] for r in rows] == test_lines.texts
    assert sum(r["nll"] for r in rows) / len(rows) == pytest.approx(result["nll_per_line"], abs=1e-3)
    assert each["nll_per_line"] == pytest.approx(result["nll_per_line"]) and each["per_line"] == str(rows_path)
    assert each["window_short_lines"] == sum(r["window_end"] < -2.5 for r in rows)
    assert all(-len(r["text"]) <= r["window_end"] <= 1 for r in rows)
    # --text-ablation: the same lines scored with each other's texts; the plain figures do not change
    evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tiny_prepared), "--split", "test",
                   "--text-ablation"])
    ablated = json.loads(capsys.readouterr().out)
    assert ablated["nll_per_line"] == pytest.approx(result["nll_per_line"])
    assert ablated["text_worth_per_line"] == pytest.approx(ablated["nll_per_line_other_text"] - result["nll_per_line"])
    assert ablated["nll_per_line_other_text"] != pytest.approx(result["nll_per_line"])
    assert "nll_per_line_in_data_units" not in result          # the data the checkpoint was trained on
    # data prepared otherwise (here: its std 2 and 3 times the checkpoint's): the model still reads offsets on its own
    # scale, and the NLL is also given per unit of the data's std: log(s / s_data) per coordinate and point
    with np.load(tiny_prepared) as f:
        arrays = {k: f[k] for k in f.files}
    std = arrays["std"].astype(np.float64)
    np.savez(tmp_path / "other.npz", **{**arrays, "std": (arrays["std"] * np.array([2.0, 3.0])).astype(np.float32)})
    evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tmp_path / "other.npz"), "--split", "test"])
    other = json.loads(capsys.readouterr().out)
    assert other["nll_per_line"] == pytest.approx(result["nll_per_line"])
    shift = np.log(std / (std * [2.0, 3.0])).sum() * result["points"] / result["lines"]
    assert other["nll_per_line_in_data_units"] == pytest.approx(result["nll_per_line"] + shift)


@pytest.mark.skipif(not utils.cpu_lstm_supports(torch.bfloat16), reason="this CPU's LSTM has no bf16 kernel")
def test_bfloat16_autocast_trains_and_scores_like_float32(tiny_prepared, tmp_path, capsys):
    """--dtype bfloat16 (the GPU setting) on CPU: training steps stay finite, and evaluate.py's NLL in bf16 is within
    1 % of float32's on the same weights (the loss itself is always float32)."""
    rows = run_train(tiny_prepared, tmp_path, "--max-steps", "4", "--eval-interval", "2", "--dtype", "bfloat16")
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_nll_per_line"]) for r in rows)
    assert rows[-1]["bad_steps"] == 0
    nll = {}
    for dtype in ("float32", "bfloat16"):
        capsys.readouterr()
        evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", str(tiny_prepared), "--split", "valid",
                       "--dtype", dtype])
        nll[dtype] = json.loads(capsys.readouterr().out)["nll_per_line"]
    assert nll["bfloat16"] == pytest.approx(nll["float32"], rel=0.01) and nll["bfloat16"] != nll["float32"]


def test_only_a_synthesis_checkpoint_needs_its_alphabet(tiny_prepared, tmp_path, capsys):
    """Data with another alphabet: a synthesis checkpoint is refused (its window reads characters by id); a prediction
    one, which reads no text, trains on from it."""
    with np.load(tiny_prepared) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["alphabet"] = np.array(str(arrays["alphabet"]) + "z")
    other = tmp_path / "other.npz"
    np.savez(other, **arrays)
    for task in ("prediction", "synthesis"):
        run_train(tiny_prepared, tmp_path / task, "--max-steps", "1", task=task)
    run_train(other, tmp_path / "p2", "--max-steps", "1", "--init-from", str(tmp_path / "prediction" / "model.pt"),
              task="prediction")
    assert torch.load(tmp_path / "p2" / "last.pt", weights_only=True)["alphabet"] == str(arrays["alphabet"])
    with pytest.raises(SystemExit, match="was trained with another alphabet; use the data it was trained on"):
        run_train(other, tmp_path / "s2", "--max-steps", "1", "--init-from", str(tmp_path / "synthesis" / "model.pt"))


def test_a_run_resumed_into_another_folder_writes_its_best_there(tiny_prepared, tmp_path, capsys):
    """--resume A/last.pt --out B: B gets best.pt and model.pt at the first evaluation, whether or not the figure beat
    A's best (B had no best.pt, and so no model.pt, when it did not)."""
    run_train(tiny_prepared, tmp_path / "a", "--max-steps", "2", "--eval-interval", "2", task="prediction")
    step = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["step"]
    capsys.readouterr()
    run_train(tiny_prepared, tmp_path / "b", "--resume", str(tmp_path / "a" / "last.pt"), "--max-steps", str(step + 1),
              "--eval-interval", "1", "--lr", "1e-9", task="prediction")
    assert f"goes on in {tmp_path / 'b'}: best figure reset" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "best.pt", weights_only=True)["step"] > step and (tmp_path / "b" / "model.pt").exists()


@pytest.mark.parametrize("digest", [True, False])
def test_resume_on_data_prepared_anew_says_so_and_resets_the_best_figure(tiny_prepared, tmp_path, capsys, digest):
    """prepare_data.py run again into the run's --data folder with other settings: the same path, other data. The
    resumed run says so and lets best.pt be replaced (its figure was taken on other data); a checkpoint from before
    data digests is checked by its normalisation."""
    data = tmp_path / "data" / "iam_ondb.npz"
    data.parent.mkdir()
    data.write_bytes(tiny_prepared.read_bytes())
    run = tmp_path / "run"
    run_train(data, run, "--max-steps", "2", "--eval-interval", "2", task="prediction")
    if not digest:
        last = torch.load(run / "last.pt", weights_only=True)
        del last["data_digest"]
        torch.save(last, run / "last.pt")
    with np.load(data) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["mean"], arrays["std"] = arrays["mean"] + 1.0, arrays["std"] * 0.5       # (a worse NLL: offsets twice as large)
    np.savez(data, **arrays)
    capsys.readouterr()
    step = torch.load(run / "last.pt", weights_only=True)["step"]
    run_train(data, run, "--max-steps", str(step + 1), "--eval-interval", "1", "--resume", "auto", task="prediction")
    assert f"note: {data} holds other data than the run was trained on" in capsys.readouterr().out
    assert torch.load(run / "best.pt", weights_only=True)["step"] > step    # replaced at the first evaluation


def test_resume_names_the_training_flags_given_otherwise(tiny_prepared, tmp_path, capsys):
    """The training flags come from the command line on --resume: those that differ from the run's are named."""
    run_train(tiny_prepared, tmp_path, "--max-steps", "2", "--eval-interval", "2", "--tbptt", "20", task="prediction")
    capsys.readouterr()
    run_train(tiny_prepared.parent, tmp_path, "--max-steps", "30", "--eval-interval", "2", "--resume", "auto",
              "--lr", "0.002", task="prediction")                        # --data its folder: the same data, not named
    out = capsys.readouterr().out
    assert ("note: flags that differ from the run's: --lr 0.002 (was 0.001), --max-steps 30 (was 2), --tbptt 25 "
            "(was 20);") in out
    last = torch.load(tmp_path / "last.pt", weights_only=True)   # a run started in another folder: its relative
    last["train_args"]["data"] = "elsewhere/processed"           # --data cannot be found from here, so is not named
    torch.save(last, tmp_path / "last.pt")
    run_train(tiny_prepared, tmp_path, "--max-steps", "34", "--eval-interval", "2", "--resume", "auto",
              "--lr", "0.002", "--eval-lines", "3", task="prediction")
    out = capsys.readouterr().out
    assert "note: flags that differ from the run's: --max-steps 34 (was 30), --eval-lines 3 (was 0);" in out
    assert "--data" not in out and "best figure reset: nll is measured otherwise now (--eval-lines)" in out
    assert "holds other data" not in out
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)              # a run at its --max-steps: nothing to do
    step, epoch = ckpt["step"], ckpt["run"]["epoch"]
    before = {f: (tmp_path / f).stat().st_mtime_ns for f in ("last.pt", "best.pt", "metrics.jsonl")}
    run_train(tiny_prepared, tmp_path, "--max-steps", str(step), "--resume", "auto", task="prediction")
    assert f"already at --max-steps {step}" in capsys.readouterr().out
    assert epoch >= 1
    run_train(tiny_prepared, tmp_path, "--epochs", str(epoch), "--resume", "auto", task="prediction")   # or --epochs
    assert f"already at --epochs {epoch}" in capsys.readouterr().out
    assert before == {f: (tmp_path / f).stat().st_mtime_ns for f in before}


def test_bad_checkpoints_give_one_line_errors(tiny_prepared, tmp_path):
    run_train(tiny_prepared, tmp_path / "p", "--max-steps", "2", "--eval-interval", "2", task="prediction")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    data = ["--data", str(tiny_prepared)]
    (tmp_path / "nolast").mkdir()
    (tmp_path / "nolast" / "best.pt").write_bytes((tmp_path / "p" / "best.pt").read_bytes())
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "last.pt").write_bytes((tmp_path / "p" / "last.pt").read_bytes())
    with np.load(tiny_prepared) as f:                     # the same data, its test lines moved to train
        arrays = {k: f[k] for k in f.files}
    arrays["split"] = np.where(arrays["split"] == 2, 0, arrays["split"]).astype(np.int8)
    empty = tmp_path / "no_test.npz"
    np.savez(empty, **arrays)
    cases = [
        (["train.py", "--task", "synthesis", "--resume", str(tmp_path / "p" / "last.pt"), *data], "prediction checkpoint"),
        (["train.py", "--task", "synthesis", "--init-from", str(tmp_path / "p" / "model.pt"), *data], "prediction checkpoint"),
        (["train.py", "--init-from", str(junk), *data], "cannot be read as a PyTorch checkpoint"),
        (["evaluate.py", "--checkpoint", str(junk), *data], "cannot be read as a PyTorch checkpoint"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "missing.pt"), *data], "not found"),
        (["train.py", "--resume", str(tmp_path / "missing.pt"), *data], "not found; train one with train.py or pass --resume"),
        (["train.py", "--init-from", str(tmp_path / "missing.pt"), *data], "or pass --init-from PATH"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "p" / "model.pt"), "--text-ablation", *data],
         "needs a synthesis checkpoint"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "p" / "model.pt"), "--per-line", str(tmp_path / "p.json"), *data],
         "--per-line " + str(tmp_path / "p.json") + ": unsupported extension '.json'; use .jsonl"),
        (["train.py", "--data", str(tmp_path / "nowhere")], "prepare_data.py"),
        # a run folder is not overwritten by a new run; a weights-only file cannot be resumed
        (["train.py", "--task", "prediction", "--out", str(tmp_path / "p"), *data],
         "already holds a run (last.pt, best.pt, model.pt, metrics.jsonl): pass --resume auto to go on with it"),
        (["train.py", "--task", "prediction", "--out", str(tmp_path / "nolast"), *data],          # best.pt, no last.pt
         "already holds a run (best.pt): it has no last.pt to go on from (--resume OUT/best.pt does)"),
        (["train.py", "--task", "prediction", "--out", str(tmp_path / "q"), "--resume", str(tmp_path / "p" / "last.pt"),
          *data], "holds another run (last.pt), which resuming"),
        (["train.py", "--task", "prediction", "--out", str(tmp_path / "nolast"), "--resume",
          str(tmp_path / "p" / "last.pt"), *data], "holds another run (best.pt), which resuming"),
        (["train.py", "--task", "prediction", "--out", str(junk), *data], str(junk) + " is a file; give a folder"),
        # a checkpoint keeps its size: a typed size flag that asks for another, even the default, is refused (and
        # leaves no --out folder behind)
        (["train.py", "--task", "prediction", "--init-from", str(tmp_path / "p" / "model.pt"), "--hidden-size", "8",
          "--layers", "3", "--out", str(tmp_path / "refused"), *data],
         "model config cannot be changed: --hidden-size 8 (it has 16); drop the flag to fine-tune it\n"),
        (["train.py", "--task", "prediction", "--init-from", str(tmp_path / "p" / "model.pt"), "--hidden-size=400",
          *data], "model config cannot be changed: --hidden-size 400 (it has 16)"),
        (["train.py", "--task", "prediction", "--out", str(tmp_path / "p"), "--resume", "auto", "--layers", "2",
          "--mixtures", "5", *data], "--layers 2 (it has 3), --mixtures 5 (it has 2); drop these flags to go on with "
         "that run, or train a new model (another --out, no --resume)\n"),
        (["train.py", "--kappa-init", "1000", *data], "expected a number >= -10.0 and < 3.0"),
        (["train.py", "--augment-shear", "100", *data], "expected a number >= 0.0 and < 1.0"),
        (["train.py", "--legibility-bias", "1e308", *data], "expected a number from 0 (unbiased) to 100"),
        (["train.py", "--task", "prediction", "--resume", str(tmp_path / "p" / "model.pt"), *data],
         "holds weights only (no optimiser state, like model.pt and the shipped files): resume from a run's last.pt, or "
         "train on from these weights with --init-from"),
        (["train.py", "--task", "prediction", "--max-points", "3", *data], "no training line has at most --max-points 3"),
        (["train.py", "--recognizer", str(tmp_path / "missing.pt"), *data], "or pass --recognizer PATH"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "p" / "model.pt"), "--legibility", *data],
         "not synthesis; pass a synthesis checkpoint\n"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "p" / "model.pt"), "--data", str(empty), "--split", "test"],
         "the test split of " + str(empty) + " has no lines"),
        (["evaluate.py", "--checkpoint", str(tmp_path / "p"), *data], "is a folder; pass a .pt file in it"),
        (["evaluate.py", "--prompts", "p.txt", *data], "--prompts is for --legibility"),
        (["train.py", "--data", str(tmp_path / "p" / "model.pt")], "is not prepared data (none of its arrays)"),
    ]
    for args, message in cases:
        r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "refused").exists()


def test_torchrun_two_processes_on_cpu(tiny_prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):   # a second try only for a process killed by a signal (a rare gloo socket abort on CI)
        out = tmp_path / f"try{attempt}"
        r = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--data", str(tiny_prepared),
                            "--out", str(out), *TINY, "--max-steps", "6", "--eval-interval", "3", "--ema", "0.9"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        if r.returncode == 0 or "exitcode  : -" not in r.stderr:
            break
    # the workers' own messages, not torchrun's traceback about them
    why = [l for l in r.stderr.splitlines() if "site-packages" not in l and l.strip() and not l.startswith(" ")]
    assert r.returncode == 0, "\n".join(why[:40])
    assert "2 process(es)" in r.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows and rows[-1]["step"] >= 6          # rank 0 alone writes: one row per evaluation
    assert len(rows) == len({r["step"] for r in rows})
    assert rows[-1]["val_raw_nll_per_line"] != rows[-1]["val_nll_per_line"]   # --ema: both weights scored on 2 ranks


@pytest.mark.parametrize("sig, script", [("SIGINT", "train.py"), ("SIGTERM", "train.py"), ("SIGINT", "recognizer.py")])
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_prepared, tmp_path, sig, script):
    """Ctrl-C, or SIGTERM (`timeout`, `kill`, a job scheduler), ends the batch, evaluates, saves and exits 130 (a job
    script can tell an interrupted run from a finished one)."""
    import signal
    import time
    size = TINY if script == "train.py" else ["--hidden-size", "16", "--conv-channels", "8", "--batch-size", "8",
                                              "--no-progress", "--eval-lines", "4"]
    p = subprocess.Popen([sys.executable, script, *(["train"] if script == "recognizer.py" else []), "--data",
                          str(tiny_prepared), "--out", str(tmp_path), *size, "--eval-interval", "1000000",
                          "--max-steps", "1000000"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "config:" not in (p.stdout.readline() or ""):
        pass
    time.sleep(2)                                   # a few training steps
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "done (interrupted)" in out
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] > 0 and ckpt["step"] == ckpt["run"]["last_eval_step"]


def test_a_second_ctrl_c_stops_at_once(monkeypatch, capsys, tmp_path):
    """The first Ctrl-C (or SIGTERM) asks the loop to end its batch, evaluate and save, and says so; a second one
    stops at once, in one line that says whether a checkpoint (written atomically) stands, in train.py and recognizer.py."""
    import os
    import signal
    import time
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop, said = {"why": None}, []
        utils.stop_on_signals(stop, said.append)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop["why"] == "interrupted" and "Ctrl-C again to stop at once" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)                                   # the handler raises here
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    import recognizer

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train", interrupted)
    for saved in (False, True):                         # the line says whether a checkpoint stands
        out = tmp_path / str(saved)
        if saved:
            out.mkdir()
            (out / "last.pt").write_bytes(b"")
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(out)])
        said = capsys.readouterr().err
        assert e.value.code == 130 and said.count("\n") == 1
        assert ((f"the last checkpoint saved, {out / 'last.pt'}, stands" in said) == saved
                and ("stopped at once; nothing saved yet" in said) != saved), said
    monkeypatch.setattr(recognizer, "train", interrupted)
    assert recognizer.main(["train", "--out", str(out)]) == 130
    assert f"recognizer.py: stopped at once; the last checkpoint saved, {out / 'last.pt'}, stands" in capsys.readouterr().err


@pytest.mark.parametrize("script, command", [("evaluate", "run"), ("recognizer", "read"), ("recognizer", "evaluate"),
                                             ("train", "train"), ("bench", "run")])
def test_sigterm_outside_a_training_loop_stops_a_script_in_one_line(monkeypatch, capsys, tmp_path, script, command):
    """SIGTERM (`kill`, `timeout`) while a script loads data or evaluates: one line and status 130 (without a handler
    of the script's own it killed the process silently, this test's with it)."""
    import os
    import signal
    import time
    import bench
    import evaluate
    import recognizer
    module = {"evaluate": evaluate, "recognizer": recognizer, "train": train, "bench": bench}[script]

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                                   # the handler raises here
    monkeypatch.setattr(module, command, killed)
    argv = {"run": [], "read": ["read", "some.npz"], "evaluate": ["evaluate"], "train": ["--out", str(tmp_path)]}[command]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    assert signal.getsignal(signal.SIGTERM) == previous   # put back
    said = capsys.readouterr().err
    assert code == 130 and said.count("\n") == 1 and ("interrupted" in said or "nothing saved yet" in said), said


def test_gpu_session_script_trains_evaluates_and_resumes_from_parts(tiny_prepared, tmp_path):
    """docs/gpu_session.sh (CPU, tiny sizes): a stage leaves model.pt, metrics and last.pt in parts in $OUT; a call
    with the parts put back (beside an older last.pt) joins them and trains on."""
    run = tmp_path / "run"
    tiny = " ".join(["--data", str(tiny_prepared), *TINY, "--eval-interval", "2", "--legibility-lines", "3"])

    def stage(out, steps):
        env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "DTYPE": "float32", "RUN": str(run), "OUT": str(out),
               "TRAIN_ARGS": f"{tiny} --max-steps {steps}", "EVAL_ARGS": f"--data {tiny_prepared}"}
        r = subprocess.run(["bash", "docs/gpu_session.sh", "synthesis", "1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    stage(tmp_path / "a", 2)
    a = tmp_path / "a"
    names = {p.name for p in a.iterdir()}
    assert {"model.pt", "results.tar", "log.txt"} <= names and len(names) <= 8      # the device tool returns 8 files
    with tarfile.open(a / "results.tar") as tar:
        report = {Path(m).name: m for m in tar.getnames()}
        assert {"metrics.jsonl", "loss.png", "valid.json", "legibility.json"} <= report.keys()
        assert json.loads(tar.extractfile(report["valid.json"]).read())["lines"] == 5
        assert 0 <= json.loads(tar.extractfile(report["legibility.json"]).read())["cer_generated"]
    first = torch.load(run / "last.pt", weights_only=True)["step"]
    (run / "last.pt").write_bytes(b"stale")                 # an older last.pt left in the run folder: parts win
    os.utime(run / "last.pt", (1e9, 1e9))
    for part in a.glob("last.pt.part-*"):
        (run / part.name).write_bytes(part.read_bytes())
    log = stage(tmp_path / "b", first + 2)
    assert "joined" in log and f"resumed from {run / 'last.pt'} at step {first}" in log
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] > first and "train_weights" in last                # the script's default --ema 0.999


@pytest.mark.parametrize("script", ["train", "evaluate"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu_is_a_one_line_error(tiny_prepared, tmp_path, monkeypatch, script, dtype):
    """On a CPU whose LSTM kernels have no half-precision path (oneDNN fails deep inside), say so."""
    monkeypatch.setattr(utils, "cpu_lstm_supports", lambda d: False)
    argv = {"train": ["--data", str(tiny_prepared), "--out", str(tmp_path), "--max-steps", "1"],
            "evaluate": ["--checkpoint", "checkpoints/prediction.pt", "--data", str(tiny_prepared)]}[script]
    with pytest.raises(SystemExit) as e:
        {"train": train.main, "evaluate": evaluate.main}[script]([*argv, "--device", "cpu", "--dtype", dtype])
    assert str(e.value).startswith(f"error: --dtype {dtype}: this CPU's LSTM kernels (oneDNN) have no") and "\n" not in str(e.value)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("device, message", [("foo", "--device foo is not a device"),
                                             ("cuda:7", "--device cuda:7: "), ("mps", "--device mps: "),
                                             ("meta", "--device meta holds shapes, not numbers")])
def test_an_unusable_device_is_a_one_line_error_in_every_script(tiny_prepared, tmp_path, device, message):
    """Before, --device cuda on a machine without one ended in a traceback (train.py, recognizer.py train, bench.py)
    or blamed the checkpoint (evaluate.py, recognizer.py evaluate)."""
    if device == "cuda:7" and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} exists here")
    import bench
    import recognizer
    data = ["--data", str(tiny_prepared)]
    runs = [(train.main, [*data, "--out", str(tmp_path), "--max-steps", "1"]),
            (evaluate.main, ["--checkpoint", "checkpoints/prediction.pt", *data]),
            (recognizer.main, ["train", *data, "--out", str(tmp_path), "--max-steps", "1"]),
            (recognizer.main, ["evaluate", "--checkpoint", "checkpoints/recognizer.pt", *data]),
            (recognizer.main, ["read", f"{tiny_prepared}:1"]),
            (bench.main, ["--quick"])]
    for main, argv in runs:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--device", device])
        assert str(e.value).startswith(f"error: {message}") and "\n" not in str(e.value), (main, str(e.value))
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("script, argv, expected", [
    ("generate", ["--text", "ab", "--bias", "nan"], "a finite number"),
    ("generate", ["--text", "ab", "--stroke-width", "inf"], "a finite number"),
    ("evaluate", ["--legibility", "--bias", "nan"], "a number from 0 (unbiased) to 100"),
    ("evaluate", ["--batch-size", "0"], "an integer >= 1"),
    ("evaluate", ["--max-lines", "-5"], "an integer >= 0"),
    ("evaluate", ["--legibility", "--max-steps-per-char", "0"], "an integer >= 1 and < 201"),
    ("evaluate", ["--legibility", "--retries", "50"], "an integer >= 0 and < 21"),
    ("train", ["--lr", "nan"], "a number > 0.0"),
    ("train", ["--lr", "0"], "a number > 0.0"),
    ("train", ["--augment-scale", "1"], "a number >= 0.0 and < 1.0"),
    ("recognizer", ["train", "--augment-scale", "2"], "a number >= 0.0 and < 1.0"),
    ("train", ["--dropout", "inf"], "a finite number"),
    ("train", ["--batch-size", "0"], "an integer >= 1"),
    ("train", ["--tbptt", "-1"], "an integer >= 0"),
    ("recognizer", ["train", "--batch-size", "0"], "an integer >= 1"),
    ("recognizer", ["read", "x.npz", "--batch-size", "0"], "an integer >= 1"),
    ("prepare_data", ["--resample", "nan"], "a number >= 0.0"),
    ("prepare_data", ["--workers", "0"], "an integer >= 1"),
    ("bench", ["--sample-batch", "-1"], "an integer >= 0"),
    ("bench", ["--sample-chars", "0"], "an integer >= 1"),
    ("train", ["--seed", "-1"], "an integer >= 0 and < 2147483648"),                 # was a numpy traceback
    ("recognizer", ["train", "--seed", "99999999999999999999"], "an integer >= 0 and < 2147483648"),
    ("evaluate", ["--seed", "-1"], "an integer >= 0 and < 9223372036854775808"),
])
def test_number_flags_refuse_nonsense(script, argv, expected, capsys):
    """Number flags are parsed by utils.finite_float / utils.at_least: nan, inf or a value below the flag's floor stops
    at the command line with one line. Before: generate.py --bias nan and evaluate.py --batch-size 0 died in
    tracebacks, evaluate.py --max-lines -5 silently dropped the last 5 lines, train.py --lr nan trained on garbage."""
    import importlib
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.get_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and f"argument {argv[-2]}: expected {expected}, not '{argv[-1]}'" in err, err
    assert utils.finite_float("1e-3") == 1e-3 and utils.at_least(0)("0") == 0 and utils.at_least(0.5)("2") == 2.0


def test_number_flags_keep_their_documented_zero():
    """0 where a flag's help says what 0 means stays accepted (e.g. bench.py --sample-batch 0 = skip the batch test)."""
    import bench
    assert bench.get_args(["--sample-batch", "0"]).sample_batch == 0
    assert train.get_args(["--tbptt", "0", "--max-steps", "0", "--eval-lines", "0"]).tbptt == 0
    assert evaluate.get_args(["--legibility", "--max-lines", "0", "--retries", "1", "--retry-above", "0"]).retry_above == 0.0


def test_resume_drops_metrics_rows_past_the_checkpoint(tiny_prepared, tmp_path):
    """A run killed between its metrics row and last.pt (or while writing the row) leaves rows ahead of the checkpoint:
    on resume they go, so no step has two rows."""
    run_train(tiny_prepared, tmp_path, "--max-steps", "6", "--eval-interval", "3", task="prediction")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99}) + '\n{"step": 10')                  # ahead of last.pt, then cut short
    rows = run_train(tiny_prepared, tmp_path, "--max-steps", "12", "--eval-interval", "3", "--resume", "auto",
                     task="prediction")
    steps = [r["step"] for r in rows]
    assert 99 not in steps and steps == sorted(set(steps)) and steps[-1] >= 12
    rows_path = tmp_path / "m.jsonl"                        # a step that is no number; a last row with no newline
    rows_path.write_text('{"step": 1}\n\n{"step": null}\n{"step": 2}')
    utils.trim_metrics(rows_path, 5)
    assert rows_path.read_text() == '{"step": 1}\n{"step": 2}\n'
    import recognizer                                       # recognizer.py train resumes the same way
    common = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "r"), "--hidden-size", "16",
              "--conv-channels", "8", "--batch-size", "8", "--no-progress", "--eval-interval", "2", "--eval-lines", "4"]
    recognizer.main([*common, "--max-steps", "4"])
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99}) + '\n{"step": 10')
    recognizer.main([*common, "--max-steps", "6", "--resume", "auto"])
    with open(tmp_path / "r" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4, 6]


def test_a_full_disk_is_one_line(tiny_prepared, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: the run ends with one line naming the file, not a traceback."""
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as e:
        run_train(tiny_prepared, tmp_path, "--max-steps", "2", "--eval-interval", "2", task="prediction")
    message = str(e.value)
    assert message.startswith("error: cannot write ") and "last.pt" in message and "\n" not in message
    assert not list(tmp_path.glob("*.tmp*"))                                 # no half-written file left


@pytest.mark.parametrize("args, flag", [
    (["train.py", "--lr", "0"], "--lr"),
    (["train.py", "--dropout", "1"], "--dropout"),
    (["evaluate.py", "--split", "nope"], "--split"),
    (["recognizer.py", "train", "--kernel-size", "x"], "--kernel-size"),
    (["recognizer.py"], "required"),
    (["prepare_data.py", "--workers", "0"], "--workers"),
    (["bench.py", "--task", "nope"], "--task"),
])
def test_every_script_gives_one_line_flag_errors(args, flag):
    """A wrong flag: one line naming it (utils.OneLineParser; the usage block is left to --help), exit status 2."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and flag in r.stderr and r.stderr.count("\n") == 1 and "(see --help)" in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--task", "prediction", "--sample-text", "hello"], "--sample-text is for --task synthesis"),
    (["--task", "prediction", "--window-gaussians", "3"], "--window-gaussians is for --task synthesis"),
    (["--task", "prediction", "--kappa-init", "-2"], "--kappa-init is for --task synthesis"),
    (["--legibility-lines", "3"], "--legibility-lines sets the legibility check, which needs --recognizer"),
    (["--legibility-bias", "2"], "--legibility-bias sets the legibility check, which needs --recognizer"),
    (["--sample-text", " "], "--sample-text is empty"),
])
def test_train_refuses_flags_that_would_change_nothing(tiny_prepared, tmp_path, capsys, args, message):
    """A flag typed where it does nothing (a text or window flag for the prediction network, the legibility check's
    settings without a recognizer, an empty sample phrase) is refused in one line, not ignored."""
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tiny_prepared), "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_a_sample_text_the_alphabet_lacks_is_refused(tiny_prepared, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(tiny_prepared), "--out", str(tmp_path / "r"), *TINY[:-2], "--sample-text", "na\u00efve \u65e5"])
    message = str(e.value)
    assert message.startswith("error: --sample-text has characters not in the data's alphabet: '\u00ef' ")
    assert "'\u65e5'" in message and "\n" not in message


def test_parse_typed_knows_the_flags_typed():
    """OneLineParser.parse_typed: args.typed holds the flags on the command line (a default value typed, an =, an
    abbreviation), not the others, and the values are parse_args' own (defaults filled in, strings converted)."""
    p = utils.OneLineParser()
    p.add_argument("--bias", type=float, default=1.0)
    p.add_argument("--line-height", type=int, default="100")
    p.add_argument("--view", default="plain")
    p.add_argument("--show", action="store_true")
    args = p.parse_typed(["--bias", "1", "--line-h=100"])
    assert args.typed == {"bias", "line_height"}
    assert (args.bias, args.line_height, args.view, args.show) == (1.0, 100, "plain", False)
    args = p.parse_typed(["--show"])
    assert args.typed == {"show"} and args.line_height == 100 and args.show
    assert p.parse_typed([]).typed == set()
