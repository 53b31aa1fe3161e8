"""
Online handwriting recognizer for IAM-OnDB lines (CTC), the legibility measure of evaluate.py --legibility.

    python recognizer.py train --data data/processed --out checkpoints/recognizer
    python recognizer.py read data/processed/iam_ondb.npz:a01-000u-01     # a prepared line, by its line id
    python recognizer.py read samples/hello.npz                            # lines saved by generate.py --save-strokes
    python recognizer.py evaluate --checkpoint checkpoints/recognizer.pt --split test

The network (recognition.py) reads the same normalised (dx, dy, eos) sequences as the handwriting
model: strided 1-D convolutions (4x fewer frames than points), a bidirectional LSTM, and per-frame character
probabilities trained with CTC; it reads by greedy (best path) decoding, with no dictionary or language model.
`train` writes last.pt / best.pt (lowest validation CER) atomically and resumes exactly; at the end model.pt holds
best.pt's weights in float16 without optimiser state (checkpoints/recognizer.pt is such a file).
CER = total edit distance / total reference characters; WER the same over words.
"""
import argparse
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

from dataset import Alphabet, HandwritingDataset, augment, check_splits, make_loader, normalize
from recognition import Recognizer, RecognizerConfig, ctc_loss, error_rates, load_recognizer, read_lines
from utils import (DefaultsHelpFormatter, OneLineParser, already_done, at_least, checkpoint_norm, export_weights,
                   finite_float, flag_of, interrupt_on_signals, learning_rate, load_checkpoint, load_strokes,
                   moved_run, note_changed_data, note_changed_flags, output_extension, pick_device, quiet_broken_pipe,
                   restore_signals, restore_training_state, resume_path, save_checkpoint, stop_on_signals,
                   stopped_at_once, training_state, trim_metrics, writable_folder, write_jsonl)

DEFAULT_CHECKPOINT = "checkpoints/recognizer.pt"
CKPT = dict(config_key="recognizer_config", writer="recognizer.py train")   # what load_checkpoint expects here


SIZE_FLAGS = ("conv_channels", "conv_layers", "kernel_size", "downsample", "hidden_size", "layers", "dropout")
# training flags that shape a run: on --resume, those given otherwise than the run's are named
RESUME_FLAGS = ("data", "lr", "warmup", "schedule", "batch_size", "clip", "max_steps", "augment_scale", "augment_shear",
                "max_points", "max_lines", "eval_lines", "seed")


def get_args(argv=None):
    fmt = DefaultsHelpFormatter
    p = OneLineParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,read,evaluate}")

    t = sub.add_parser("train", help="train on the train split, CER on valid every --eval-interval steps", formatter_class=fmt)
    t.add_argument("--data", default="data/processed", help="folder with iam_ondb.npz from prepare_data.py, or the .npz itself")
    t.add_argument("--out", default="checkpoints/recognizer", help="run folder: last.pt, best.pt, model.pt, metrics.jsonl")
    t.add_argument("--resume", default=None, help="checkpoint to resume from (a last.pt); 'auto' = OUT/last.pt if it exists")
    # the network's size: defaults are RecognizerConfig's; on --resume the checkpoint's, which a typed flag may not
    # contradict (SUPPRESS: a flag not typed is absent from args)
    size = lambda flag, kind, what: t.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=what + (
        f" (default: {getattr(RecognizerConfig, flag[2:].replace('-', '_'))}; with --resume the checkpoint's)"))
    size("--conv-channels", at_least(1), "channels of the 1-D convolutions")
    size("--conv-layers", at_least(1), "1-D convolutions before the LSTM")
    size("--kernel-size", at_least(1), "convolution width in points (odd)")
    size("--downsample", at_least(1), "points per frame (a power of 2: stride-2 convolutions); a character spans about "
         "21 points and CTC needs at least one frame per character")
    size("--hidden-size", at_least(1), "LSTM cells per direction")
    size("--layers", at_least(1), "bidirectional LSTM layers")
    size("--dropout", finite_float, "dropout after the convolutions and between LSTM layers")
    t.add_argument("--lr", type=at_least(0.0, exclusive=True), default=2e-3, help="peak learning rate (Adam)")
    t.add_argument("--warmup", type=at_least(0), default=100, help="steps of linear learning-rate warm-up")
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warm-up: cosine decay to lr/20 over --max-steps (or over --epochs when --max-steps is 0), or constant")
    t.add_argument("--batch-size", type=at_least(1), default=32, help="lines per batch")
    t.add_argument("--clip", type=at_least(0.0), default=5.0, help="clip the gradient norm to this (0 = off)")
    t.add_argument("--epochs", type=at_least(1), default=60, help="passes over the training split (stops at whichever of epochs/max-steps/time-limit comes first)")
    t.add_argument("--max-steps", type=at_least(0), default=5500, help="stop after this many optimiser steps (0 = no limit; 5,500 = 18 epochs, as for the shipped model)")
    t.add_argument("--time-limit", type=at_least(0.0), default=0, help="stop after this many minutes of wall time in this call (a resumed run counts afresh), then evaluate and save (0 = no limit)")
    t.add_argument("--augment-scale", type=at_least(0.0, below=1.0), default=0.1, help="random size change per line, +- this fraction (0 = off)")
    t.add_argument("--augment-shear", type=at_least(0.0), default=0.15, help="random slant per line: dx += k dy with |k| <= this (0 = off)")
    t.add_argument("--max-points", type=at_least(0), default=0, help="drop training lines longer than this many points (0 = keep all)")
    t.add_argument("--max-lines", type=at_least(0), default=0, help="use only the first N training lines (0 = all; quick runs)")
    t.add_argument("--eval-interval", type=at_least(1), default=500, help="steps between validation CER, metrics row and checkpoints")
    t.add_argument("--eval-lines", type=at_least(0), default=0, help="validation lines to read (0 = the whole split)")
    t.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    t.add_argument("--seed", type=at_least(0, below=2 ** 31), default=1337, help="random seed (initialisation, data order, augmentation)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")

    r = sub.add_parser("read", help="print the text of handwritten lines", formatter_class=fmt,
                       description="FILE is a strokes .npz (prepare_data.py's iam_ondb.npz; generate.py's --out FILE.npz "
                                   "or --save-strokes; evaluate.py --legibility's generated.npz): FILE reads every line in it, FILE:LINE_ID one line (e.g. "
                                   "data/processed/iam_ondb.npz:a01-000u-01; generate.py numbers its lines 1, 2, ...).")
    r.add_argument("files", nargs="+", metavar="FILE[:LINE_ID]", help="strokes file, optionally with a line id")
    r.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="recognizer checkpoint (model.pt, best.pt or last.pt of a run)")
    r.add_argument("--compare", action="store_true", help="also print each line's id, stored text and CER, and the total CER")
    r.add_argument("--batch-size", type=at_least(1), default=64, help="lines read at once")
    r.add_argument("--device", default="cpu", help="torch device")

    e = sub.add_parser("evaluate", help="CER and WER on a split of the prepared data (prints JSON)", formatter_class=fmt)
    e.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="recognizer checkpoint")
    e.add_argument("--data", default="data/processed", help="folder with iam_ondb.npz, or the .npz itself")
    e.add_argument("--split", choices=["train", "valid", "test"], default="test", help="which split to read")
    e.add_argument("--max-lines", type=at_least(0), default=0, help="read only the first N lines of the split (0 = all)")
    e.add_argument("--batch-size", type=at_least(1), default=64, help="lines read at once")
    e.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    e.add_argument("--out", default=None, help="also write one JSON row per line (id, text, recognised, cer) to this .jsonl file")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    previous = interrupt_on_signals()   # Ctrl-C or SIGTERM: one line (training has its own handler, see train)
    try:
        code = {"train": train, "read": read, "evaluate": evaluate}[args.command](args)
        sys.stdout.flush()                              # here, so that a closed pipe is caught below
        return code or 0
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:                           # a second Ctrl-C in training, or one while reading
        print(stopped_at_once("recognizer.py", args.out) if args.command == "train" else "recognizer.py: interrupted",
              file=sys.stderr)
        return 130
    except BrokenPipeError:                             # `recognizer.py read ... | head`: what head wanted was read
        quiet_broken_pipe()
        return 0
    finally:
        restore_signals(previous)


### evaluate: CER / WER on a split

def evaluate(args):
    if args.out:                                        # a .jsonl, not the data or checkpoint read
        output_extension(args.out, (".jsonl",), "--out", reads=(args.checkpoint,))
    device = pick_device(args.device)
    model, ckpt = load_recognizer(args.checkpoint, map_location=device)
    dataset = HandwritingDataset(args.data, args.split, max_lines=args.max_lines or None)
    if not len(dataset):
        raise ValueError(f"the {args.split} split of {args.data} has no lines; choose another --split")
    dataset.set_normalization(ckpt["mean"], ckpt["std"])           # the scale the recognizer was trained on
    hyps = read_lines(model.to(device), [dataset[i][0] for i in range(len(dataset))], Alphabet(ckpt["alphabet"]),
                      args.batch_size)
    if args.out:
        write_jsonl(args.out, [{"id": dataset.line_ids[i], "text": ref, "recognised": hyp,
                                "cer": error_rates([ref], [hyp])["cer"]} for i, (ref, hyp) in enumerate(zip(dataset.texts, hyps))])
    print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, "step": ckpt.get("step"),
                      **error_rates(dataset.texts, hyps)}))


### read: lines of a strokes file

def read_spec(spec):
    """'FILE' or 'FILE:LINE_ID' -> (ids, texts, raw offsets) of the lines it names."""
    path, line_id = spec, None
    if not os.path.isfile(spec) and ":" in spec:
        path, line_id = spec.rsplit(":", 1)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path or '(no file name)'} not found; give FILE or FILE:LINE_ID, FILE a strokes .npz (prepare_data.py's "
                                f"iam_ondb.npz, generate.py's --out FILE.npz or --save-strokes, evaluate.py's generated.npz)")
    ids, texts, lines = load_strokes(path)
    if line_id is None:
        return ids, texts, lines
    if line_id not in ids:
        raise ValueError(f"no line {line_id!r} in {path} (its ids: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})")
    i = ids.index(line_id)
    return [ids[i]], [texts[i]], [lines[i]]


def read(args):
    device = pick_device(args.device)
    model, ckpt = load_recognizer(args.checkpoint, map_location=device)
    ids, refs, lines = [], [], []
    for spec in args.files:
        i, t, ln = read_spec(spec)
        ids += i
        refs += t
        lines += ln
    if not lines:
        raise ValueError(f"no lines in {', '.join(args.files)}")
    mean, std = checkpoint_norm(ckpt, np.float32)
    strokes = [torch.from_numpy(normalize(ln, mean, std)) for ln in lines]
    hyps = read_lines(model.to(device), strokes, Alphabet(ckpt["alphabet"]), args.batch_size)
    for line_id, ref, hyp in zip(ids, refs, hyps):
        if args.compare:
            cer = f"CER {error_rates([ref], [hyp])['cer']:.3f}" if ref else "no text to compare with"
            print(f"{line_id}  {cer}\n  text:       {ref}\n  recognised: {hyp}")
        else:
            print(hyp)
    with_text = [i for i, ref in enumerate(refs) if ref]     # unconditional scribbles have none
    if args.compare and len(with_text) > 1:
        r = error_rates([refs[i] for i in with_text], [hyps[i] for i in with_text])
        print(f"total: CER {r['cer']:.4f}, WER {r['wer']:.4f} over {r['lines']} lines"
              + (f" ({len(ids) - len(with_text)} without text left out)" if len(with_text) < len(ids) else ""))


### train

class Run:
    """Counters a checkpoint saves, so that --resume continues exactly."""

    def __init__(self):
        self.step = 0              # optimiser steps done
        self.epoch = 0
        self.batch_in_epoch = 0    # batches of the current epoch already done
        self.best_cer = math.inf
        self.bad_steps = 0         # non-finite updates skipped
        self.train_time = 0.0      # seconds spent training, over all resumed runs
        self.last_eval_step = 0


def train(args):
    device = pick_device(args.device)
    train_set = HandwritingDataset(args.data, "train", max_points=args.max_points or None, max_lines=args.max_lines or None)
    valid_set = HandwritingDataset(args.data, "valid", max_lines=args.eval_lines or None)
    if len(train_set) == 0 and args.max_points and len(HandwritingDataset(args.data, "train", max_lines=1)):
        raise ValueError(f"no training line has at most --max-points {args.max_points} points; raise it (0 = no limit)")
    check_splits(train_set, valid_set, args.data)
    alphabet = train_set.alphabet
    out = args.out
    resume = resume_path(out, args.resume)
    ckpt = load_checkpoint(resume, **CKPT, flag="--resume") if resume else None
    typed = {k: getattr(args, k) for k in SIZE_FLAGS if hasattr(args, k)}
    if ckpt:
        config = RecognizerConfig.from_dict(ckpt["recognizer_config"])
        if ckpt["alphabet"] != alphabet.chars:
            raise ValueError(f"{resume} was trained with another alphabet; use the data it was trained on")
        asked = [f"{flag_of(k)} {v} (it has {getattr(config, k)})" for k, v in typed.items()
                 if v != getattr(config, k)]
        if asked:
            raise ValueError(f"{resume}'s network cannot be changed: {', '.join(asked)}; drop "
                             f"{'the flag' if len(asked) == 1 else 'these flags'} to go on with that run, or train a "
                             f"new one (another --out, no --resume)")
    else:
        config = RecognizerConfig(**typed, alphabet_size=len(alphabet.chars))
    for k in SIZE_FLAGS:                                  # as trained, for train_args
        setattr(args, k, getattr(config, k))
    writable_folder(out)                                  # found now, not at the first evaluation
    torch.manual_seed(args.seed)
    model = Recognizer(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    run = Run()
    if ckpt:
        restore_training_state(ckpt, model, optimizer, run, device)
        print(f"resumed from {resume} at step {run.step} (epoch {run.epoch}, batch {run.batch_in_epoch})")
        done = already_done(args, run)
        if done:
            print(done)
            return 0
        trim_metrics(os.path.join(out, "metrics.jsonl"), run.step)
        if note_changed_flags(ckpt.get("train_args", {}), args, RESUME_FLAGS, ("data", "eval_lines"), "the validation CER",
                              print) | note_changed_data(ckpt, train_set, args.data, print) | moved_run(resume, out, print):
            run.best_cer = math.inf                       # a CER on other lines is not compared with best.pt's
    mean, std = train_set.mean.tolist(), train_set.std.tolist()
    batches_per_epoch = len(make_loader(train_set, args.batch_size, shuffle=True).batch_sampler)
    total_steps = args.max_steps or args.epochs * batches_per_epoch
    print(f"recognizer: {model.num_params() / 1e6:.2f}M parameters, {len(train_set)} train / {len(valid_set)} valid "
          f"lines, {len(alphabet.chars)} characters, device {device}")
    print("config: " + json.dumps(vars(args)))

    def checkpoint(path, metrics):
        save_checkpoint({
            **training_state(model, optimizer, run, device),
            "recognizer_config": config.to_dict(), "alphabet": alphabet.chars, "mean": mean, "std": std,
            "data_digest": train_set.data_digest,
            "metrics": metrics, "train_args": vars(args),
        }, path)

    def validate():
        t0 = time.time()
        hyps = read_lines(model, [valid_set[i][0] for i in range(len(valid_set))], alphabet, batch_size=64)
        model.train()
        rates = error_rates(valid_set.texts, hyps)
        metrics = {"step": run.step, "epoch": run.epoch, "train_loss": stats["loss"] / max(stats["chars"], 1),
                   "val_cer": rates["cer"], "val_wer": rates["wer"], "val_lines": rates["lines"],
                   "lines_per_s": stats["lines"] / max(stats["seconds"], 1e-9), "eval_seconds": time.time() - t0,
                   "lr": learning_rate(run.step, total_steps, args.lr, args.warmup, args.schedule), "train_minutes": run.train_time / 60,
                   "bad_steps": run.bad_steps, "example": {"text": valid_set.texts[0], "recognised": hyps[0]}}
        improved = metrics["val_cer"] < run.best_cer
        run.best_cer = min(run.best_cer, metrics["val_cer"])
        run.last_eval_step = run.step
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        checkpoint(os.path.join(out, "last.pt"), metrics)
        if improved:
            checkpoint(os.path.join(out, "best.pt"), metrics)
        log(f"step {run.step}: val CER {metrics['val_cer']:.4f}, WER {metrics['val_wer']:.4f}, train "
            f"{metrics['train_loss']:.3f} nats/char, {metrics['lines_per_s']:.1f} lines/s"
            + (" *best*" if improved else "") + f"  [{hyps[0]!r}]")
        return metrics

    stop = {"why": None}
    stop_on_signals(stop, lambda message: log(message))   # (log: the progress bar's, once it exists)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(initial=run.step, total=args.max_steps or total_steps, unit="step", dynamic_ncols=True)
    log = progress.write if progress else print
    stats = {"loss": 0.0, "chars": 0, "lines": 0, "seconds": 0.0}
    metrics, t_start = None, time.time()
    model.train()
    while stop["why"] is None and run.epoch < args.epochs:
        loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed + run.epoch)
        batches = list(loader.batch_sampler)
        for b in range(run.batch_in_epoch, len(batches)):
            t0 = time.time()
            batch = loader.collate_fn([train_set[i] for i in batches[b]])
            strokes, mask = batch["strokes"].to(device), batch["stroke_mask"].to(device)
            if args.augment_scale or args.augment_shear:
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + run.step)   # a function of the step: resumable
                strokes = augment(strokes, mask, mean, std, g, args.augment_scale, args.augment_shear)
            targets, target_lengths = batch["text"].to(device), batch["text_mask"].sum(dim=1).to(device)
            log_probs, frames = model(strokes, mask.sum(dim=1))
            loss_sum = ctc_loss(log_probs, frames, targets, target_lengths)
            loss = loss_sum / target_lengths.sum().clamp(min=1)                   # nats per character
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run.step, total_steps, args.lr, args.warmup, args.schedule)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # why clip: CTC gradients spike on lines whose alignment is barely feasible (few frames per character)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
            if torch.isfinite(loss) and torch.isfinite(gnorm):
                optimizer.step()
                run.step += 1
                stats["loss"] += loss_sum.item()
                stats["chars"] += int(target_lengths.sum())
                stats["lines"] += len(batches[b])
            else:
                run.bad_steps += 1
                log(f"step {run.step}: non-finite loss or gradient, update skipped ({run.bad_steps} so far)")
            run.batch_in_epoch = b + 1
            dt = time.time() - t0
            run.train_time += dt
            stats["seconds"] += dt
            if progress:
                progress.n = run.step
                progress.set_postfix(loss=f"{loss.item():.3f}", lines_s=f"{stats['lines'] / max(stats['seconds'], 1e-9):.1f}",
                                     epoch=run.epoch, refresh=False)
                progress.refresh()
            if args.max_steps and run.step >= args.max_steps:
                stop["why"] = "max steps"
            elif args.time_limit and time.time() - t_start >= args.time_limit * 60:
                stop["why"] = "time limit"
            if stop["why"] or run.step - run.last_eval_step >= args.eval_interval:
                metrics = validate()
                stats = {"loss": 0.0, "chars": 0, "lines": 0, "seconds": 0.0}
            if stop["why"]:
                break
        else:
            run.epoch += 1
            run.batch_in_epoch = 0
    if stop["why"] is None:
        stop["why"] = "epochs done"
        if metrics is None or run.step != run.last_eval_step:
            metrics = validate()
    if progress:
        progress.close()
    export_weights(load_checkpoint(os.path.join(out, "best.pt"), **CKPT), os.path.join(out, "model.pt"))
    print(f"done ({stop['why']}): {run.step} steps, {run.epoch} epochs, {run.train_time / 60:.1f} min training, "
          f"val CER {metrics['val_cer']:.4f} (best {run.best_cer:.4f}), {run.bad_steps} skipped steps; "
          f"{out}/model.pt holds the best weights (evaluate.py --recognizer {out}/model.pt uses them)")
    return 130 if stop["why"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
