"""
Evaluate a trained network on a split of the prepared data, in Graves' units, or how legible its writing is.

    python evaluate.py --checkpoint checkpoints/synthesis.pt --data data/processed --split test
    python evaluate.py --checkpoint checkpoints/synthesis.pt --legibility --bias 1 [--prompts FILE]

Prints one JSON object: nll_per_line (mean nats per line, the paper's figure), nll_per_point, sse (mean
squared error of the mixture's expected next offset, normalised units, per point), lines, points, and for synthesis
window_focus (the mean largest share of the window phi on one character; with --text-ablation also
text_worth_per_line, how much worse each line scores with another line's text). When the data's std is not the
checkpoint's (prepared with other settings), also nll_per_line_in_data_units: the same NLL with the offsets measured
in the data's std, the units of a model trained on that data.

--legibility writes every prompt line with the synthesis model (batched, fixed seed) and reads it back with the
recognizer (recognizer.py); it prints cer_generated, cer_real (the recognizer on the real lines of the same texts),
finished_fraction (lines whose window reached the end of the text within the step cap), lines, bias, steps per
character and, with --retries, attempts per line, and writes
OUT/legibility.jsonl (one row per line), OUT/worst.png (the least legible lines) and OUT/generated.npz (the strokes).
With --style N (or --prime-file FILE, your own handwriting) every prompt is written in that style (priming, as
generate.py does) and only the new writing is read. With --candidates K every prompt is written K times and the
attempt the --pick-with recognizer reads best is kept (as generate.py --candidates does); read the lines with another
--recognizer (checkpoints/judge.pt) for a fair figure.
"""
import json
import os
import signal
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads sleep, not spin: on cores other jobs use,
                                                    # spinning made runs 10-40x slower (README, Troubleshooting)
if __name__ == "__main__":   # Ctrl-C while the libraries load (torch: 1-2 s): stop quietly, not with a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # main() then reports an interrupt in one line

import numpy as np
import torch

from dataset import Alphabet, HandwritingDataset, collate, make_loader, prime_strokes
from model import WINDOW_MISFIT, PrimeMisfitWarning, evaluate_nll, line_sums, load_model, score_lines, summarize_nll
from recognition import error_rates, legibility_score, load_recognizer, read_lines, write_and_read
from utils import (DTYPES, DefaultsHelpFormatter, MAX_BIAS, MAX_CANDIDATES, MAX_LINE_CHARS, MAX_RETRIES,
                   MOST_STEPS_PER_CHAR, OneLineParser, at_least, autocast_dtype, bias_value, checkpoint_norm, flag_of,
                   interrupt_on_signals, load_checkpoint, load_prime, output_extension, pick_device, plot_lines,
                   prime_file_reword, quiet_broken_pipe, relay_warnings, restore_signals, sampling_flag_errors,
                   save_strokes, size_drift, warn_unwritten, writable_folder, write_jsonl)


LEGIBILITY_FLAGS = ("prompts", "recognizer", "bias", "seed", "max_steps_per_char", "retries", "retry_above", "style",
                    "prime_file", "styles", "worst", "out", "candidates", "pick_with")
NLL_FLAGS = ("dtype", "text_ablation", "per_line")


def get_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/synthesis.pt", help="checkpoint written by train.py (last.pt, best.pt or a shipped one)")
    p.add_argument("--data", default="data/processed", help="folder with iam_ondb.npz, or the .npz itself")
    p.add_argument("--split", choices=["train", "valid", "test"], default=None,
                   help="which split to evaluate; none given: valid, or with --legibility test (its lines give the "
                        "default prompts and the real handwriting)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="lines per batch")
    p.add_argument("--max-lines", type=at_least(0), default=0, help="evaluate only the first N lines of the split, or prompts (0 = all)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype (on a CPU, bfloat16 only where its oneDNN LSTM has a kernel, e.g. AVX-512 Zen 4; float16 on none tried; else a one-line error); the loss is always float32")
    p.add_argument("--text-ablation", action="store_true",
                   help="synthesis: also score every line with the next line's text; text_worth_per_line is how many "
                        "nats per line the right text is worth to the model (a model that writes the text leans on it)")
    p.add_argument("--per-line", default=None, metavar="FILE.jsonl",
                   help="also write every line's scores, one JSON object per line: line_id, writer, text, points, nll "
                        "(nats) and for synthesis window_end (characters; far below 0: the ink stops short of its "
                        "text, a word the pen did not write)")
    g = p.add_argument_group("legibility")
    g.add_argument("--legibility", action="store_true",
                   help="write every prompt with the synthesis model and read it back with --recognizer (CER, not NLL)")
    g.add_argument("--prompts", default=None, help="UTF-8 text file, one line of text per line; none given: the transcriptions of --split")
    g.add_argument("--recognizer", default="checkpoints/recognizer.pt", help="recognizer checkpoint (recognizer.py train)")
    g.add_argument("--bias", type=bias_value, default=1.0, help=f"sampling bias (paper section 5.4, eq. 61-62; 0 = unbiased, at most {MAX_BIAS})")
    g.add_argument("--seed", type=at_least(0, below=2 ** 63), default=0, help="sampling seed (the same seed and batch size give the same lines)")
    g.add_argument("--max-steps-per-char", type=at_least(1, below=MOST_STEPS_PER_CHAR + 1), default=40,
                   help=f"step cap: a line stops after this many points per character, at most {MOST_STEPS_PER_CHAR} "
                        f"(real lines take about 21)")
    g.add_argument("--retries", type=at_least(0, below=MAX_RETRIES + 1), default=2,
                   help="write a stalled line again (it reached the cap or took more than --retry-above), up to N more "
                        "times, keeping the best attempt, as generate.py does; 0 = the model's own first attempt")
    g.add_argument("--retry-above", type=at_least(0.0), default=32,
                   help="with --retries, a line that took more than this many points per character counts as stalled, "
                        "as in generate.py (real lines take about 21; 0 = only lines that reach the cap)")
    g.add_argument("--candidates", type=at_least(1, below=MAX_CANDIDATES + 1), default=1,
                   help="write every prompt K times and keep the attempt --pick-with reads most surely as its text, as "
                        "generate.py --candidates does")
    g.add_argument("--pick-with", default="checkpoints/recognizer.pt",
                   help="with --candidates, the recognizer that ranks the attempts; read by the same --recognizer, "
                        "the lines are judged by the reader that chose them: read them with --recognizer "
                        "checkpoints/judge.pt (a second recognizer, trained apart) for a fair figure")
    prime = g.add_mutually_exclusive_group()
    prime.add_argument("--style", type=int, default=None, metavar="N",
                       help="write every prompt in style N of --styles (priming, paper section 5.5, as generate.py "
                            "--style does); only the new writing is read")
    prime.add_argument("--prime-file", default=None, metavar="FILE",
                       help="write every prompt in your own handwriting: a prime file as generate.py --prime-file takes")
    g.add_argument("--styles", default="data/styles.json", help="styles file for --style (and its reference scale for "
                                                                  "--prime-file)")
    g.add_argument("--worst", type=at_least(0), default=12, help="lines drawn in OUT/worst.png, highest CER first (0 = no worst.png)")
    g.add_argument("--out", default="samples/legibility", help="folder for legibility.jsonl, worst.png and generated.npz")
    args = p.parse_typed(argv)
    # a flag given for the other measure would be ignored: say so instead
    given = lambda names: [flag_of(k) for k in names if k in args.typed]
    if not args.legibility and given(LEGIBILITY_FLAGS):
        p.error(f"{given(LEGIBILITY_FLAGS)[0]} is for --legibility (how legible the model writes)")
    if args.legibility and given(NLL_FLAGS):
        p.error(f"{given(NLL_FLAGS)[0]} is for the NLL (without --legibility)")
    unused = sampling_flag_errors(args)               # typed where they change nothing, as generate.py says
    if unused:
        p.error(unused[0])
    if not args.retries:
        args.retry_above = None           # it chooses the lines --retries samples again: none (sample() refuses it)
    return args


def main(argv=None):
    args = get_args(argv)
    previous = interrupt_on_signals()                  # Ctrl-C, `kill`, `timeout`: one line, status 130
    try:
        run(args)
        sys.stdout.flush()                              # here, so that a closed pipe is caught below
        return 0
    except KeyboardInterrupt:
        print("evaluate.py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                             # `evaluate.py ... | head -c 10`: the figures were printed
        quiet_broken_pipe()
        return 0
    finally:
        restore_signals(previous)


def run(args):
    try:
        device = pick_device(args.device)
        dtype = autocast_dtype(args.dtype, device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.legibility:
        return legibility(args, device)
    args.split = args.split or "valid"
    try:
        checkpoint = load_checkpoint(args.checkpoint, map_location=device)
        model, checkpoint = load_model(checkpoint)
        dataset = HandwritingDataset(args.data, args.split, max_lines=args.max_lines or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not len(dataset):
        sys.exit(f"error: the {args.split} split of {args.data} has no lines; choose another --split")
    if model.synthesis and checkpoint.get("alphabet") != dataset.alphabet.chars:
        sys.exit(f"error: {args.checkpoint} was trained with another alphabet than {args.data}; "
                 f"evaluate on the data it was trained on")
    if args.text_ablation and (not model.synthesis or len(dataset) < 2):
        sys.exit("error: --text-ablation needs a synthesis checkpoint and at least 2 lines")
    if args.per_line:
        try:
            output_extension(args.per_line, (".jsonl",), "--per-line", reads=(args.checkpoint,))
        except ValueError as e:
            sys.exit(f"error: {e}")
    # the checkpoint's normalisation, so a model is scored on the scale it was trained on
    data_std = dataset.std
    dataset.set_normalization(checkpoint["mean"], checkpoint["std"])
    model.to(device)
    score = lambda: summarize_nll(evaluate_nll(model, make_loader(dataset, args.batch_size, shuffle=False), device, dtype))
    result = {"checkpoint": args.checkpoint, "split": args.split, "task": model.config.task}
    if args.per_line:                                          # the same sums, from the lines scored one by one
        rows, total = per_line(model, dataset, args.batch_size, device, dtype)
        write_jsonl(args.per_line, rows)
        result.update(summarize_nll(total), per_line=args.per_line)
        if model.synthesis:
            result["window_short_lines"] = sum(r["window_end"] < -WINDOW_MISFIT for r in rows)
    else:
        result.update(score())
    if not np.allclose(data_std, dataset.std, rtol=1e-6):
        # data prepared otherwise (e.g. prepare_data.py --keep-repeats): densities per unit of the data's own std, as
        # Graves normalised by his training set's; p_data(x / s_data) = p(x / s) * s_data / s for x and y, per point
        shift = float(np.log(dataset.std.astype(np.float64) / data_std).sum())
        result["nll_per_line_in_data_units"] = result["nll_per_line"] + shift * result["points"] / max(result["lines"], 1)
    if args.text_ablation:
        dataset.text_ids = dataset.text_ids[1:] + dataset.text_ids[:1]   # line i's strokes with line i+1's text
        other = score()
        result.update(nll_per_line_other_text=other["nll_per_line"],
                      text_worth_per_line=other["nll_per_line"] - result["nll_per_line"])
    print(json.dumps(result))


def per_line(model, dataset, batch_size, device, dtype):
    """--per-line: score_lines for every line of the dataset (batched by length) -> rows in the dataset's order, and
    their sums for summarize_nll."""
    rows, total = [None] * len(dataset), 0
    order = np.argsort(dataset.lengths, kind="stable")
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size].tolist()
        s = score_lines(model, collate([dataset[i] for i in idx]), device, dtype)
        total = total + line_sums(s)
        s = {k: v.tolist() for k, v in s.items()}
        for k, i in enumerate(idx):
            rows[i] = {"line_id": dataset.line_ids[i], "writer": dataset.writer_ids[i], "text": dataset.texts[i],
                       "points": int(s["points"][k]), "nll": round(s["nll"][k], 3),
                       **({"window_end": round(s["window_end"][k], 3)} if "window_end" in s else {})}
    return rows, total


### legibility: generate, then read back

def read_prompts(path):
    """Non-blank lines of a UTF-8 text file, spaces collapsed."""
    try:
        with open(path, encoding="utf-8-sig") as f:                      # -sig: a byte-order mark is dropped
            return [" ".join(line.split()) for line in f if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text") from None
    except OSError as e:
        raise FileNotFoundError(f"cannot read --prompts {path}: {e.strerror}") from None


def legibility(args, device):
    split = args.split or "test"
    try:
        model, ckpt = load_model(args.checkpoint, map_location=device, expect_task="synthesis", task_flag=False)
        recognizer, rec_ckpt = load_recognizer(args.recognizer, map_location=device, flag="--recognizer")
        same_reader = os.path.realpath(args.pick_with) == os.path.realpath(args.recognizer)
        picker = None if args.candidates == 1 else (recognizer, rec_ckpt) if same_reader else \
            load_recognizer(args.pick_with, map_location=device, flag="--pick-with")
        real = HandwritingDataset(args.data, split) if args.prompts is None or os.path.exists(args.data) else None
        prompts = read_prompts(args.prompts) if args.prompts else list(real.texts)
        prime_text, prime_offsets = load_prime(args.styles, args.style, args.prime_file)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not prompts:
        sys.exit(f"error: --prompts {args.prompts} has no text lines; give one prompt per line" if args.prompts else
                 f"error: the {split} split of {args.data} has no lines; choose another --split")
    prompts = prompts[:args.max_lines or None]
    # the real line of every prompt: the split's own line for the default prompts, else the first line with that text
    by_text = {} if real is None else {t: i for i, t in reversed(list(enumerate(real.texts)))}
    real_index = (list(range(len(prompts))) if args.prompts is None else [by_text.get(p) for p in prompts])
    alphabet = Alphabet(ckpt["alphabet"])
    folded = [alphabet.fold(alphabet.plain(p)) for p in prompts]          # as generate.py --drop-unknown writes them
    forms = {a: b for _, f in folded for a, b in f.items()}
    unknown = list(dict.fromkeys(c for t, _ in folded for c in alphabet.unknown(t)))
    warn_unwritten("evaluate.py", forms, unknown)
    asked = [alphabet.writable(t) for t, _ in folded]                     # what the model writes
    keep = [i for i, t in enumerate(asked) if t]
    if not keep:
        sys.exit("error: no prompt has a character the model can write")
    if len(keep) < len(asked):
        skipped = [i + 1 for i, t in enumerate(asked) if not t]
        print(f"evaluate.py: warning: skipped {len(skipped)} prompt(s) with no character the model can write (prompt "
              f"{', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''})", file=sys.stderr)
    long = sum(len(asked[i]) > MAX_LINE_CHARS for i in keep)
    if long:
        print(f"evaluate.py: warning: {long} prompt(s) longer than {MAX_LINE_CHARS} characters, the longest line the "
              f"model saw: expect them less legible", file=sys.stderr)
    prime_text = alphabet.plain(prime_text or "")
    missing = alphabet.unknown(prime_text)
    if missing:
        sys.exit(f"error: style {args.style}'s text uses characters this model lacks; choose another --style"
                 if args.style is not None else f"error: --prime-file {args.prime_file}'s text uses characters this "
                                                f"model lacks: {' '.join(map(repr, missing))}")
    # priming: "style text" + " " + prompt, the style's strokes fed first; the cap and retries count the prompt only
    prime = None if prime_offsets is None else prime_strokes(prime_offsets, ckpt["mean"], ckpt["std"])
    lead = f"{prime_text} " if prime is not None else ""
    try:
        writable_folder(args.out)                                         # before the lines are written, not after
    except ValueError as e:
        sys.exit(f"error: {e}")
    model.to(device)
    recognizer.to(device)

    ### generate with one seeded generator, then read back on the recognizer's scale
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rec_alphabet = Alphabet(rec_ckpt["alphabet"])
    rec_mean, rec_std = checkpoint_norm(rec_ckpt, np.float32)
    score = None
    if picker is not None:
        score = legibility_score(picker[0].to(device), picker[1], alphabet, (ckpt["mean"], ckpt["std"]), len(lead))
        if same_reader:
            print("evaluate.py: warning: --pick-with is --recognizer: the lines are read by the recognizer that chose "
                  "them, so the CER flatters them; read them with --recognizer checkpoints/judge.pt (trained apart)",
                  file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                      # (the long prompts: said above)
        hand = prime_file_reword(args.prime_file)   # a saved hand: its own rule
        with relay_warnings("evaluate.py", PrimeMisfitWarning, hand):     # a prime its strokes do not write: said
            out = write_and_read(model, recognizer, [lead + asked[i] for i in keep], alphabet, rec_alphabet,
                                 (ckpt["mean"], ckpt["std"]), (rec_mean, rec_std), args.bias, generator, args.batch_size,
                                 args.max_steps_per_char, progress=True, retries=args.retries,
                                 retry_above=args.retry_above, prime=prime, prime_chars=len(lead),
                                 candidates=args.candidates, score=score)
    raw, hyps, finished, steps, attempts = (dict(zip(keep, values)) for values in out)
    with_real = [i for i in keep if real_index[i] is not None]
    real_hyps = {}
    if with_real:
        real.set_normalization(rec_mean, rec_std)
        real_hyps = dict(zip(with_real, read_lines(recognizer, [real[real_index[i]][0] for i in with_real],
                                                   rec_alphabet, args.batch_size)))

    ### report
    rows = []
    for i in keep:
        row = {"index": i, "text": asked[i], "recognised": hyps[i], "cer": error_rates([asked[i]], [hyps[i]])["cer"],
               "finished": finished[i], "steps": steps[i], "attempts": attempts[i]}
        if i in real_hyps:
            ref = real.texts[real_index[i]]
            row.update(real_line_id=real.line_ids[real_index[i]], real_text=ref, real_recognised=real_hyps[i],
                       real_cer=error_rates([ref], [real_hyps[i]])["cer"])
        rows.append(row)
    write_jsonl(os.path.join(args.out, "legibility.jsonl"), rows)
    save_strokes(os.path.join(args.out, "generated.npz"), [raw[i] for i in keep], [asked[i] for i in keep],
                 [str(i) for i in keep], finished=[finished[i] for i in keep], attempts=[attempts[i] for i in keep])
    worst = sorted(rows, key=lambda r: -r["cer"])[:args.worst]
    if worst:
        plot_lines([(raw[r["index"]], f"#{r['index']}  CER {r['cer']:.2f}{'' if r['finished'] else ' (unfinished)'}  "
                                      f"asked: “{r['text']}”  read: “{r['recognised']}”") for r in worst],
                   os.path.join(args.out, "worst.png"))
    elif os.path.exists(os.path.join(args.out, "worst.png")):   # --worst 0: no figure, and none from an earlier run
        os.remove(os.path.join(args.out, "worst.png"))
    def mean_of(values):   # over the lines that have a figure
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None
    gen = error_rates([asked[i] for i in keep], [hyps[i] for i in keep])
    rea = error_rates([real.texts[real_index[i]] for i in with_real], [real_hyps[i] for i in with_real]) if with_real else None
    print(json.dumps({"checkpoint": args.checkpoint, "recognizer": args.recognizer, "bias": args.bias, "seed": args.seed,
                      "style": args.style, "prime_file": args.prime_file,
                      "retries": args.retries, "retry_above": args.retry_above,
                      "candidates": args.candidates, "pick_with": args.pick_with if args.candidates > 1 else None,
                      "lines": len(keep), "cer_generated": gen["cer"], "wer_generated": gen["wer"],
                      "cer_real": rea and rea["cer"], "wer_real": rea and rea["wer"], "real_lines": len(with_real),
                      **{f"{k}_{who}": r and r[k] for k in ("first_word_wrong", "last_word_wrong")
                         for who, r in (("generated", gen), ("real", rea))},
                      "size_drift_generated": mean_of(size_drift(raw[i]) for i in keep),
                      "size_drift_real": mean_of(size_drift(real.raw(real_index[i])) for i in with_real),
                      "finished_fraction": sum(finished.values()) / len(keep),
                      "steps_per_char": sum(steps.values()) / max(sum(len(asked[i]) for i in keep), 1),
                      "attempts_per_line": sum(attempts.values()) / len(keep),
                      "out": args.out}))


if __name__ == "__main__":
    sys.exit(main())
