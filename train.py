"""
Train Graves' prediction or synthesis network on prepared IAM-OnDB data.

    python train.py --task synthesis --data data/processed --out checkpoints/synthesis
    torchrun --nproc_per_node=N train.py ...      # DistributedDataParallel, rank 0 writes files

One step is one optimiser update on one chunk of --tbptt points (or whole lines with --tbptt 0); the
recurrent state (LSTM states, kappa, window) is carried from chunk to chunk and detached. Every
--eval-interval steps (at the end of a batch): validation NLL, a sample image, a metrics.jsonl row, a
loss-curve PNG, last.pt and (on improvement) best.pt; at the end, model.pt: best.pt's weights in float16
without optimiser state, the file to ship or pass to generate.py. Checkpoints are written atomically; --resume continues
exactly where a run stopped; Ctrl-C finishes the batch, saves and exits.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads sleep, not spin: on cores other jobs use,
                                                    # spinning made runs 10-40x slower (README, Troubleshooting)
if __name__ == "__main__":   # Ctrl-C while the libraries load (torch: 1-2 s): stop quietly, not with a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # main() then reports an interrupt in one line

import numpy as np
import torch
import torch.distributed as dist

from dataset import Alphabet, HandwritingDataset, augment, check_splits, make_loader, rare_char_copies, read_line_ids
from model import (GraphedChunk, HandwritingModel, ModelConfig, WeightNoise, chunk_backward, evaluate_nll, load_weights,
                   summarize_nll, teacher_forcing)
from recognition import error_rates, load_recognizer, write_and_read
from utils import (DTYPES, DefaultsHelpFormatter, MAX_BIAS, OneLineParser, WeightAverage, already_done, at_least,
                   autocast_dtype, bias_value, checkpoint_norm, clipped_step, export_weights, finite_float, flag_of,
                   interrupt_on_signals, learning_rate, load_checkpoint, make_optimizer, moved_run, note_changed_data,
                   note_changed_flags, pick_device, plot_loss_curve, restore_signals, restore_training_state,
                   resume_path, save_checkpoint, save_sample_image, show_chars, stop_on_signals, stopped_at_once,
                   training_state, trim_metrics, writable_folder)


# training flags that shape a run: on --resume, those given otherwise than the run's are named
RESUME_FLAGS = ("data", "optimizer", "lr", "schedule", "warmup", "max_steps", "batch_size", "tbptt", "clip", "dropout",
                "ema", "augment_scale", "augment_shear", "rare_chars", "max_points", "max_lines", "exclude_lines", "dtype",
                "seed", "eval_lines", "recognizer", "legibility_lines", "legibility_bias")
# ... and those that measure the figure --select-by compares: changed, best.pt's figure is no longer comparable
MEASURE_FLAGS = {"nll": ("data", "eval_lines"), "cer": ("data", "recognizer", "legibility_lines", "legibility_bias")}
# the model's size: a checkpoint's config holds it, so on --resume and --init-from these flags may not ask for another
MODEL_FLAGS = ("hidden_size", "layers", "mixtures", "window_gaussians", "kappa_init")
SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog"   # drawn at every evaluation unless --sample-text


def get_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--task", choices=["prediction", "synthesis"], default="synthesis", help="network to train (paper sections 4 and 5)")
    p.add_argument("--data", default="data/processed", help="folder with iam_ondb.npz from prepare_data.py, or the .npz itself")
    p.add_argument("--out", default="runs/TASK", help="run folder for checkpoints, metrics and images (TASK: --task)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from (a last.pt); 'auto' = OUT/last.pt if it exists")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this checkpoint's weights and config (any .pt from train.py, e.g. a shipped "
                        "model); fresh optimiser and counters; --resume wins when both apply")
    # model: defaults are ModelConfig's (the paper's); with --resume or --init-from the checkpoint's, which a typed
    # flag may not contradict (SUPPRESS: a flag not typed is absent from args, so only typed ones are checked)
    size = lambda flag, kind, what: p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=what + (
        f" (default: {getattr(ModelConfig, flag[2:].replace('-', '_'))}; with --resume or --init-from the checkpoint's)"))
    size("--hidden-size", at_least(1), "LSTM cells per layer (paper: 400)")
    size("--layers", at_least(1), "stacked LSTM layers (paper: 3)")
    size("--mixtures", at_least(1), "M, Gaussians in the mixture density output (paper: 20)")
    size("--window-gaussians", at_least(1), "K, Gaussians in the attention window (paper: 10)")
    size("--kappa-init", at_least(-10.0, below=3.0), "initial bias of the window's step kappa_hat (log characters per "
         "point; -3: exp(-3) = 0.05, a line takes about 21 points per character; the paper gives none)")
    # optimisation
    p.add_argument("--optimizer", choices=["adam", "rmsprop"], default="adam",
                   help="adam, or centred RMSProp with the paper's decay 0.95, momentum 0.9, eps 1e-4 (use --lr 1e-4; "
                        "not exact: torch adds eps outside the square root, and our loss is per point)")
    p.add_argument("--lr", type=at_least(0.0, exclusive=True), default=1e-3, help="learning rate (paper, RMSProp: 1e-4)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate after warm-up: constant (the paper), or cosine decay to lr/20 at --max-steps, "
                        "or without --max-steps over --time-limit's minutes (each call decays anew from --lr)")
    p.add_argument("--warmup", type=at_least(0), default=0, help="steps of linear learning-rate warm-up (paper: none)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="lines per batch (per process under torchrun)")
    p.add_argument("--tbptt", type=at_least(0), default=0, help="truncated BPTT chunk length in points; 0 = whole lines")
    p.add_argument("--clip", type=at_least(0.0), default=3.0, help="clip the gradient norm to this (0 = off); the paper clipped derivatives instead")
    p.add_argument("--epochs", type=at_least(1), default=50, help="passes over the training split (stops at whichever of epochs/max-steps/time-limit comes first)")
    p.add_argument("--max-steps", type=at_least(0), default=0, help="stop after this many optimiser steps, checked at the end of a batch so that resuming is exact: with --tbptt N a batch takes one step per N points of its longest line, so a run may pass it by that many (0 = no limit)")
    p.add_argument("--time-limit", type=at_least(0.0), default=0, help="stop after this many minutes of wall time in this call (a resumed run counts afresh), then evaluate and save (0 = no limit)")
    p.add_argument("--dropout", type=finite_float, default=0.0,
                   help="probability of dropping each layer's output units on their way to the layer above and the "
                        "mixture head, training only (paper: none, 0); also applies to --resume and --init-from")
    p.add_argument("--weight-noise", type=finite_float, default=0.0,
                   help="adaptive weight noise (Graves 2011; the paper's best results used it): every weight gets its own "
                        "Gaussian, this is its starting standard deviation, learnt from there with the weights' description "
                        "length added to the loss (0 = off, the paper's plain runs; try 0.01); pass it again on --resume")
    p.add_argument("--ema", type=finite_float, default=0.0,
                   help="keep an exponential moving average of the weights, this decay per step (0 = off, the paper; "
                        "try 0.999, about the last 1,000 steps): evaluations, samples, best.pt and model.pt use the "
                        "average; metrics.jsonl also gives the training weights' NLL (val_raw_nll_per_line); pass it "
                        "again on --resume")
    p.add_argument("--augment-scale", type=at_least(0.0, below=1.0), default=0.0,
                   help="data augmentation: random size change per line, +- this fraction (paper: none, 0)")
    p.add_argument("--augment-shear", type=at_least(0.0, below=1.0), default=0.0,
                   help="data augmentation: random slant per line, dx += k dy with |k| <= this (paper: none, 0)")
    p.add_argument("--rare-chars", type=at_least(0), default=0,
                   help="draw lines holding rare characters more often: a line whose rarest character appears n < N "
                        "times in the training text goes into each epoch round(N / n) times, at most 8 (0 = off, the "
                        "paper; try 200: digits appear 36-223 times, X twice); keep it the same when resuming")
    p.add_argument("--max-points", type=at_least(0), default=0, help="drop training lines longer than this many points (0 = keep all)")
    p.add_argument("--max-lines", type=at_least(0), default=0, help="use only the first N training lines (0 = all; for quick tests)")
    p.add_argument("--exclude-lines", default=None, metavar="FILE",
                   help="leave out the training lines listed in FILE (line ids, one per line; ids of other splits are "
                        "ignored), e.g. data/misaligned.txt: lines whose transcription names a word their ink lacks "
                        "(paper: none)")
    # evaluation and logging
    p.add_argument("--eval-interval", type=at_least(1), default=500, help="steps between evaluations and checkpoints (at the end of the batch whose steps reach a multiple of it; metrics.jsonl gives the step)")
    p.add_argument("--eval-lines", type=at_least(0), default=0, help="validation lines to evaluate (0 = the whole split)")
    p.add_argument("--sample-text", default=None, help=f"phrase drawn at every evaluation (synthesis; default: "
                                                       f"{SAMPLE_TEXT!r}, less any characters the data lacks)")
    p.add_argument("--recognizer", default=None,
                   help="recognizer checkpoint (recognizer.py train; synthesis only): every evaluation also writes "
                        "--legibility-lines validation texts and reads them back: val_cer, val_last_word_wrong and "
                        "val_finished in metrics.jsonl")
    p.add_argument("--legibility-lines", type=at_least(1), default=64, help="validation texts written per legibility check")
    p.add_argument("--legibility-bias", type=bias_value, default=1.0, help=f"sampling bias of the legibility check (section 5.4; 0 to {MAX_BIAS})")
    p.add_argument("--select-by", choices=["nll", "cer"], default=None,
                   help="which validation figure picks best.pt (and so model.pt): NLL per line, or the legibility "
                        "check's character error rate (needs --recognizer); the lowest NLL is not always the most legible "
                        "(default: nll, or what the --resume'd run chose by)")
    p.add_argument("--max-bad-steps", type=at_least(1), default=20,
                   help="stop after this many consecutive NaN/Inf losses or gradients (skipped updates; checked after each batch)")
    # system
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype for the network (on a CPU, bfloat16 only where its oneDNN LSTM has a kernel, e.g. AVX-512 Zen 4; float16 on none tried; else a one-line error); the loss is always float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the window loop's step (fewer kernel launches per step on a GPU; the first batches "
                        "compile for tens of seconds; needs a C++ compiler on CPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="record each --tbptt chunk's forward and backward once as a CUDA graph and replay it (GPU: removes "
                        "the per-kernel launch cost of the window loop; needs --tbptt N; without CUDA runs the same code eagerly)")
    p.add_argument("--seed", type=at_least(0, below=2 ** 31), default=1337, help="random seed (initialisation and data order)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = p.parse_typed(argv)
    typed = vars(args).pop("typed")            # not a setting of the run (train_args is saved as JSON)
    # flags typed where they would change nothing: say so instead of ignoring them
    textual = [k for k in ("sample_text", "recognizer", "legibility_lines", "legibility_bias",
                           "window_gaussians", "kappa_init") if k in typed]
    if args.task == "prediction" and textual:
        p.error(f"{flag_of(textual[0])} is for --task synthesis; the prediction network has no text and no window")
    checks = [k for k in ("legibility_lines", "legibility_bias") if k in typed]
    if checks and not args.recognizer:
        p.error(f"{flag_of(checks[0])} sets the legibility check, which needs --recognizer PATH: give it, or drop the flag")
    if args.sample_text is not None and not args.sample_text.strip():
        p.error("--sample-text is empty: give the phrase drawn at every evaluation")
    if args.schedule == "cosine" and not (args.max_steps or args.time_limit):
        p.error("--schedule cosine decays over --max-steps steps or --time-limit minutes: give one of them")
    if args.weight_noise < 0:
        p.error(f"--weight-noise is a standard deviation, >= 0, not {args.weight_noise}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema is a decay per step in [0, 1) (e.g. 0.999), not {args.ema}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout is a probability in [0, 1), not {args.dropout}")
    if args.cuda_graph and not args.tbptt:
        p.error("--cuda-graph records fixed-length chunks: give --tbptt N (points per chunk, e.g. 100)")
    if args.select_by == "cer" and not args.recognizer:
        p.error("--select-by cer needs --recognizer PATH (a recognizer.py checkpoint)")
    if args.out == "runs/TASK":
        args.out = os.path.join("runs", args.task)
    return args


class Run:
    """Holds the state a checkpoint saves: everything needed to continue exactly."""

    def __init__(self):
        self.step = 0              # optimiser steps done
        self.epoch = 0             # current epoch
        self.batch_in_epoch = 0    # batches of the current epoch already done
        self.best_val = math.inf   # lowest validation figure chosen by --select-by
        self.best_by = None        # ... and which one ("nll" or "cer")
        self.bad_steps = 0         # NaN/Inf updates skipped, in total
        self.bad_in_row = 0        # ... and since the last good one
        self.train_time = 0.0      # seconds spent training, over all resumed runs
        self.last_eval_step = 0


def main(argv=None):
    args = get_args(argv)
    previous = interrupt_on_signals()   # Ctrl-C or SIGTERM while loading: one line; the training loop has its own
    try:
        train(args)
    except OSError as e:   # a disk that fills up, a folder removed while training: one line, not a traceback
        sys.exit(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except KeyboardInterrupt:   # a second Ctrl-C, or one before training began
        print(stopped_at_once("train.py", args.out), file=sys.stderr)
        sys.exit(130)
    finally:
        restore_signals(previous)


def train(args):
    ### distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        args.device = str(pick_device(args.device))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    else:
        rank, world = 0, 1
    master = rank == 0
    try:
        device, dtype = torch.device(args.device), autocast_dtype(args.dtype, args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out = args.out
    log = print if master else (lambda *a, **k: None)

    ### data
    try:
        exclude = read_line_ids(args.exclude_lines) if args.exclude_lines else set()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: --exclude-lines {e}")
    try:
        train_set = HandwritingDataset(args.data, "train", max_points=args.max_points or None,
                                       max_lines=args.max_lines or None, exclude=exclude)
        valid_set = HandwritingDataset(args.data, "valid", max_lines=args.eval_lines or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if exclude:
        if not train_set.excluded:
            sys.exit(f"error: --exclude-lines {args.exclude_lines}: none of its {len(exclude)} line ids is a training "
                     f"line of {args.data}")
        log(f"left out {train_set.excluded} training lines listed in {args.exclude_lines} (--exclude-lines)")
    if len(train_set) == 0 and args.max_points and len(HandwritingDataset(args.data, "train", max_lines=1)):
        sys.exit(f"error: no training line has at most --max-points {args.max_points} points; raise it (0 = no limit)")
    try:
        check_splits(train_set, valid_set, args.data)
    except ValueError as e:
        sys.exit(f"error: {e}")
    unknown = train_set.alphabet.unknown(args.sample_text) if args.sample_text else []
    if unknown:
        sys.exit(f"error: --sample-text has characters not in the data's alphabet: {show_chars(unknown)}; rewrite them")

    ### model and optimiser
    ckpt, source = None, None
    try:
        resume = resume_path(out, args.resume)
        source = resume or args.init_from
        if source:
            ckpt = load_checkpoint(source, flag="--resume" if resume else "--init-from")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    typed = {k: getattr(args, k) for k in MODEL_FLAGS if hasattr(args, k)}   # model-size flags on the command line
    if ckpt:
        config = ModelConfig.from_dict(ckpt["model_config"])
        if config.task != args.task:
            sys.exit(f"error: {source} is a {config.task} checkpoint; train on from it with --task {config.task}")
        if config.task == "synthesis" and ckpt.get("alphabet", train_set.alphabet.chars) != train_set.alphabet.chars:
            sys.exit(f"error: {source} was trained with another alphabet; use the data it was trained on")
        asked = [f"{flag_of(k)} {v} (it has {getattr(config, k)})" for k, v in typed.items()
                 if v != getattr(config, k)]
        if asked:
            sys.exit(f"error: {source}'s model config cannot be changed: " + ", ".join(asked) + "; drop "
                     + ("the flag" if len(asked) == 1 else "these flags")
                     + (" to go on with that run, or train a new model (another --out, no --resume)" if resume
                        else " to fine-tune it"))
        was = ckpt.get("train_args", {}).get("select_by") or "nll"
        if resume and args.select_by is None and was == "cer" and not args.recognizer:
            sys.exit(f"error: {resume} chose best.pt by legibility (--select-by cer): pass --recognizer PATH again (it "
                     f"was {ckpt['train_args'].get('recognizer')}) to go on, or --select-by nll to choose by NLL from now on")
        args.select_by = args.select_by or (was if resume else "nll")
    else:
        args.select_by = args.select_by or "nll"
        config = ModelConfig(task=args.task, **typed,
                             alphabet_size=len(train_set.alphabet.chars) if args.task == "synthesis" else 0)
    config.dropout = args.dropout   # a training setting: the flag wins over a checkpoint's
    for k in MODEL_FLAGS:                 # as trained, for train_args: tell the truth
        setattr(args, k, getattr(config, k))
    if master:   # found now, not at the first evaluation, hours later (and after the checks: no empty folder)
        try:
            writable_folder(out)
        except ValueError as e:
            sys.exit(f"error: {e}")
    torch.manual_seed(args.seed)
    model = HandwritingModel(config).to(device)
    noise = None   # learnt sigmas beside the weights; N: points of the training split (the KL is per data point)
    if args.weight_noise:
        noise = WeightNoise(model.parameters(), args.weight_noise, int(train_set.lengths.sum()), seed=args.seed)
    params = list(model.parameters()) + (noise.log_sigma if noise else [])
    optimizer = make_optimizer(args.optimizer, params, args.lr)
    run = Run()
    if ckpt and resume:
        # state kept beside the weights: the run must go on with the flag that made it, or start anew without it
        for key, flag, given, what in (("weight_noise", "--weight-noise", bool(noise), "its sigmas are restored"),
                                       ("train_weights", "--ema", bool(args.ema), "its average is restored")):
            if (key in ckpt) != given:
                sys.exit(f"error: {resume} was trained " + (f"with {flag}: pass {flag} again ({what})"
                         if not given else f"without {flag}: start a new run from its weights with --init-from and "
                         "--out NEW_FOLDER"))
        restore_training_state(ckpt, model, optimizer, run, device)
        if noise:
            noise.load_state_dict(ckpt["weight_noise"])
        log(f"resumed from {resume} at step {run.step} (epoch {run.epoch}, batch {run.batch_in_epoch})")
        done = already_done(args, run)
        if done:
            log(done)
            if ddp:
                dist.destroy_process_group()
            return
        if master:
            trim_metrics(os.path.join(out, "metrics.jsonl"), run.step)
        # the training flags come from this command line, not the checkpoint: name those that changed
        before = ckpt.get("train_args", {})
        best_by = run.best_by or before.get("select_by", "nll")
        # a figure measured on other lines or otherwise is not compared with best.pt's, nor a CER with an NLL
        if note_changed_flags(before, args, RESUME_FLAGS, MEASURE_FLAGS[args.select_by] if best_by == args.select_by
                              else (), args.select_by, log) | note_changed_data(ckpt, train_set, args.data, log) \
                | moved_run(resume, out, log):
            run.best_val = math.inf
        if best_by != args.select_by:
            log(f"--select-by {args.select_by} (the run chose best.pt by {best_by} so far): best figure reset")
            run.best_val = math.inf
    elif ckpt:   # --init-from: weights only (float16 files are cast back), a new optimiser and run
        try:
            load_weights(model, ckpt["model"], args.init_from)
        except ValueError as e:
            sys.exit(f"error: {e}")
        log(f"initialised from the weights of {args.init_from} (trained {ckpt.get('step', '?')} steps there; "
            "its model config is used)")
        was, now = checkpoint_norm(ckpt) if "mean" in ckpt else None, (train_set.mean, train_set.std)
        if was is not None and not np.allclose(was, now, rtol=1e-4):
            log(f"note: {args.init_from} was trained on data normalised otherwise (mean, std {fmt_norm(was)} there, "
                f"{fmt_norm(now)} in {args.data}): its weights go on with this data's")
    run.best_by = args.select_by
    raw_model = model
    average = None   # --ema: the averaged weights; a checkpoint's "model" holds them, "train_weights" the optimiser's
    if args.ema:
        average = WeightAverage(raw_model, args.ema)
        if ckpt and resume:   # (restore_training_state put the training weights into the model)
            average.load_state_dict(ckpt["model"])
    if args.compile:
        raw_model.compile_window_step()
    if args.cuda_graph and ddp:
        sys.exit("error: --cuda-graph runs in one process: start train.py without torchrun")
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ### legibility check (optional): a recognizer reads back validation texts written at every evaluation
    recognizer = None
    if args.recognizer:
        try:
            recognizer, rec_ckpt = load_recognizer(args.recognizer, map_location=device, flag="--recognizer")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        recognizer.to(device)
        texts = HandwritingDataset(args.data, "valid", max_lines=args.legibility_lines).texts   # not cut to --eval-lines
        legible_texts = [t for t in map(train_set.alphabet.writable, texts) if t]

    log(f"{config.task} model: {raw_model.num_params() / 1e6:.2f}M parameters, {len(train_set)} train / "
        f"{len(valid_set)} valid lines, device {device}, dtype {args.dtype}, {world} process(es)")
    copies = rare_char_copies(train_set.texts, args.rare_chars) if args.rare_chars else None
    if copies is not None:
        log(f"rare characters (--rare-chars {args.rare_chars}): {int((copies > 1).sum())} lines drawn more often, "
            f"{int(copies.sum())} entries per epoch instead of {len(copies)}")
    log("config: " + json.dumps(vars(args)) + "\nmodel config: " + json.dumps(config.to_dict()))

    def checkpoint(path, metrics):
        """Everything to continue exactly: weights, optimiser, counters, RNG, config, data stats."""
        save_checkpoint({
            **training_state(raw_model, optimizer, run, device, average),
            "model_config": config.to_dict(), "alphabet": train_set.alphabet.chars,
            "mean": [float(v) for v in train_set.mean], "std": [float(v) for v in train_set.std],
            "data_digest": train_set.data_digest, "metrics": metrics, "train_args": vars(args),
            **({"weight_noise": noise.state_dict()} if noise else {}),
        }, path)

    def nll_per_line(batches):
        total = evaluate_nll(raw_model, batches, device, dtype)
        if ddp:
            dist.all_reduce(total)
        return summarize_nll(total)

    def evaluate():
        """Validation NLL over all processes; on rank 0 also a sample, metrics row, plots and checkpoints.
        With --ema all of it uses the averaged weights, and the training weights' NLL is logged beside them."""
        loader = make_loader(valid_set, args.batch_size, shuffle=False)
        batches = list(loader)[rank::world]
        raw = {"val_raw_nll_per_line": nll_per_line(batches)["nll_per_line"]} if average else {}
        with average.swapped_in() if average else contextlib.nullcontext():
            metrics = {"step": run.step, "epoch": run.epoch, "train_loss": run_loss.mean(),
                       **{f"val_{k}": v for k, v in nll_per_line(batches).items()}, **raw,
                       "points_per_s": run_loss.points / max(run_loss.seconds, 1e-9), "bad_steps": run.bad_steps,
                       "lr": optimizer.param_groups[0]["lr"],
                       "train_minutes": run.train_time / 60}
            if noise:   # the description length per point that the loss adds, and the sigmas' typical size
                metrics.update(kl_per_point=float(noise.kl),
                               sigma_rms=math.sqrt(sum(float(ls.detach().mul(2).exp().sum()) for ls in noise.log_sigma) / noise.n))
            run.last_eval_step = run.step
            if master and recognizer is not None:   # same texts and seed every time: comparable between evaluations
                generator = torch.Generator(device=device).manual_seed(args.seed)
                _, read, finished, *_ = write_and_read(
                    raw_model, recognizer, legible_texts, train_set.alphabet, Alphabet(rec_ckpt["alphabet"]),
                    (train_set.mean, train_set.std), (rec_ckpt["mean"], rec_ckpt["std"]), args.legibility_bias,
                    generator, args.batch_size)
                rates = error_rates(legible_texts, read)
                metrics.update(val_cer=rates["cer"], val_last_word_wrong=rates["last_word_wrong"],
                               val_finished=sum(finished) / len(finished))
            if master:
                save_sample_image(raw_model, train_set.alphabet, train_set.mean, train_set.std,
                                  os.path.join(out, f"sample_{run.step:06d}.png"), text=args.sample_text or SAMPLE_TEXT,
                                  seed=args.seed)
        raw_model.train()
        if not master:
            return metrics
        key = "val_cer" if args.select_by == "cer" else "val_nll_per_line"
        improved = metrics[key] < run.best_val
        run.best_val = min(run.best_val, metrics[key])
        checkpoint(os.path.join(out, "last.pt"), metrics)                 # first: a row never runs ahead of last.pt
        if improved:
            checkpoint(os.path.join(out, "best.pt"), metrics)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        plot_loss_curve(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss.png"))
        log(f"step {run.step}: val {metrics['val_nll_per_line']:.1f} nats/line ({metrics['val_nll_per_point']:.3f}/point), "
            + (f"training weights {metrics['val_raw_nll_per_line']:.1f}, " if average else "")
            + f"train {metrics['train_loss']:.3f}/point, {metrics['points_per_s']:.0f} points/s"
            + (f", window focus {metrics['val_window_focus']:.2f}" if "val_window_focus" in metrics else "")
            + (f", CER {metrics['val_cer']:.3f} ({metrics['val_finished']:.0%} finished)" if "val_cer" in metrics else "")
            + (" *best*" if improved else ""))
        return metrics

    graphed = None
    if args.cuda_graph:
        t0 = time.time()
        graphed = GraphedChunk(raw_model, args.batch_size, args.tbptt, max(map(len, train_set.text_ids)), dtype)
        log(f"CUDA graph of a {args.batch_size} x {args.tbptt}-point chunk recorded in {time.time() - t0:.1f} s"
            if graphed.graph else "--cuda-graph without CUDA: the chunks run eagerly through the same buffers")

    ### Ctrl-C, or SIGTERM (`timeout`, `kill`, job schedulers): finish the current batch, evaluate, save, exit
    stop = {"why": None}
    stop_on_signals(stop, lambda message: log(message))   # (log: the progress bar's, once it exists)

    ### training loop
    run_loss = RunningLoss()
    model.train()
    t_start = time.time()
    progress = None
    if master and not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(initial=run.step, total=args.max_steps or None, unit="step", dynamic_ncols=True)
        log = progress.write   # log lines above the bar, not stuck to its end (evaluate() and train_batch use it)
    metrics = None
    while stop["why"] is None and run.epoch < args.epochs:
        loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed + run.epoch, copies=copies)
        batches = list(loader.batch_sampler)
        batches = batches[: len(batches) // world * world][rank::world]       # equal count on every rank
        for b in range(run.batch_in_epoch, len(batches)):
            batch = loader.collate_fn([train_set[i] for i in batches[b]])
            t0 = time.time()
            if args.augment_scale or args.augment_shear:
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + run.step)   # a function of the step: resumable
                batch["strokes"] = augment(batch["strokes"], batch["stroke_mask"], train_set.mean.tolist(),
                                           train_set.std.tolist(), g, args.augment_scale, args.augment_shear)
            decayed = None   # --schedule cosine over --time-limit: the share of this call's minutes gone
            if args.schedule == "cosine" and not args.max_steps:
                decayed = (time.time() - t_start) / (args.time_limit * 60)
                if ddp:          # rank 0's clock, so that every rank steps with the same learning rate
                    shared = torch.tensor(decayed, device=device)
                    dist.broadcast(shared, 0)
                    decayed = float(shared)
            train_batch(model, raw_model, optimizer, batch, args, device, dtype, run, run_loss, log, graphed, noise, average,
                        decayed)
            run.batch_in_epoch = b + 1
            run.train_time += time.time() - t0
            if progress is not None:   # (a bar without a total has no truth value)
                progress.n = run.step
                progress.set_postfix(loss=f"{run_loss.recent():.3f}", pts_s=f"{run_loss.points / max(run_loss.seconds, 1e-9):.0f}",
                                     epoch=run.epoch, refresh=False)
                progress.refresh()
            if run.bad_in_row >= args.max_bad_steps:
                stop["why"] = (f"{args.max_bad_steps} NaN/Inf steps in a row; lower --lr or --clip"
                               + (", or use --dtype float32" if args.dtype != "float32" else ""))
            elif args.max_steps and run.step >= args.max_steps:
                stop["why"] = "max steps"
            elif args.time_limit and time.time() - t_start >= args.time_limit * 60:
                stop["why"] = "time limit"
            if ddp:   # every rank stops together
                flag = torch.tensor([stop["why"] is not None], dtype=torch.float32, device=device)
                dist.all_reduce(flag)
                if flag.item() and stop["why"] is None:
                    stop["why"] = "stopped on another rank"
            if stop["why"] or run.step // args.eval_interval > run.last_eval_step // args.eval_interval:   # multiples
                metrics = evaluate()
                run_loss = RunningLoss()
            if stop["why"]:
                break
        else:
            run.epoch += 1
            run.batch_in_epoch = 0
    if stop["why"] is None:
        stop["why"] = "epochs done"
        if run.step != run.last_eval_step or metrics is None:
            metrics = evaluate()
    if progress is not None:
        progress.close()
    if master and os.path.exists(os.path.join(out, "best.pt")):   # weights only, float16: what checkpoints/ ships
        export_weights(load_checkpoint(os.path.join(out, "best.pt")), os.path.join(out, "model.pt"))
    if metrics:
        log(f"done ({stop['why']}): {run.step} steps, {run.epoch} epochs, {run.train_time / 60:.1f} min training, "
            f"val {metrics['val_nll_per_line']:.1f} nats/line (best {args.select_by} {run.best_val:{'.1f' if args.select_by == 'nll' else '.4f'}}), {run.bad_steps} skipped steps; "
            f"checkpoints in {out}")
    if ddp:
        dist.barrier()           # rank 0 may still be writing checkpoints
        dist.destroy_process_group()
    if stop["why"].startswith(str(args.max_bad_steps)):
        sys.exit(f"error: {stop['why']}")
    if stop["why"] == "interrupted":
        sys.exit(130)                                   # saved, but not done: a job script can tell


def fmt_norm(norm):
    """[mean (2,), std (2,)] -> '(8.30, -0.13), (42.43, 37.10)' for a log line."""
    return ", ".join("(" + ", ".join(f"{v:.2f}" for v in pair) + ")" for pair in norm)


class RunningLoss:
    """Training loss and throughput since the last evaluation."""

    def __init__(self):
        self.nll, self.points, self.seconds, self.last = 0.0, 0, 0.0, []

    def add(self, nll_sum, points, seconds):
        self.nll += nll_sum
        self.points += points
        self.seconds += seconds
        self.last = (self.last + [nll_sum / max(points, 1)])[-20:]

    def mean(self):
        return self.nll / max(self.points, 1)

    def recent(self):
        return sum(self.last) / max(len(self.last), 1)


def train_batch(model, raw_model, optimizer, batch, args, device, dtype, run, run_loss, log, graphed=None, noise=None,
                average=None, decayed=None):
    """Truncated BPTT over one batch: one optimiser step per chunk, state carried and detached (in graphed's
    buffers with --cuda-graph). Losses and skipped steps are summed on the device and read once, at the end.
    noise (WeightNoise): one draw of the weights for the whole batch, mu restored around every update.
    average (WeightAverage): follows the weights after every update.
    decayed (0 to 1): how far a cosine schedule has gone, if not by steps (the batch's share of a time budget)."""
    t0 = time.time()
    strokes, mask = batch["strokes"].to(device, non_blocking=True), batch["stroke_mask"].to(device, non_blocking=True)
    text = batch["text"].to(device, non_blocking=True) if raw_model.synthesis else None
    inputs, targets, tmask = teacher_forcing(strokes, mask)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # every rank must run the same number of chunks (one gradient all-reduce each): pad to the longest
        T = torch.tensor(inputs.shape[1], device=device)
        dist.all_reduce(T, op=dist.ReduceOp.MAX)
        pad = int(T) - inputs.shape[1]
        inputs, targets = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (inputs, targets))
        tmask = torch.nn.functional.pad(tmask, (0, pad))
    T = inputs.shape[1]
    chunk = args.tbptt or T
    state = None
    if graphed:
        graphed.reset(text)
    # on the device: nats and points of the steps taken, steps skipped, skipped in a row
    nats, points, skipped = (torch.zeros((), device=device) for _ in range(3))
    in_row = torch.tensor(float(run.bad_in_row), device=device)
    chunks = 0
    params = [p for group in optimizer.param_groups for p in group["params"]]   # the weights (and sigmas) it steps
    if noise:
        noise.sample(run.step)
    for start in range(0, T, chunk):
        sl = slice(start, start + chunk)
        if noise:
            noise.perturb()
        if graphed:   # forward and backward replayed; .grad belongs to the graph (never zeroed here)
            loss_sum, n = graphed.step(inputs[:, sl], targets[:, sl], tmask[:, sl])
        else:
            optimizer.zero_grad(set_to_none=True)
            loss_sum, n, state = chunk_backward(model, inputs[:, sl], targets[:, sl], tmask[:, sl], text, state, dtype)
            state = state.detach()
        if noise:
            noise.restore()                          # mu back, and the gradients of NLL + KL / N
        for group in optimizer.param_groups:        # (a skipped step shifts the schedule of this batch's later chunks)
            group["lr"] = learning_rate(run.step + chunks, args.max_steps, args.lr, args.warmup, args.schedule, decayed)
        ok = clipped_step(optimizer, params, loss_sum, args.clip)
        if average:   # (after a skipped update it moves towards the unchanged weights)
            average.update(run.step + chunks)
        chunks += 1
        nats += torch.where(ok, loss_sum, 0)    # graphed's loss_sum is rewritten by the next replay: add it now
        points += torch.where(ok, n, 0)
        skipped += ~ok
        in_row = torch.where(ok, 0, in_row + 1)
    nats, points, skipped, in_row = torch.stack([nats, points, skipped, in_row]).tolist()   # the one host sync
    run.step += chunks - int(skipped)
    run.bad_steps += int(skipped)
    run.bad_in_row = int(in_row)
    if skipped:
        log(f"step {run.step}: {int(skipped)} of {chunks} updates skipped in this batch (non-finite loss or gradient; "
            f"{run.bad_steps} so far)")
    run_loss.add(nats, int(points), time.time() - t0)


if __name__ == "__main__":
    main()
