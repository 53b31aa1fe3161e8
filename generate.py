"""
Write handwriting with a trained network (Graves 2013, arXiv 1308.0850, sections 4-5).

    python generate.py --text "Hello world"                          # -> samples/handwriting.png
    python generate.py --text "Hello world" --style 3 --out hello.svg
    python generate.py --task prediction --steps 700 --out scribble.gif

Every line of the page is sampled together in one batch (text padded), with the same style and bias, and
stops by the paper's rule (the window has moved past the last character); a text longer than a page (40 lines)
fills numbered pages, OUT-1.png, OUT-2.png, ... The output format follows the extension of --out: .png, .svg
(one path per pen-down stroke, for pen plotters), .gif (the pen writing), or .npz (no picture: the lines' strokes,
any number of them, sampled in batches; e.g. training data for a recogniser).
Errors are one line on stderr and a non-zero exit.
"""
import argparse
import json
import math
import os
import shlex
import signal
import sys
import textwrap
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads sleep, not spin: on cores other jobs use,
                                                    # spinning made runs 10-40x slower (README, Troubleshooting)
if __name__ == "__main__":   # Ctrl-C while the libraries load (torch: 1-2 s): stop quietly, not with a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # main() then reports an interrupt in one line

# numpy only; torch is imported after the fast checks
from utils import (ALIGNS, MAX_BIAS, MAX_CANDIDATES, MAX_LINE_CHARS, MAX_RETRIES, MOST_STEPS_PER_CHAR, OneLineParser,
                   VIEWS, at_least, checkpoint_norm, finite_float, flag_of, ink_rgb, interrupt_on_signals, load_prime,
                   load_prime_file, output_extension, prime_file_reword, relay_warnings, restore_signals,
                   sampling_flag_errors, show_chars, warn_unwritten)

HERE = os.path.dirname(os.path.abspath(__file__))   # shipped files are found wherever the command runs from
DEFAULT_CHECKPOINTS = {"synthesis": "checkpoints/synthesis.pt", "prediction": "checkpoints/prediction.pt"}
DEFAULT_RECOGNIZER = "checkpoints/recognizer.pt"
DEFAULT_OUT = os.path.join("samples", "handwriting.png")
DEFAULT_STYLES = os.path.join("data", "styles.json")
FORMATS = (".png", ".svg", ".gif", ".npz")   # .npz: a strokes file, no picture
PLOT_FORMATS = (".png", ".svg", ".pdf")
MAX_SIDE = 8000             # pixels: a PNG or GIF page is drawn smaller than that (SVG has no limit)
MAX_ROWS = 40               # lines per page, counting every sample (one batch of at most this many lines)
MAX_PAGES = 10              # pages of one run (a longer text: several runs, or .npz output)
MAX_FILE_LINES = 100_000    # lines of an .npz strokes file, counting every sample (~2 GB of offsets held in memory)
DEFAULT_STEPS = 700         # points per line for --task prediction (IAM-OnDB median: 620)
MAX_STEPS = 5000            # at most, for --task prediction
SHORT_HAND = 15             # --save-hand warns below this many characters: a short line shows little of a hand
# flags that apply only to synthesis, or only to pictures: typed where they do not apply (args.typed), they stop the run
TEXT_FLAGS = ("max_chars_per_line", "max_steps_per_char", "retries", "retry_above", "candidates", "pick_with")
PICTURE_FLAGS = ("stroke_width", "color", "line_height")
MAX_STEPS_PER_CHAR = 40     # --max-steps-per-char's default
MAX_BATCH = 4096            # --batch-size at most (lines sampled together for .npz output)


class GenerateError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


def get_args(argv=None):
    p = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0].strip(),
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Styles: see docs/styles.png. Prime file: JSON {\"text\": ..., \"strokes\": [[[x, y], ...], ...]} "
                             "with y pointing down (screen/SVG coordinates); see README.")
    g = p.add_argument_group("what to write")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to write (synthesis); newlines (or a literal \\n) start a new line")
    src.add_argument("--text-file", metavar="FILE", help="read the text from FILE (UTF-8; its newlines start new lines, a literal \\n in it is text; '-' = standard input)")
    g.add_argument("--task", choices=["synthesis", "prediction"], default="synthesis",
                   help="synthesis: write --text (paper section 5); prediction: unconditional handwriting "
                        "(section 4) of --steps points (default: synthesis)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint written by train.py (default: checkpoints/synthesis.pt or checkpoints/prediction.pt by --task)")
    g.add_argument("--steps", type=int, metavar="N", default=None,
                   help=f"points per line for --task prediction, 1 to {MAX_STEPS} (default: {DEFAULT_STEPS}; IAM-OnDB "
                        f"lines have a median of 620)")
    g.add_argument("--max-chars-per-line", type=int, metavar="N", default=40,
                   help=f"wrap longer lines at word boundaries (characters, 5 to {MAX_LINE_CHARS}; default: 40; "
                        f"IAM-OnDB lines have 1-64, median 29)")
    g.add_argument("--drop-unknown", action="store_true",
                   help="write characters the model's alphabet lacks without their accents where that makes them "
                        "known (é as e), and leave the rest out, instead of stopping with an error")
    s = p.add_argument_group("sampling")
    s.add_argument("--bias", type=finite_float, metavar="B", default=0.75,
                   help="Graves' biased sampling (section 5.4, eq. 61-62): sigma = exp(sigma_hat - b), pi = softmax(pi_hat (1 + b)); "
                        f"0 = the network's own distribution (paper's plain sampling), larger = neater and less varied, "
                        f"at most {MAX_BIAS} (default: 0.75)")
    s.add_argument("--seed", type=at_least(0, below=2 ** 63), metavar="S", default=None,
                   help="random seed, 0 to 2^63 - 1; the same seed gives the same file (default: a random one, printed)")
    s.add_argument("--num-samples", type=int, metavar="N", default=1,
                   help=f"write the text N times, all sampled together in one batch, one block per sample; at most "
                        f"{(MAX_ROWS + 1) // 2} on a page, {MAX_FILE_LINES:,} lines in all for .npz (default: 1)")
    s.add_argument("--max-steps-per-char", type=int, metavar="N", default=MAX_STEPS_PER_CHAR,
                   help=f"safety cap for synthesis: a line stops after this many points per character of its text, "
                        f"1 to {MOST_STEPS_PER_CHAR} (default: {MAX_STEPS_PER_CHAR}; real lines take about 21)")
    s.add_argument("--retries", type=int, metavar="N", default=2,
                   help=f"a line whose window stalled (it reached that cap, or took more than --retry-above) is sampled "
                        f"again, up to N more times (at most {MAX_RETRIES}), keeping the best attempt; 0 = keep the first "
                        f"(default: 2)")
    s.add_argument("--retry-above", type=finite_float, metavar="PTS", default=32.0,
                   help="with --retries, also sample again a line that finished but took more than PTS points per "
                        "character: a window that lingers writes loops (real lines take about 21); 0 = only lines "
                        "that reach the cap (default: 32, chosen on the validation split)")
    s.add_argument("--candidates", type=int, metavar="K", default=1,
                   help=f"write every line K times (at most {MAX_CANDIDATES}), all in one batch, and keep the attempt the "
                        f"recognizer (--pick-with) reads most surely as its text: fewer misread or garbled words; K = 4 "
                        f"took about twice the sampling time on a 2-core CPU (see README) (default: 1)")
    s.add_argument("--pick-with", default=DEFAULT_RECOGNIZER, metavar="PATH",
                   help=f"recognizer checkpoint that ranks the --candidates (recognizer.py train) (default: "
                        f"{DEFAULT_RECOGNIZER})")
    s.add_argument("--batch-size", type=int, metavar="N", default=256,
                   help=f"lines sampled together for .npz output, at most {MAX_BATCH} (a page is always one batch); "
                        f"larger batches write more lines per second, on a GPU most (default: 256)")
    s.add_argument("--device", default="cpu", metavar="DEV",
                   help="torch device: cpu, cuda, cuda:1, mps, or auto (CUDA when present) (default: cpu)")
    s.add_argument("--threads", type=int, metavar="N", default=1,
                   help="CPU threads for torch, at most the cores (default: 1; sampling runs one small step at a time, "
                        "where more threads gain little and are many times slower when other programs share the cores)")
    pr = p.add_argument_group("style (priming, paper section 5.5)")
    prime = pr.add_mutually_exclusive_group()
    prime.add_argument("--style", type=int, metavar="N",
                       help="imitate shipped real line N of --styles (numbers in docs/styles.png)")
    prime.add_argument("--prime-file", metavar="FILE",
                       help="imitate your own handwriting: JSON {\"text\": \"what you wrote\", \"strokes\": "
                            "[[[x, y], ...], ...]}, one list of points per pen-down stroke, y pointing down")
    pr.add_argument("--styles", default=DEFAULT_STYLES, metavar="FILE",
                    help=f"styles file for --style, whose reference size --prime-file is scaled to (default: {DEFAULT_STYLES})")
    pr.add_argument("--show-prime", action="store_true",
                    help="also draw the priming line, in grey, before the new writing")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="FILE",
                   help=f"output file; the extension picks the format: .png, .svg (single-stroke paths), .gif "
                        f"(animation); a text longer than a page ({MAX_ROWS} lines) writes FILE-1.png, FILE-2.png, ... "
                        f"(up to {MAX_PAGES} pages); or .npz: no picture, the lines as raw offsets with their texts, "
                        f"any number of lines (up to {MAX_FILE_LINES:,}) sampled --batch-size at a time "
                        f"(default: {DEFAULT_OUT}, folder created if needed)")
    o.add_argument("--view", choices=VIEWS, default="plain",
                   help="plain: ink only; strokes: one colour per pen-down stroke; eos: ink coloured by the "
                        "end-of-stroke probability (blue low, red high); density: the mixture density of every "
                        "next point as a heat-map under the ink (default: plain)")
    o.add_argument("--stroke-width", type=finite_float, metavar="PX", default=2.0, help="ink width in pixels of the output, in (0, 50] (default: 2.0)")
    o.add_argument("--color", default="black", metavar="C", help="ink colour: a name or #rrggbb (default: black)")
    o.add_argument("--line-height", type=int, metavar="PX", default=100,
                   help="distance between lines in pixels, 10 to 1000; sets the size of the picture (PNG and GIF: at most "
                        "8000 pixels a side; SVG: CSS pixels of 1/96 inch, so 38 = 10 mm) (default: 100)")
    o.add_argument("--align", choices=ALIGNS, default="left",
                   help="lines on the page: left-aligned, centred (cards, titles) or right-aligned, each on the "
                        "widest (with --show-prime the grey priming line counts as part of its row) (default: left)")
    o.add_argument("--save-strokes", metavar="FILE",
                   help="also save the sampled lines as raw offsets (dx, dy, eos) with their texts, in an .npz laid out "
                        "like the prepared data (for `recognizer.py read FILE`; priming strokes not included)")
    o.add_argument("--save-hand", metavar="FILE",
                   help="also save the first line written (line 1 of sample 1) as a prime file (.json: its text and "
                        "strokes), to write later texts in the same hand with --prime-file FILE (synthesis)")
    o.add_argument("--plot-attention", metavar="FILE",
                   help="also plot the window weights phi over time and characters (synthesis; .png, .svg or .pdf)")
    return p.parse_typed(argv)


def fail(message):
    raise GenerateError(message)


def shipped(path):
    """A default path of the repository: as given when it exists from here, else beside generate.py."""
    if os.path.exists(path):
        return path
    rel = os.path.relpath(os.path.join(HERE, path))
    return os.path.join(HERE, path) if rel.startswith("..") else rel


### checks that need no model (fast, before torch is imported)

def check_output(path, formats, flag, reads=()):
    """utils.output_extension (fail() on its error), and a .json is written over only when it is an earlier hand
    (--save-hand's prime file)."""
    try:
        ext = output_extension(path, formats, flag, reads)
    except ValueError as e:
        fail(str(e))
    if ext == ".json" and os.path.isfile(path):
        try:
            load_prime_file(path)
        except ValueError:
            try:
                with open(path, encoding="utf-8-sig") as f:
                    what = "a styles file" if "styles" in json.load(f) else "not a prime file"
            except (OSError, ValueError, TypeError):
                what = "not a prime file"
            fail(f"{flag} {path} exists and is {what}, not to be written over; give another file")
    return ext


def check_args(args):
    if not 0 <= args.bias <= MAX_BIAS:
        fail(f"--bias must be between 0 (unbiased) and {MAX_BIAS} (beyond about 5 the writing no longer changes), "
             f"not {args.bias}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        fail(f"--batch-size must be between 1 and {MAX_BATCH} lines, not {args.batch_size}")
    if not 5 <= args.max_chars_per_line <= MAX_LINE_CHARS:
        fail(f"--max-chars-per-line must be between 5 and {MAX_LINE_CHARS} (the longest line the model saw), "
             f"not {args.max_chars_per_line}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        fail(f"--steps must be between 1 and {MAX_STEPS}, not {args.steps}")
    if not 0 <= args.retries <= MAX_RETRIES:
        fail(f"--retries must be between 0 and {MAX_RETRIES}, not {args.retries}")
    if args.retry_above < 0:
        fail(f"--retry-above must be >= 0 points per character, not {args.retry_above}")
    if not 1 <= args.max_steps_per_char <= MOST_STEPS_PER_CHAR:
        fail(f"--max-steps-per-char must be between 1 and {MOST_STEPS_PER_CHAR} (real lines take about 21), not "
             f"{args.max_steps_per_char}")
    if not 1 <= args.candidates <= MAX_CANDIDATES:
        fail(f"--candidates must be between 1 and {MAX_CANDIDATES} attempts per line, not {args.candidates}")
    if not 0 < args.stroke_width <= 50:
        fail(f"--stroke-width must be in (0, 50] pixels, not {args.stroke_width}")
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        fail(f"--threads must be between 1 and {os.cpu_count() or 1} (the CPU cores here), not {args.threads}")
    if not 10 <= args.line_height <= 1000:
        fail(f"--line-height must be between 10 and 1000 pixels, not {args.line_height}")
    try:
        args.rgb = ink_rgb(args.color)
    except ValueError as e:
        fail(f"--color {e}")
    if args.styles == DEFAULT_STYLES:
        args.styles = shipped(DEFAULT_STYLES)
    if args.out is None:
        args.out = DEFAULT_OUT
        os.makedirs(os.path.dirname(DEFAULT_OUT), exist_ok=True)
    reads = (args.checkpoint, args.prime_file, args.styles if args.style is not None else None,
             args.text_file if args.text_file != "-" else None)
    args.format = check_output(args.out, FORMATS, "--out", reads)
    most = MAX_FILE_LINES if args.format == ".npz" else (MAX_ROWS + 1) // 2      # a page: a blank row between samples
    if not 1 <= args.num_samples <= most:
        fail(f"--num-samples must be between 1 and {most}"
             f"{' for a page (or write --out FILE.npz: strokes, no picture)' if args.format != '.npz' else ''}, "
             f"not {args.num_samples}")
    if args.format == ".npz":
        picture = [f for f, on in (("--view", args.view != "plain"), ("--align", args.align != "left"),
                                   ("--plot-attention", args.plot_attention),
                                   ("--show-prime", args.show_prime), ("--save-strokes", args.save_strokes),
                                   *((flag_of(k), k in args.typed) for k in PICTURE_FLAGS)) if on]
        if picture:
            fail(f"{picture[0]} is for pictures; --out {args.out} writes only the strokes (use .png, .svg or .gif)")
    if args.plot_attention:
        if args.task != "synthesis":
            fail("--plot-attention needs --task synthesis (the prediction network has no window)")
        check_output(args.plot_attention, PLOT_FORMATS, "--plot-attention", reads)
    if args.save_strokes:
        check_output(args.save_strokes, (".npz",), "--save-strokes", reads)
    if args.save_hand is not None:
        if args.task != "synthesis":
            fail("--save-hand needs --task synthesis (a prime file holds a line and its text)")
        check_output(args.save_hand, (".json",), "--save-hand", reads)
    if args.task == "prediction" and (args.text is not None or args.text_file):
        fail("--text/--text-file are for --task synthesis; the prediction network writes without text (see --steps)")
    textual = [flag_of(k) for k in TEXT_FLAGS if k in args.typed] + ["--drop-unknown"] * args.drop_unknown
    if args.task == "prediction" and textual:
        fail(f"{textual[0]} is for --task synthesis (writing a text); the prediction network writes --steps points")
    unused = sampling_flag_errors(args) + [message for on, message in (   # flags typed where they change nothing
        ("batch_size" in args.typed and args.format != ".npz",
         f"--batch-size is for --out FILE.npz; a page (--out {args.out}) is sampled in one batch: drop --batch-size"),
        ("color" in args.typed and args.view in ("strokes", "eos"),
         f"--view {args.view} colours the ink itself ("
         + ("one colour per stroke" if args.view == "strokes" else "by the pen-lift probability")
         + "): drop --color, or use --view plain or density"))
        if on]
    if unused:
        fail(unused[0])
    if not args.retries:
        args.retry_above = None           # it chooses the lines --retries samples again: none (sample() refuses it)
    if args.show_prime and args.style is None and not args.prime_file:
        fail("--show-prime draws the priming line: give --style N or --prime-file FILE too")
    if args.task == "synthesis" and args.steps is not None:
        fail("--steps is for --task prediction; synthesis writes until its text ends (cap: --max-steps-per-char)")
    args.steps = args.steps or DEFAULT_STEPS
    if args.task == "synthesis" and args.text is None and not args.text_file:
        fail('nothing to write: give --text "..." or --text-file FILE (or --task prediction: writing without text)')


def read_text(args):
    """The raw text of --text or --text-file, with a literal backslash-n taken as a newline."""
    if args.text is not None:
        return args.text.replace("\\n", "\n")
    try:
        if args.text_file == "-":
            text = sys.stdin.read()
        else:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        return text.removeprefix("\ufeff")               # the byte-order mark some editors write first
    except UnicodeDecodeError:
        fail(f"--text-file {args.text_file} is not UTF-8 text")
    except OSError as e:
        fail(f"cannot read --text-file {args.text_file}: {e.strerror}")


def prepare_lines(text, chars, max_chars, drop_unknown):
    """Text -> page lines: typographic substitutes, unknown characters checked (with drop_unknown, accents left off
    where that makes them known, the rest left out), spaces collapsed, long lines wrapped at word boundaries (a longer
    word stays whole, up to MAX_LINE_CHARS). Blank lines are kept ('' = an empty row).
    Returns (lines, dropped chars, {folded char: its form})."""
    from dataset import Alphabet
    alphabet = Alphabet(chars)
    text, folded = alphabet.plain(text), {}
    unknown = [c for c in alphabet.unknown(text) if c not in "\n\r "]          # in order of appearance
    if unknown and not drop_unknown:
        fail(f"characters not in the model's alphabet: {show_chars(unknown)}; remove them or pass --drop-unknown "
             f"(é written as e, ß as ss, ½ as 1/2; the rest left out)")
    if unknown:
        text, folded = alphabet.fold(text)
        unknown = [c for c in alphabet.unknown(text) if c not in "\n\r "]
    if unknown:
        text = "".join(c for c in text if c not in unknown)
    lines = []
    for para in text.replace("\r", "").split("\n"):
        para = " ".join(para.split())
        wrapped = textwrap.wrap(para, max_chars, break_on_hyphens=False, break_long_words=False)   # long words whole
        lines += [piece for ln in wrapped for piece in textwrap.wrap(ln, MAX_LINE_CHARS)] if para else [""]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        fail("the text is empty" + (" once the unknown characters are dropped" if unknown else "") +
             '; give some words with --text "..."')
    return lines, unknown, folded


### priming (paper section 5.5): a real line and its text, fed before the new text

def read_prime(args):
    """--style N or --prime-file FILE -> (text, raw offsets (T, 3) with the first point at (0, 0)), or (None, None)."""
    try:
        return load_prime(args.styles, args.style, args.prime_file)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


### model

def load_checkpoint_model(args):
    from model import load_model
    path = args.checkpoint or shipped(DEFAULT_CHECKPOINTS[args.task])
    if not os.path.exists(path):                     # a folder: load_checkpoint says so
        if args.checkpoint is None:
            fail(f"no trained model at {path}: train one with `python train.py --task {args.task}` "
                 f"(see README) or pass --checkpoint PATH")
        fail(f"checkpoint {path} does not exist")
    try:
        model, ckpt = load_model(path, map_location="cpu", expect_task=args.task)
    except (ValueError, FileNotFoundError) as e:   # foreign file, wrong task, weights that do not fit
        msg = str(e).strip().splitlines()[0]
        fail(msg if path in msg else f"{path}: {msg}")
    for key in ("mean", "std") + (("alphabet",) if args.task == "synthesis" else ()):
        if key not in ckpt:
            fail(f"{path} has no '{key}'; it was not written by train.py")
    from utils import pick_device
    try:
        device = pick_device(args.device)
    except ValueError as e:
        fail(str(e))
    return model.to(device), ckpt, device


def load_scorer(args, ckpt, device, prime_chars):
    """--candidates: the score that ranks a line's attempts (recognition.legibility_score) with the --pick-with
    recognizer; the priming text, not written, is not scored."""
    from dataset import Alphabet
    from recognition import legibility_score, load_recognizer
    path = shipped(args.pick_with) if args.pick_with == DEFAULT_RECOGNIZER else args.pick_with
    try:
        recognizer, rec_ckpt = load_recognizer(path, map_location=device, flag="--pick-with")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e).strip().splitlines()[0])
    return legibility_score(recognizer.to(device), rec_ckpt, Alphabet(ckpt["alphabet"]), checkpoint_norm(ckpt), prime_chars)


def density_map(page, results, rows, mean, std, bias, shape):
    """The mixture density of every sampled point's offset, summed over the page: (H, W) array.
    Each step's mixture (eq. 23) is evaluated on a patch of pixels around the pen position it predicts from."""
    import numpy as np
    import torch
    from model import mixture_log_density, mixture_params
    H, W = shape
    heat = torch.zeros(H * W)
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    s = page.scale
    for line, b in zip([ln for ln in page.lines if ln is not None], rows):   # rows: batch row of each drawn line
        T = int(results["lengths"][b])
        if T == 0:
            continue
        mix = mixture_params(results["mixture"][b, :T].cpu(), bias)          # fields (T, M)
        pen = np.concatenate([line.origin[None], line.xy[:-1]])[line.start:line.start + T]   # (T, 2) pixels
        # patch radius: covers mean + 3 sigma of the likely components, in pixels
        reach = ((mix.mu1.abs() * std_t[0] + abs(mean[0]) + 3 * std_t[0] * mix.log_sigma1.exp()).max(-1).values
                 .quantile(0.95).item() * s)
        R = int(min(max(np.ceil(reach), 3), 30))
        d = torch.arange(-R, R + 1, dtype=torch.float32)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        dx, dy = dx.reshape(-1), dy.reshape(-1)                                # (P,)
        pen_t = torch.tensor(pen, dtype=torch.float32)
        base = pen_t.round()
        for a in range(0, T, 64):
            sl = slice(a, min(a + 64, T))
            qx, qy = base[sl, :1] + dx, base[sl, 1:] + dy                     # (t, P) pixel centres
            ox = ((qx - pen_t[sl, :1]) / s - mean_t[0]) / std_t[0]            # normalised offsets (y up)
            oy = ((pen_t[sl, 1:] - qy) / s - mean_t[1]) / std_t[1]
            m = type(mix)(*[f[sl].unsqueeze(1) for f in mix])                  # (t, 1, M)
            p = mixture_log_density(m, ox, oy).exp()                         # (t, P)
            ok = (qx >= 0) & (qx < W) & (qy >= 0) & (qy < H)
            idx = (qy * W + qx)[ok].long()
            heat.index_add_(0, idx, p[ok])
    return heat.reshape(H, W).numpy()


### main

def generate(args):
    t_start = time.perf_counter()
    check_args(args)
    lines = []
    if args.task == "synthesis":
        raw_text = read_text(args)
        if not raw_text.strip():
            source = "standard input (--text-file -)" if args.text_file == "-" else f"--text-file {args.text_file}"
            fail(f"{source} is empty" if args.text is None else
                 'the text is empty; give some words with --text "..."')
    prime_text, prime_offsets = read_prime(args)

    import torch
    from dataset import prime_strokes
    torch.set_num_threads(args.threads)                 # main() restores the caller's setting
    t_load = time.perf_counter()
    model, ckpt, device = load_checkpoint_model(args)
    mean, std = checkpoint_norm(ckpt)

    ### the lines, and the pages they fill (a strokes file: one list)
    if args.task == "synthesis":
        from dataset import Alphabet
        alphabet = Alphabet(ckpt["alphabet"])
        lines, dropped, folded = prepare_lines(raw_text, alphabet.chars, args.max_chars_per_line, args.drop_unknown)
        warn_unwritten("generate.py", folded, dropped)
        if prime_text is not None:
            prime_text = alphabet.plain(prime_text)                           # curly quotes from a phone's keyboard
            missing = sorted(alphabet.unknown(prime_text))
            if missing:
                fail(f"the priming text uses characters this model lacks: {' '.join(map(repr, missing))}; "
                     + ("choose another --style" if args.style is not None
                        else "edit the prime file's \"text\", or write the line again without them"))
    else:
        lines = ["(unconditional)"]
    if args.format == ".npz":                                                 # a strokes file: no blank rows
        total_rows = sum(1 for ln in lines if ln) * args.num_samples
        if total_rows > MAX_FILE_LINES:
            fail(f"the file would have {total_rows:,} lines ({args.num_samples} sample(s)); at most {MAX_FILE_LINES:,}: "
                 f"split the text into several runs")
    elif args.num_samples > 1:
        total_rows = (len(lines) + 1) * args.num_samples - 1                   # a blank row between samples
        if total_rows > MAX_ROWS:
            fail(f"the page would have {total_rows} lines ({len(lines)} line(s) x {args.num_samples} samples at "
                 f"{args.max_chars_per_line} characters per line, a blank line between samples); at most {MAX_ROWS} "
                 f"fit: write fewer samples (one sample fills as many pages as it needs), or --out FILE.npz (strokes, "
                 f"no picture, any number of lines)")
        pages = [list(enumerate(lines))]
    else:
        pages = paginate(lines, MAX_ROWS)
        if len(pages) > MAX_PAGES:
            fail(f"the text would fill {len(pages)} pages of {MAX_ROWS} lines ({len(lines)} lines at "
                 f"{args.max_chars_per_line} characters per line); at most {MAX_PAGES}: split it into several runs, or "
                 f"write --out FILE.npz (strokes, no picture, any number of lines)")
    if args.plot_attention and os.path.abspath(args.plot_attention) in {
            os.path.abspath(page_path(args.out, k, len(pages))) for k in range(len(pages))}:
        fail(f"--plot-attention {args.plot_attention} is where the handwriting goes (--out {args.out}); give it "
             f"another file")

    prime = None if prime_offsets is None else prime_strokes(prime_offsets, mean, std)
    lead = "" if prime is None else f"{prime_text} "                          # the priming text leads every text
    prime_chars = len(lead)
    args.score = None if args.candidates == 1 else load_scorer(args, ckpt, device, prime_chars)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 1_000_000
    generator = torch.Generator(device=device).manual_seed(seed)
    record = args.view in ("eos", "density") or bool(args.plot_attention)
    from model import PrimeMisfitWarning
    hand = prime_file_reword(args.prime_file)   # a saved hand: its own rule
    with relay_warnings("generate.py", PrimeMisfitWarning, hand):           # a prime whose text its strokes do not write
        if args.format == ".npz":
            texts = [ln for _ in range(args.num_samples) for ln in lines if ln]   # sample-major
            return write_strokes_file(args, model, ckpt, [lead + t for t in texts], texts, prime, prime_chars,
                                      generator, seed, t_start, t_load)
        return write_pages(args, model, ckpt, pages, lead, prime, prime_offsets, generator, record, seed, t_start,
                           t_load)


def write_pages(args, model, ckpt, pages, lead, prime, prime_offsets, generator, record, seed, t_start, t_load):
    """Pictures (.png, .svg, .gif): sample each page's lines as one batch (the lead, "prime text ", before every text),
    then draw every page at one size, the attention plot and --save-strokes, and say what was written."""
    import numpy as np
    import torch
    import utils
    from dataset import Alphabet, denormalize, from_its_first_point
    mean, std = checkpoint_norm(ckpt)
    device, prime_chars = model.mdn.weight.device, len(lead)
    alphabet = Alphabet(ckpt["alphabet"]) if args.task == "synthesis" else None
    saved, saved_texts, t_sampling, steps, n_lines = [], [], 0.0, 0, 0
    sampled = []                                                              # per page: (texts, result, rows, lines)
    shown = set()                                             # --show-prime: the samples whose first line has it
    for page_rows in pages:
        ### the batch: one row per line of the page and sample
        texts, where = [], []                                                 # batch rows, sample-major
        for s in range(args.num_samples):
            for n, ln in page_rows:
                if ln:
                    texts.append(ln)
                    where.append(f"line {n + 1}" + (f" of sample {s + 1}" if args.num_samples > 1 else ""))
        B = len(texts)
        t_sample = time.perf_counter()
        joined = [lead + t for t in texts]
        if args.task == "synthesis":
            text_ids = torch.nn.utils.rnn.pad_sequence([alphabet.encode(t) for t in joined], batch_first=True)
            result = model.sample(text=text_ids.to(device), bias=args.bias, prime=prime, generator=generator,
                                  max_steps_per_char=args.max_steps_per_char, record=record, retries=args.retries,
                                  retry_above=args.retry_above, prime_chars=prime_chars,
                                  candidates=args.candidates, score=args.score)
        else:
            result = model.sample(steps=args.steps, bias=args.bias, prime=prime, generator=generator, batch_size=B,
                                  record=record)
        result = {k: v.cpu() for k, v in result.items()}
        t_sampling += time.perf_counter() - t_sample
        steps, n_lines = max(steps, int(result["lengths"].max())), n_lines + B
        for b in np.flatnonzero(~result["finished"].numpy()):
            if int(result["lengths"][b]) < len(texts[b]):                     # model.sample: stopped at once
                print(f"generate.py: warning: {where[b]} ({texts[b][:30]!r}) stopped before writing its text: the "
                      f"window was past its end from the start (does the prime's text lack a word its strokes "
                      f"write?)", file=sys.stderr)
                continue
            print(f"generate.py: warning: {where[b]} ({texts[b][:30]!r}) did not reach the end of its text within the "
                  f"cap (--max-steps-per-char) in {int(result['attempts'][b])} attempt(s); try "
                  + (f"a higher --max-steps-per-char (now {args.max_steps_per_char}; real lines take about 21), "
                     if args.max_steps_per_char < MAX_STEPS_PER_CHAR else "")
                  + "another --seed, a lower --bias, a shorter line (--max-chars-per-line), another --style or a "
                    "better-trained checkpoint",
                  file=sys.stderr)

        ### the page's lines
        strokes = denormalize(result["strokes"].numpy().astype(np.float64), mean, std)
        page_lines, rows, b = [], [], 0
        for s in range(args.num_samples):
            if s:
                page_lines.append(None)
            for _, ln in page_rows:
                if not ln:
                    page_lines.append(None)
                    continue
                T = int(result["lengths"][b])
                off = strokes[b, :T]
                saved.append(off if prime is None else from_its_first_point(off))
                value = result["eos_prob"][b, :T].numpy() if args.view == "eos" else None
                start = 0
                if args.show_prime and prime_offsets is not None and s not in shown:
                    shown.add(s)
                    start = len(prime_offsets)
                    off = np.concatenate([prime_offsets, off])
                    value = None if value is None else np.concatenate([np.zeros(start), value])
                page_lines.append(utils.PageLine(off, value=value, start=start))
                rows.append(b)
                b += 1
        saved_texts += texts
        sampled.append((texts, result, rows, page_lines))

    ### the pages, drawn at one size: rows as far apart as the tallest line of the whole text needs
    for k, (*_, page_lines) in enumerate(sampled):
        if not any(ln is not None and len(ln.offsets) for ln in page_lines):
            fail(f"nothing to draw{f' on page {k + 1}' if len(sampled) > 1 else ''}: every line stopped before "
                 f"writing (see the warnings above)")
    pitch = utils.row_pitch([ln for *_, page_lines in sampled for ln in page_lines])
    margin = max(args.line_height // 3, math.ceil(args.stroke_width / 2) + 2)          # round caps stay inside
    picture = args.format != ".svg" or args.view == "density"                  # pixels: at most MAX_SIDE a side
    layout = lambda lines, height, side: utils.layout_page(lines, line_height=height, margin=margin, pitch=pitch,
                                                           max_side=side, align=args.align)
    laid = [layout(page_lines, args.line_height, MAX_SIDE if picture else None) for *_, page_lines in sampled]
    if any(page.shrunk for page in laid):                                    # every page as small as the smallest
        height = min(page.scale for page in laid) * pitch
        laid = [layout(page_lines, height, None) for *_, page_lines in sampled]
        print(f"generate.py: warning: {args.out} would be over {MAX_SIDE:,} pixels a side at --line-height "
              f"{args.line_height}; drawn at --line-height {height:.0f} (lower it, or write "
              + ("a plain .svg (no --view density), which has no limit)" if args.format == ".svg" else
                 ".svg, which has no limit)"), file=sys.stderr)
    for k, ((texts, result, rows, page_lines), page) in enumerate(zip(sampled, laid)):
        out, B = page_path(args.out, k, len(pages)), len(texts)
        background = None
        if args.view == "density":
            background = density_map(page, result, rows, mean, std, args.bias, (page.height, page.width))
        style = dict(view=args.view, color=args.rgb, width=args.stroke_width, background=background,
                     title=" / ".join(texts[:B // args.num_samples]))
        {".png": utils.save_png, ".svg": utils.save_svg, ".gif": utils.save_gif}[args.format](page, out, **style)
        if args.plot_attention and k == 0:                                   # the first page's lines (the plot shows 8)
            joined = [lead + t for t in texts]
            utils.plot_attention([result["phi"][b, :max(int(result["lengths"][b]), 1), :len(joined[b]) + 1].numpy()
                                  for b in range(B)],
                                 joined, args.plot_attention, prime_chars=prime_chars)
        step = ckpt.get("step")
        retried = int((result["attempts"] > 1).sum())
        utils.say(f"wrote {out} ({B // args.num_samples} line(s) x {args.num_samples} sample(s), "
                  f"{args.task}, bias {args.bias}, seed {seed}{f', model step {step}' if step is not None else ''}"
                  f"{attempts_note(args, retried)})")
    stale = [f for k in range(len(pages) if len(pages) > 1 else 0, MAX_PAGES)
             if os.path.isfile(f := page_path(args.out, k, MAX_PAGES))]
    if stale:                                          # an earlier, longer run's pages: left alone, but said
        print(f"generate.py: note: {', '.join(stale)} from an earlier run {'is' if len(stale) == 1 else 'are'} still "
              f"there (not written by this run)", file=sys.stderr)
    t_written = time.perf_counter()
    if args.save_strokes:
        utils.save_strokes(args.save_strokes, saved, saved_texts if args.task == "synthesis" else [""] * len(saved))
    code = 0
    if args.save_hand is not None:                                            # the first line, without its prime
        code = save_hand(args, model, ckpt, seed, saved_texts[0], saved[0], bool(sampled[0][1]["finished"][0]))

    ### report
    if args.plot_attention:
        utils.say(f"wrote {args.plot_attention} (attention window phi)")
    if args.save_strokes:
        utils.say(f"wrote {args.save_strokes} (raw offsets of {len(saved)} line(s))")
    utils.say(f"time: {t_written - t_load:.2f} s from checkpoint load to written file{'s' if len(pages) > 1 else ''} "
              f"(sampling {t_sampling:.2f} s, {steps} steps x {n_lines} lines{f' on {len(pages)} pages' if len(pages) > 1 else ''}); "
              f"{time.perf_counter() - t_start:.2f} s in main")
    return code


def attempts_note(args, retried):
    """The summary line's end: lines sampled again (--retries) and the best of --candidates."""
    return ((f"; {retried} stalled or lingering line(s) sampled again (--retries)" if retried else "")
            + (f"; best of {args.candidates} attempts per line (--candidates)" if args.candidates > 1 else ""))


def save_hand(args, model, ckpt, seed, text, offsets, finished):
    """--save-hand: the first line written, as a prime file (utils.save_prime_file), unless it did not finish its
    text (it would prime later lines with the rest of it); a warning if read back its window runs far past its text
    (hand_past). Returns the exit status: 0, or 1 when nothing was saved."""
    import utils
    if not finished:
        print(f"generate.py: error: the first line ({text[:30]!r}) did not finish its text, so it was not saved as a "
              f"hand (--save-hand {args.save_hand}); try another --seed", file=sys.stderr)
        return 1
    primed = (f" --style {args.style}" if args.style is not None else
              f" --prime-file {args.prime_file}" if args.prime_file else "")
    utils.save_prime_file(args.save_hand, text, offsets, source=f"generate.py --bias {args.bias} --seed {seed}{primed}, "
                                                                f"model step {ckpt.get('step')}")
    utils.say(f"wrote {args.save_hand} (the first line as a prime file: --prime-file {shlex.quote(args.save_hand)} "
              f"writes in its hand)")
    if len(text) < SHORT_HAND:
        print(f"generate.py: warning: the hand saved is {len(text)} characters long: a line of 25-40 gives the network "
              f"more of the hand to go on", file=sys.stderr)
    past = hand_past(args, model, ckpt)
    if past is not None and past > utils.SAVED_HAND_PAST:
        print(f"generate.py: warning: read back, the saved hand's window runs {past:.1f} characters past the end of its "
              f"text (beyond {utils.SAVED_HAND_PAST:g}, lines written in it misread their first word about twice as "
              f"often): save it again with another --seed", file=sys.stderr)
    return 0


def hand_past(args, model, ckpt):
    """How far past the end of its text the window of the hand just saved reads back (sample's prime_fit, in
    characters), followed by "the": within 0.2 of the worst of 60 validation prompts for 18 saved hands (1.9-5.0).
    None if the model's alphabet lacks those letters."""
    import warnings
    import torch
    import utils
    from dataset import Alphabet, prime_strokes
    from model import PrimeMisfitWarning
    text, offsets = utils.load_prime_file(args.save_hand, args.styles)             # as --prime-file reads it
    alphabet = Alphabet(ckpt["alphabet"])
    if not set("the") <= set(alphabet.chars):
        return None
    device = model.mdn.weight.device
    with warnings.catch_warnings():                                                # (said here, with what to do)
        warnings.simplefilter("ignore", PrimeMisfitWarning)
        result = model.sample(alphabet.encode(f"{text} the")[None].to(device), steps=1, prime_chars=len(text) + 1,
                              prime=prime_strokes(offsets, *checkpoint_norm(ckpt)).to(device),
                              generator=torch.Generator(device=device).manual_seed(0))
    return result["prime_fit"].item()


def paginate(lines, per_page):
    """Page rows ('' = blank) -> pages of at most per_page (row number, text) pairs, none starting or ending blank."""
    pages = [[]]
    for n, ln in enumerate(lines):
        if len(pages[-1]) == per_page:
            pages.append([])
        if ln or pages[-1]:
            pages[-1].append((n, ln))
    for page in pages:
        while page and not page[-1][1]:
            page.pop()
    return [page for page in pages if page]


def page_path(path, k, pages):
    """The file of page k (from 0) of `pages`: path itself for one page, else path with -1, -2, ... before its extension."""
    stem, ext = os.path.splitext(path)
    return path if pages == 1 else f"{stem}-{k + 1}{ext}"


def write_strokes_file(args, model, ckpt, joined, texts, prime, prime_chars, generator, seed, t_start, t_load):
    """--out FILE.npz: sample every line, --batch-size at a time, and save their raw offsets with their texts
    (utils.save_strokes, plus `finished` and `attempts` per line). The lines are texts, sample-major, with ids 1..N.
    Stopped with Ctrl-C, it saves the lines done so far (their ids say which) and returns 130."""
    from tqdm import tqdm
    import utils
    from dataset import Alphabet, denormalize
    norm = checkpoint_norm(ckpt)
    done, interrupted = {}, False                                             # line index -> (offsets, finished, attempts)
    try:
        if args.task == "synthesis":
            from model import iter_write_lines
            for batch in iter_write_lines(model, joined, Alphabet(ckpt["alphabet"]), norm, bias=args.bias,
                                          generator=generator, batch_size=args.batch_size,
                                          max_steps_per_char=args.max_steps_per_char, progress=True,
                                          retries=args.retries, retry_above=args.retry_above, prime=prime,
                                          prime_chars=prime_chars, candidates=args.candidates, score=args.score):
                done.update(zip(batch["index"], zip(batch["raw"], batch["finished"], batch["attempts"])))
        else:
            with tqdm(total=len(texts), desc="generating", unit="line", disable=None) as bar:
                for a in range(0, len(texts), args.batch_size):
                    result = model.sample(steps=args.steps, bias=args.bias, prime=prime, generator=generator,
                                          batch_size=min(args.batch_size, len(texts) - a))
                    strokes = denormalize(result["strokes"].cpu().double().numpy(), *norm)
                    done.update((a + b, (line, True, 1)) for b, line in enumerate(strokes))
                    bar.update(len(strokes))
    except KeyboardInterrupt:
        interrupted = True
    t_sampled = time.perf_counter()
    if interrupted and not done:
        print(f"generate.py: interrupted before any line was done: nothing written ({args.out} left as it was)",
              file=sys.stderr)
        return 130
    rows = sorted(done)
    raw, finished, attempts = ([done[i][k] for i in rows] for k in range(3))
    utils.save_strokes(args.out, raw, [texts[i] if args.task == "synthesis" else "" for i in rows],
                       [str(i + 1) for i in rows], finished=finished, attempts=attempts)
    code = save_hand(args, model, ckpt, seed, texts[0], *done[0][:2]) if args.save_hand is not None and 0 in done else 0
    if interrupted:
        print(f"generate.py: interrupted: wrote the {len(rows):,} of {len(texts):,} lines done to {args.out} "
              f"(line_ids say which)", file=sys.stderr)
        return 130
    unfinished = [str(i + 1) for i in rows if not done[i][1]]
    if unfinished:
        print(f"generate.py: warning: {len(unfinished)} line(s) did not reach the end of their text within the cap "
              f"(--max-steps-per-char) in {args.retries + 1} attempt(s) or stopped before writing it (a prime whose "
              f"text lacks a word its strokes write), kept with finished = 0: line id(s) "
              f"{', '.join(unfinished[:10])}{' ...' if len(unfinished) > 10 else ''}", file=sys.stderr)
    step, retried, points = ckpt.get("step"), sum(a > 1 for a in attempts), sum(len(r) for r in raw)
    utils.say(f"wrote {args.out} ({len(texts):,} line(s) = {len(texts) // args.num_samples:,} x {args.num_samples} sample(s), "
              f"{points:,} points, {args.task}, bias {args.bias}, seed {seed}{f', model step {step}' if step is not None else ''}"
              f"{attempts_note(args, retried)})")
    utils.say(f"time: {t_sampled - t_load:.2f} s from checkpoint load to sampled lines ({len(texts) / (t_sampled - t_load):.1f} "
              f"lines/s, batches of {args.batch_size}); {time.perf_counter() - t_start:.2f} s in main")
    return code


def main(argv=None):
    args = get_args(argv)
    torch = sys.modules.get("torch")                    # called in-process (tests): leave torch as it was
    threads = torch.get_num_threads() if torch else None
    previous = interrupt_on_signals()                  # `timeout`, `kill`, job schedulers: stop as Ctrl-C does
    try:
        code = generate(args)
        sys.stdout.flush()                              # here, so that a closed pipe is caught below
        return code
    except GenerateError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:                             # `generate.py ... | head -1`: the files are written
        from utils import quiet_broken_pipe
        quiet_broken_pipe()
        return 0
    except OSError as e:                                # a file that cannot be written (name too long, disk full)
        print(f"generate.py: error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("generate.py: interrupted", file=sys.stderr)
        return 130
    finally:
        restore_signals(previous)
        if threads:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
