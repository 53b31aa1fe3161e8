"""Shared helpers: atomic file writes and drawing of pen strokes.

Nothing here does work at import time; matplotlib is imported only when drawing.
"""
import argparse
import functools
import json
import math
import os
import sys
import warnings
import zipfile
import zlib
from contextlib import contextmanager

import numpy as np

SPLITS = ("train", "valid", "test")   # split codes 0, 1, 2 in the prepared file (prepare_data.py writes, dataset.py reads)
MAX_LINE_CHARS = 64   # the longest line of IAM-OnDB's transcriptions: longer lines are outside what the models saw
MAX_CANDIDATES = 16   # --candidates at most (generate.py, evaluate.py): attempts per line, in one batch
MAX_BIAS = 100        # sampling bias at most (sigma = exp(sigma_hat - b): far beyond any use; 1e308 overflowed)
MAX_RETRIES = 20      # --retries at most (generate.py, evaluate.py)
MOST_STEPS_PER_CHAR = 200   # --max-steps-per-char at most (a stalled line runs to its cap: 40 characters, 8,000 steps)

# -----------------------------------------------------------------------------
# I/O and stroke drawing (data pipeline: prepare_data.py, dataset.py)


def temp_path(path):
    """Where atomic_write writes `path` first: a hidden file beside it (beside a symlink's target), its name short
    enough that any legal name of `path` has a legal temp name."""
    folder, name = os.path.split(os.path.realpath(path))
    return os.path.join(folder, "." + name.encode()[:200].decode(errors="ignore") + ".tmp")


def atomic_write(path, write_fn):
    """Write `path` all at once: write_fn(tmp) fills a temp file beside it, then os.replace.

    An interrupted run leaves the old file (or none), never half a file. A symlink is written through (its target
    replaced), an existing file keeps its permissions. write_fn gets the temp path; note that np.savez* appends
    '.npz' to str paths, so give numpy an open file: open(tmp, 'wb'). An OSError names `path`, not the temp file.
    """
    path = os.path.realpath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_path(path)
    try:
        write_fn(tmp)
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:
            e.filename = path
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    """Rows (dicts) as JSON Lines, one object per line, written atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, write)


def stop_on_signals(stop, say):
    """Training loops: Ctrl-C or SIGTERM (`timeout`, `kill`, a job scheduler) sets stop["why"] = "interrupted", so the
    loop ends its batch, evaluates and saves; a second one stops at once (KeyboardInterrupt: the last checkpoint
    saved stands, written atomically)."""
    import signal

    def handler(signum, frame):
        if stop["why"] == "interrupted":
            raise KeyboardInterrupt
        stop["why"] = "interrupted"
        say("interrupted: ending the batch, then evaluating and saving (press Ctrl-C again to stop at once)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def interrupt_on_signals():
    """Scripts without a training loop: Ctrl-C or SIGTERM (`timeout`, `kill`, a job scheduler) raises
    KeyboardInterrupt in the main thread, which the script reports in one line. A handler of our own also for SIGINT:
    with Python's default one, a SIGINT sent to prepare_data.py's process alone (not its workers) was lost while the
    main thread waited on the worker pool, and the run hung. Returns the previous handlers, for restore_signals."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def sampling_flag_errors(args):
    """generate.py's and evaluate.py --legibility's sampling flags typed (args.typed) where they change nothing, or
    naming a --styles file that is not there: a one-line message for each."""
    typed = args.typed
    return [message for on, message in (
        ("pick_with" in typed and args.candidates == 1,
         "--pick-with ranks the attempts of --candidates K: give --candidates 2 or more, or drop --pick-with"),
        ("retry_above" in typed and args.retries == 0,
         "--retry-above chooses the lines that --retries samples again, and --retries is 0: drop one of them"),
        ("styles" in typed and args.style is None and not args.prime_file,
         "--styles holds the styles of --style N (and the reference size of --prime-file): give one, or drop --styles"),
        ("styles" in typed and not os.path.isfile(args.styles),   # (the shipped one is looked for where it ships)
         f"--styles {args.styles} does not exist" + (" (a folder)" if os.path.isdir(args.styles) else "")))
        if on]


def stopped_at_once(script, out):
    """The line a training script prints when a second Ctrl-C (or one before training began) stops it at once."""
    last = os.path.join(out, "last.pt")
    return f"{script}: stopped at once; " + (f"the last checkpoint saved, {last}, stands (--resume auto goes on from it)"
                                             if os.path.exists(last) else f"nothing saved yet (no {last})")


def restore_signals(previous):
    """Put back the handlers interrupt_on_signals replaced."""
    import signal
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def already_done(args, run):
    """On resume: why a run has nothing left to do (at --max-steps or --epochs), or None; its files are left as they are."""
    if args.max_steps and run.step >= args.max_steps:
        return f"already at --max-steps {args.max_steps} (step {run.step}): nothing to do; raise --max-steps to train on"
    if run.epoch >= args.epochs:
        return f"already at --epochs {args.epochs} (epoch {run.epoch}): nothing to do; raise --epochs to train on"
    return None


def flag_of(dest):
    """An argparse dest as the flag typed: 'max_steps' -> '--max-steps'."""
    return "--" + dest.replace("_", "-")


def note_changed_flags(before, args, keys, measured, figure, say):
    """On resume: name (say) the flags among `keys` given otherwise than the run's (before: its checkpoint's
    train_args), and whether the best figure (`figure`) must be measured anew: True when one of `measured`, the flags
    that measure it, changed (best.pt's figure is then not comparable). A path (data, recognizer) is the same file by
    any name (--data DIR is DIR/iam_ondb.npz); one the run typed in another folder, not found from here, is not told
    apart."""
    def same(k, was, now):
        if was == now:
            return True
        if k not in ("data", "recognizer") or not was or not now:
            return False
        if k == "data":
            from dataset import prepared_file
            was, now = prepared_file(was), prepared_file(now)
        return not os.path.exists(was) or (os.path.exists(now) and os.path.samefile(was, now))
    changed = [k for k in keys if k in before and not same(k, before[k], getattr(args, k))]
    if changed:
        say("note: flags that differ from the run's: " + ", ".join(f"{flag_of(k)} {getattr(args, k)} (was {before[k]})"
                                                                     for k in changed)
            + "; pass the old values again to go on as it was")
    remeasured = [flag_of(k) for k in measured if k in changed]
    if remeasured:
        say(f"best figure reset: {figure} is measured otherwise now ({', '.join(remeasured)}); best.pt is replaced at "
            f"the next evaluation")
    return bool(remeasured)


def note_changed_data(ckpt, dataset, data, say):
    """On resume: whether `dataset` (a HandwritingDataset of --data `data`) holds other data than the run's, by the
    checkpoint's digest of it (checkpoints without one: by its normalisation), such as prepare_data.py run again into
    the same folder with other settings; says so (say). A figure measured on it is not comparable with best.pt's."""
    if "data_digest" in ckpt:
        changed = ckpt["data_digest"] != dataset.data_digest
    else:
        changed = "mean" in ckpt and not np.allclose(checkpoint_norm(ckpt), (dataset.mean, dataset.std), rtol=1e-4)
    if changed:
        say(f"note: {data} holds other data than the run was trained on (its lines, texts, splits, normalisation or "
            f"preparation settings differ: prepared anew?): training goes on with it; best figure reset, best.pt is "
            f"replaced at the next evaluation")
    return changed


def trim_metrics(path, step):
    """On resume: drop the rows of a metrics.jsonl after `step`, the checkpoint's (a run killed outright between its
    last checkpoint and its next rows), and a row cut short; the rows the resumed run writes follow on."""
    def row_step(line):
        try:
            step = json.loads(line)["step"]
            return step if isinstance(step, (int, float)) else math.inf
        except (ValueError, KeyError, TypeError):
            return math.inf
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = [line if line.endswith("\n") else line + "\n" for line in lines if row_step(line) <= step]
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(rows)
    if rows != lines:
        atomic_write(path, write)


def writable_folder(path, flag="--out"):
    """Create folder path if needed and check that a file can be written in it, before hours of work go into it:
    ValueError with a one-line message if not."""
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path} is a file; give a folder")
    probe = os.path.join(path, ".write_test")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to {flag} {path} ({e.strerror or e}); pass another {flag}") from None


def offsets_to_strokes(offsets):
    """(T, 3) rows (dx, dy, eos) -> list of (n, 2) float arrays of absolute points, one per stroke.

    The pen starts at (0, 0) before the first row (a real line's first row is (0, 0)); a stroke ends at each row
    with eos = 1.
    """
    if hasattr(offsets, "detach"):                             # torch tensor
        offsets = offsets.detach().cpu().numpy()
    offsets = np.asarray(offsets, dtype=np.float64)
    points = np.cumsum(offsets[:, :2], axis=0)                # (T, 2)
    ends = np.flatnonzero(offsets[:, 2] > 0.5) + 1            # split after every pen lift
    return [s for s in np.split(points, ends) if len(s)]


def save_strokes(path, lines, texts, line_ids=None, **per_line):
    """Write lines of raw offsets [(T_i, 3) (dx, dy, eos), ...] with their texts as an npz laid out like the prepared
    file (generate.py --save-strokes and .npz output; recognizer.py read): offsets (P, 2) float32, eos (P,) uint8,
    line_starts (N + 1,), texts (N,), line_ids (N,) (default "1".."N"), and any per_line arrays (N,) given by name."""
    lines = [np.asarray(o, dtype=np.float64).reshape(-1, 3) for o in lines]
    texts = list(texts)
    line_ids = [str(n + 1) for n in range(len(lines))] if line_ids is None else list(line_ids)
    for name, values in {"texts": texts, "line_ids": line_ids, **per_line}.items():
        if len(values) != len(lines):
            raise ValueError(f"save_strokes: {len(lines)} lines but {len(values)} {name}; give one per line")
    if len(set(map(str, line_ids))) != len(line_ids):
        raise ValueError("save_strokes: line_ids repeat; give every line its own id (merging files: number them anew)")
    starts = np.concatenate([[0], np.cumsum([len(o) for o in lines])]).astype(np.int64)
    rows = np.concatenate(lines) if lines else np.zeros((0, 3))
    arrays = {"offsets": rows[:, :2].astype(np.float32), "eos": (rows[:, 2] > 0.5).astype(np.uint8),
              "line_starts": starts, "texts": np.array(texts, dtype=str), "line_ids": np.array(line_ids, dtype=str),
              **{k: np.asarray(v) for k, v in per_line.items()}}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def output_extension(path, formats, flag, reads=()):
    """The extension of an output path (one of formats), after checking that it can be written, before any work: its
    folder exists, it is not a file this run reads (reads: input paths) nor a prepared IAM-OnDB file. ValueError with
    a one-line message otherwise."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'out' + formats[0])}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in formats:
        raise ValueError(f"{flag} {path}: unsupported extension '{ext or '(none)'}'; use {', '.join(formats)}")
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder; choose another path" if os.path.exists(folder)
                         else f"{flag} {path}: the folder {folder} does not exist; create it or choose another path")
    if os.path.isfile(path):
        if any(f and os.path.isfile(f) and os.path.samefile(path, f) for f in reads):
            raise ValueError(f"{flag} {path} is a file this run reads; give another file")
        if ext == ".npz" and is_prepared_file(path):
            raise ValueError(f"{flag} {path} is a prepared IAM-OnDB file (prepare_data.py), not to be written over; "
                             f"give another file")
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path} is read-only; make it writable, or choose another path")
    # where atomic_write writes first, and the name itself (too long, say) unless the file exists
    for probe in [temp_path(path)] + ([] if os.path.lexists(path) else [path]):
        try:
            with open(probe, "xb"):
                pass
            os.remove(probe)
        except FileExistsError:                          # left by an interrupted run: written over then
            pass
        except OSError as e:
            raise ValueError(f"{flag} {path} cannot be written: {e.strerror or e}; choose another path") from None
    return ext


def is_prepared_file(path):
    """Whether path is prepare_data.py's npz (it has a split and an alphabet; a strokes file has neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            return {"split.npy", "alphabet.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_strokes(path, per_line=False):
    """Read a strokes npz (save_strokes, or prepare_data.py's file, which has the same keys) ->
    (line ids, texts, [raw offsets (T_i, 3) float32, ...]), and with per_line=True also a dict of the file's other
    arrays of one value per line (generate.py's finished and attempts, say), so that save_strokes(out, lines, texts,
    ids, **per_line) writes the same file. Raises FileNotFoundError for a missing file and ValueError for one without
    those keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found" + (" (a folder)" if os.path.isdir(path) else ""))
    keys = ("offsets", "eos", "line_starts", "texts", "line_ids")
    try:
        with np.load(path, allow_pickle=False) as f:
            offsets, eos, starts = f["offsets"], f["eos"], f["line_starts"]
            texts, ids = [str(t) for t in f["texts"]], [str(t) for t in f["line_ids"]]
            extra = {k: f[k] for k in f.files if k not in keys and f[k].shape[:1] == (len(ids),)} if per_line else {}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:   # also: cut short
        raise ValueError(f"{path} is not a strokes file (npz with offsets, eos, line_starts, texts, line_ids: "
                         f"{type(e).__name__})") from None
    rows = np.column_stack([offsets, eos]).astype(np.float32)
    lines = [rows[a:b] for a, b in zip(starts[:-1], starts[1:])]
    return (ids, texts, lines, extra) if per_line else (ids, texts, lines)

# end of data pipeline helpers
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
### rendering: generate.py's pages, and captioned sheets of lines (plot_lines)
# A page of sampled lines, laid out with even line spacing and cropped to the ink, drawn as PNG or GIF with
# Pillow (a dependency of matplotlib, so nothing extra to install) or as SVG written by hand (one <path> per
# pen-down stroke, for pen plotters). Input: raw offsets (dx, dy with y up, eos); page: pixels with y down.

STROKE_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]   # matplotlib tab10
VIEWS = ("plain", "strokes", "eos", "density")   # plain ink, a colour per stroke, P(pen lift), ink over the density
PRIME_COLOR = (170, 170, 170)      # priming strokes (--show-prime)
EOS_LOW, EOS_HIGH = np.array([40, 90, 220.0]), np.array([225, 30, 30.0])   # view 'eos': P(pen lift) 0 -> 1


class PageLine:
    """One line of a page: raw offsets (T, 3), optional per-point values in [0, 1] (view 'eos'), and `start`,
    the number of leading priming points (drawn grey). layout_page fills xy (T, 2) and origin (2,) in pixels."""

    def __init__(self, offsets, value=None, start=0):
        self.offsets = np.asarray(offsets, dtype=np.float64).reshape(-1, 3)
        self.eos = self.offsets[:, 2] > 0.5
        self.value = None if value is None else np.asarray(value, dtype=np.float64)
        self.start = start
        self.xy = self.origin = None


class Page:
    def __init__(self, lines, width, height, scale, shrunk=False):
        self.lines, self.width, self.height, self.scale = lines, width, height, scale   # scale: pixels per raw unit
        self.shrunk = shrunk                                     # drawn smaller than line_height asked (max_side)


def row_pitch(lines, spacing=1.4, height=None):
    """Raw units between rows for these PageLines (None = blank row): `spacing` x the tallest 5-95 % y range, and at
    least `spacing` x height (default: a typical IAM-OnDB line's, PRIME_REFERENCE; 0: none), so that the size of the
    writing does not depend on the text: a line without tall letters or of punctuation alone is not blown up."""
    points = [np.cumsum(ln.offsets[:, :2], axis=0) for ln in lines if ln is not None and len(ln.offsets)]
    if not points:
        raise ValueError("nothing to draw")
    height = PRIME_REFERENCE["height"] if height is None else height
    pitch = spacing * max(height, *(np.subtract(*np.percentile(p[:, 1], [95, 5])) for p in points))
    return pitch if pitch > 0 else max(np.ptp(p, axis=0).max() for p in points) or 1.0


ALIGNS = {"left": 0.0, "center": 0.5, "right": 1.0}   # layout_page's align: the share of a row's spare width put before it


def layout_page(lines, line_height=100, margin=24, spacing=1.4, max_side=8000, pitch=None, align="left"):
    """Lay out PageLines (None = blank row) one per row, aligned to the left, centre or right of the widest (align),
    each sitting on its row by its baseline (estimated as the 20th percentile of y: descenders are few points); rows
    are `pitch` raw units apart (default row_pitch(lines, spacing); give one pitch to every page of a text for one size
    of writing), drawn `line_height` pixels apart. The page is cropped to the ink plus `margin` pixels (and scaled down
    to at most max_side pixels, None: no limit)."""
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {', '.join(ALIGNS)}, not {align!r}")
    points = [np.cumsum(ln.offsets[:, :2], axis=0) if ln is not None and len(ln.offsets) else None for ln in lines]
    pitch = pitch or row_pitch(lines, spacing)
    widest = max((np.ptp(p[:, 0]) for p in points if p is not None), default=0.0)
    placed = []                                                  # (xy, origin) in raw units, y up
    for row, p in enumerate(points):
        if p is None:
            placed.append(None)
            continue
        shift = np.array([-p[:, 0].min() + ALIGNS[align] * (widest - np.ptp(p[:, 0])),
                          -np.percentile(p[:, 1], 20) - row * pitch])
        placed.append((p + shift, shift))
    ink = np.concatenate([xy for xy, _ in filter(None, placed)])
    (x0, y0), (x1, y1) = ink.min(axis=0), ink.max(axis=0)
    scale = wanted = line_height / pitch
    if max_side:
        scale = min(scale, (max_side - 2 * margin) / max(x1 - x0, 1e-9), (max_side - 2 * margin) / max(y1 - y0, 1e-9))
    to_px = lambda q: np.stack([(q[..., 0] - x0) * scale + margin, (y1 - q[..., 1]) * scale + margin], axis=-1)
    for ln, pl in zip(lines, placed):
        if pl is not None:
            ln.xy, ln.origin = to_px(pl[0]), to_px(pl[1])
    width = int(np.ceil(round((x1 - x0) * scale + 2 * margin, 6)))        # round: max_side, not max_side + 1
    height = int(np.ceil(round((y1 - y0) * scale + 2 * margin, 6)))
    return Page(lines, max(width, 1), max(height, 1), scale, shrunk=scale < wanted)


def ink_rgb(color):
    """(r, g, b) of an ink colour: a name (black, navy), #rrggbb, or (r, g, b) itself. ValueError for a string that is no
    colour or a see-through one (the ink is opaque)."""
    if not isinstance(color, str):
        return tuple(color)
    from PIL import ImageColor
    try:
        rgb = ImageColor.getrgb(color)
    except ValueError:
        raise ValueError(f"{color!r} is not a colour; use a name (black, navy) or #rrggbb") from None
    if len(rgb) == 4 and rgb[3] != 255:
        raise ValueError(f"{color!r} is see-through; the ink is opaque: use a name or #rrggbb")
    return rgb[:3]


def _point_colors(line, view, color):
    """(T, 3) uint8 colour per point; the segment from point k-1 to k takes point k's colour. color: (r, g, b), a
    name or #rrggbb."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, not {view!r}")
    color = ink_rgb(color)
    T = len(line.offsets)
    if view == "strokes":
        stroke = np.concatenate([[0], np.cumsum(line.eos[:-1])]).astype(int)   # stroke number of every point
        rgb = np.array(STROKE_COLORS)[stroke % len(STROKE_COLORS)]
    elif view == "eos" and line.value is not None:
        v = np.clip(line.value, 0, 1)[:, None] ** 0.5            # sqrt: small probabilities stay visible
        rgb = EOS_LOW * (1 - v) + EOS_HIGH * v
    else:
        rgb = np.tile(np.array(color, dtype=float), (T, 1))
    rgb = np.asarray(rgb, dtype=float).copy()
    rgb[:line.start] = PRIME_COLOR
    return rgb.round().astype(np.uint8)


def _pen_runs(eos, a, b):
    """Pen-down runs among points a..b-1 as (i, j) inclusive, joined to point a-1 when the pen was down there."""
    k0 = a - 1 if a > 0 and not eos[a - 1] else a
    cuts = [k + 1 for k in range(k0, b - 1) if eos[k]]
    bounds = [k0] + cuts + [b]
    return [(i, j - 1) for i, j in zip(bounds[:-1], bounds[1:]) if j > i]


class _Ink:
    """Draws page lines on a canvas `ss` times the page size (anti-aliasing by reduce); image() gives the page."""

    def __init__(self, page, view="plain", color=(0, 0, 0), width=2.0, background=None, ss=3):
        from PIL import Image, ImageDraw
        self.page, self.ss, self.view = page, ss, view
        size = (page.width * ss, page.height * ss)
        if background is None:
            self.im = Image.new("RGB", size, "white")
        else:
            self.im = Image.fromarray(heat_rgb(background)).resize(size, Image.Resampling.BILINEAR)
        self.draw = ImageDraw.Draw(self.im)
        self.w = max(1, int(round(width * ss)))
        self.r = width * ss / 2
        self.colors = [None if ln is None else _point_colors(ln, view, color) for ln in page.lines]

    def _dot(self, p, c, r=None):
        r = max(r or self.r, 0.5)
        self.draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=c)

    def draw_range(self, n, a, b):
        """Draw points a..b-1 of line n."""
        ln = self.page.lines[n]
        if ln is None or b <= a:
            return
        xy, col = ln.xy * self.ss, [tuple(int(v) for v in c) for c in self.colors[n]]
        for i, j in _pen_runs(ln.eos, a, b):
            if i == j:
                self._dot(xy[i], col[i], max(self.r, self.ss))
            elif all(c == col[i + 1] for c in col[i + 1:j + 1]):
                self.draw.line([tuple(p) for p in xy[i:j + 1]], fill=col[i + 1], width=self.w, joint="curve")
                if self.w > 2:
                    self._dot(xy[i], col[i + 1])
                    self._dot(xy[j], col[j])
            else:                                                # a colour per segment (views eos, prime joins)
                for k in range(i + 1, j + 1):
                    self.draw.line([tuple(xy[k - 1]), tuple(xy[k])], fill=col[k], width=self.w)
                    if self.w > 2:
                        self._dot(xy[k], col[k])

    def draw_all(self):
        for n, ln in enumerate(self.page.lines):
            if ln is not None:
                self.draw_range(n, 0, len(ln.offsets))

    def image(self):
        return self.im.reduce(self.ss) if self.ss > 1 else self.im.copy()


def heat_rgb(heat):
    """(H, W) densities -> (H, W, 3) uint8: white where there is none, through yellow and orange to red."""
    from matplotlib import colormaps
    heat = np.asarray(heat, dtype=np.float64)
    top = np.percentile(heat[heat > 0], 99) if (heat > 0).any() else 1.0
    h = np.clip(heat / top, 0, 1) ** 0.5
    alpha = np.clip(3 * h, 0, 1)[..., None]
    rgb = 255 * (1 - alpha) + 255 * colormaps["YlOrRd"](h)[..., :3] * alpha
    return rgb.round().astype(np.uint8)


def save_png(page, path, view="plain", color=(0, 0, 0), width=2.0, background=None, title=None):
    """The page as a PNG (anti-aliased, white background); title is for SVG only."""
    ink = _Ink(page, view, color, width, background)
    ink.draw_all()
    image = ink.image()
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_gif(page, path, view="plain", color=(0, 0, 0), width=2.0, background=None, title=None,
             frames=100, frame_ms=40, hold_ms=2000):
    """An animated GIF of the pen writing: all lines at once, `frames` frames, the last held for hold_ms (title: SVG
    only)."""
    from PIL import Image
    ink = _Ink(page, view, color, width, background, ss=2)
    T = max(len(ln.offsets) for ln in page.lines if ln is not None)
    cuts = np.unique(np.linspace(0, T, min(frames, T) + 1).round().astype(int))
    images = [ink.image()]                                   # the empty page first
    for a, b in zip(cuts[:-1], cuts[1:]):
        for n, ln in enumerate(page.lines):
            if ln is not None:
                ink.draw_range(n, min(a, len(ln.offsets)), min(b, len(ln.offsets)))
        images.append(ink.image())
    palette = images[-1].quantize(colors=256 if background is not None else 64, method=Image.Quantize.MEDIANCUT)
    images = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    durations = [frame_ms] * (len(images) - 1) + [hold_ms]
    atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                  duration=durations, loop=0))


def save_svg(page, path, view="plain", color=(0, 0, 0), width=2.0, background=None, title=None):
    """The page as SVG: one <path> per pen-down stroke (views plain and strokes), usable by pen plotters.
    View eos draws one short path per segment; view density puts the heat-map under the ink as an embedded PNG."""
    from xml.sax.saxutils import escape
    hexc = lambda c: "#%02x%02x%02x" % tuple(int(v) for v in c)
    fmt = lambda p: f"{p[0]:.2f},{p[1]:.2f}"
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{page.width}" height="{page.height}" '
           f'viewBox="0 0 {page.width} {page.height}">']
    if title:
        out.append(f"<title>{escape(title)}</title>")
    if background is not None:
        import base64
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(heat_rgb(background)).save(buf, format="PNG")
        out.append(f'<image x="0" y="0" width="{page.width}" height="{page.height}" '
                   f'href="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>')
    out.append(f'<g fill="none" stroke-width="{width:g}" stroke-linecap="round" stroke-linejoin="round">')
    for n, ln in enumerate(page.lines):
        if ln is None:
            continue
        col = _point_colors(ln, view, color)
        for i, j in _pen_runs(ln.eos, 0, len(ln.offsets)):
            c = col[min(i + 1, j)]
            if view == "eos" and j > i and ln.value is not None:
                out += [f'<path d="M{fmt(ln.xy[k - 1])} L{fmt(ln.xy[k])}" stroke="{hexc(col[k])}"/>'
                        for k in range(i + 1, j + 1)]
            else:
                pts = ln.xy[i:j + 1] if j > i else ln.xy[[i, i]]   # a dot: zero-length path, drawn by its round cap
                out.append(f'<path d="M{fmt(pts[0])} L' + " ".join(fmt(p) for p in pts[1:]) + f'" stroke="{hexc(c)}"/>')
    out += ["</g>", "</svg>", ""]
    text = "\n".join(out)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def plot_lines(lines, path, line_height=60, width=1.5):
    """Draw [(offsets (T, 3) raw, caption), ...] to a PNG, one line per row under its caption, with the page
    renderer below (the look of generate.py's pages; each row scaled on its own). For data checks, training samples
    and the legibility report."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:                                      # Pillow < 10.1: the small bitmap font
        font = ImageFont.load_default()
    margin, caption_height, rows = 24, 20, []
    for offsets, caption in lines:
        image = None
        if len(offsets):
            ink = _Ink(layout_page([PageLine(offsets)], line_height=line_height, margin=margin), width=width)
            ink.draw_all()
            image = ink.image()
            image = image.crop((0, margin - 6, image.width, image.height - margin + 6))   # trim the vertical margins
        rows.append((str(caption), image))
    W = max([400] + [im.width for _, im in rows if im] + [int(font.getlength(c)) + 2 * margin for c, _ in rows])
    H = sum(caption_height + (im.height if im else 0) + margin // 2 for _, im in rows) + margin // 2
    page = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(page)
    y = margin // 2
    for caption, image in rows:
        draw.text((margin, y), caption, fill=(80, 80, 80), font=font)
        y += caption_height
        if image:
            page.paste(image, (0, y))
            y += image.height
        y += margin // 2
    atomic_write(path, lambda tmp: page.save(tmp, format="PNG"))


def plot_attention(phis, texts, path, prime_chars=0, max_rows=8):
    """The soft window (eq. 46-47): phi over time (x, points) and characters (y), one panel per line.
    phis: list of (T, U + 1) arrays (the last column is the position just past the text); texts: list of str.
    prime_chars: characters of priming text at the start of every text: only its last one is shown (the window is
    there when the new writing starts), and a line marks where the new text begins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    n = min(len(phis), max_rows)
    fig = Figure(figsize=(10, 0.6 + 2.4 * n))
    FigureCanvasAgg(fig)
    for r in range(n):
        phi, text = np.asarray(phis[r]), texts[r]
        ax = fig.add_subplot(n, 1, r + 1)
        U, lo = phi.shape[1] - 1, max(prime_chars - 1, 0)                  # characters lo..U shown
        ax.imshow(phi[:, lo:].T, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest",
                  extent=(-0.5, phi.shape[0] - 0.5, lo - 0.5, U + 0.5))
        labels = list(text[lo:U]) + ["end"]
        step = max(1, (U + 1 - lo) // 40)
        ax.set_yticks(range(lo, U + 1, step))
        ax.set_yticklabels(["\u2423" if c == " " else c for c in labels[::step]], fontsize=6)
        if prime_chars:
            ax.axhline(prime_chars - 0.5, color="white", linewidth=0.8, linestyle="--")
        ax.set_title(f"line {r + 1}: {text[prime_chars:]}" + (" (after the priming text)" if prime_chars else ""),
                     fontsize=9, loc="left")
        ax.set_ylabel("character")
    ax.set_xlabel("time step (points)")
    if len(phis) > n:
        fig.suptitle(f"first {n} of {len(phis)} lines", fontsize=9)
    fig.tight_layout()
    ext = os.path.splitext(path)[1].lower()
    meta = {".svg": {"Date": None}, ".pdf": {"CreationDate": None}}.get(ext, {})
    from matplotlib import rc_context
    with rc_context({"svg.hashsalt": "attention"}):     # an SVG's element ids are random unless salted: same seed, same file
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format=ext[1:], metadata=meta))


STYLE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,'")   # common, well-learnt characters


def pen_down_steps(off):
    """The steps of a line (raw offsets (T, 3)) drawn with the pen down, (N, 2): those after a point that did not
    lift the pen (the step after a lift is a jump to the next stroke)."""
    return off[1:][off[:-1, 2] == 0, :2]


def _line_features(off):
    """Looks of one line (raw offsets (T, 3)): height (5-95 % of y), slant (degrees, + = leaning right, from
    near-vertical pen-down segments), and the longest pen-down step."""
    p = np.cumsum(off[:, :2], axis=0)
    down = pen_down_steps(off)
    steep = down[np.abs(down[:, 1]) > np.abs(down[:, 0])]
    w = np.linalg.norm(steep, axis=1)
    slant = np.degrees(np.arctan2(steep[:, 0] * np.sign(steep[:, 1]), np.abs(steep[:, 1])))
    order = np.argsort(slant)
    median_slant = slant[order][np.searchsorted(np.cumsum(w[order]), w.sum() / 2)] if len(w) else 0.0
    height = np.percentile(p[:, 1], 95) - np.percentile(p[:, 1], 5)
    return height, float(median_slant), float(np.linalg.norm(down, axis=1).max()) if len(down) else 0.0


def size_drift(off):
    """How the size of the writing changes along a line (raw offsets (T, 3)): the mean pen-down step in the last
    third of the line's pen-down steps over the mean in the first third; 1 = even, < 1 = it shrinks (None below 6
    pen-down steps). Real lines stay near 1; biased sampling can shrink as a line goes on (docs/results.md)."""
    down = np.linalg.norm(pen_down_steps(off), axis=1)
    third = len(down) // 3
    if third < 2 or down[:third].mean() == 0:
        return None
    return float(down[-third:].mean() / down[:third].mean())


def _words_agree(off, text, ratio=1.5):
    """True when the ink splits naturally into as many words as `text` has: the (W-1)th widest horizontal gap
    between strokes is `ratio` times the Wth. Catches transcriptions with a word too many or too few."""
    spans = sorted((s[:, 0].min(), s[:, 0].max()) for s in offsets_to_strokes(off))
    gaps, end = [], spans[0][1]
    for a, b in spans[1:]:
        gaps.append(a - end)
        end = max(end, b)
    gaps, W = sorted(gaps, reverse=True) + [0.0], len(text.split())
    return W == 1 or (len(gaps) >= W and gaps[W - 2] > ratio * max(gaps[W - 1], 1.0))


def make_styles(data="data/processed/iam_ondb.npz", out="data/styles.json", preview="docs/styles.png", count=10):
    """Pick `count` real lines for generate.py --style from the validation and test writers (never trained on):
    one line per writer, 20-40 characters of common letters and punctuation, no pen jumps, then the writers
    whose looks (height, slant, width and points per character) are farthest apart. Writes them as raw integer
    offsets with text, writer and line id to `out` (JSON) and draws them, numbered, to `preview`.

        python -c "import utils; utils.make_styles()"
    """
    from dataset import load_prepared
    d = load_prepared(data)
    starts, off_all = d["line_starts"], d["offsets"]
    line = lambda i: np.concatenate([off_all[starts[i]:starts[i + 1]].astype(np.int64),
                                     d["eos"][starts[i]:starts[i + 1], None].astype(np.int64)], axis=1)
    heights = [np.ptp(np.percentile(np.cumsum(line(i)[:, :2], axis=0)[:, 1], [5, 95]))
               for i in np.flatnonzero(d["split"] == 0)[::10]]
    steps = [np.median(np.linalg.norm(pen_down_steps(line(i)), axis=1))
             for i in np.flatnonzero(d["split"] == 0)[::10]]
    ref_height, ref_step = float(np.median(heights)), float(np.median(steps))
    by_writer = {}
    for i in np.flatnonzero(d["split"] > 0):
        text = str(d["texts"][i])
        if not 20 <= len(text) <= 40 or not set(text) <= STYLE_CHARS or "  " in text:
            continue
        off = line(i)
        height, slant, jump = _line_features(off)
        width = np.ptp(np.cumsum(off[:, 0]))
        if not (0.7 * ref_height < height < 1.6 * ref_height and 12 <= len(off) / len(text) <= 35
                and jump < 8 * ref_step and _words_agree(off.astype(np.float64), text)):
            continue
        by_writer.setdefault(str(d["writer_ids"][i]), []).append(
            (i, [height / ref_height, slant / 10, width / len(text) / ref_height, len(off) / len(text) / 20]))
    # per writer the most typical of its lines; then farthest-point sampling over writers, from the most typical
    writers = sorted(by_writer)
    picks = []
    for w in writers:
        f = np.array([x for _, x in by_writer[w]])
        picks.append(by_writer[w][int(np.argmin(np.abs(f - np.median(f, axis=0)).sum(axis=1)))])
    if len(picks) < count:
        raise ValueError(f"only {len(picks)} writers have suitable lines; ask for fewer styles")
    feats = np.array([x for _, x in picks])
    z = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-9)
    z[np.abs(z).max(axis=1) > 1.5] = np.nan                       # extremes are varied but often hard to read
    if np.isfinite(z[:, 0]).sum() < count:
        raise ValueError(f"only {int(np.isfinite(z[:, 0]).sum())} writers have suitable lines; ask for fewer styles")
    chosen = [int(np.nanargmin(np.abs(z).sum(axis=1)))]
    while len(chosen) < count:
        dist = np.min([np.linalg.norm(z - z[c], axis=1) for c in chosen], axis=0)
        chosen.append(int(np.nanargmax(dist)))
    styles = []
    for n, c in enumerate(chosen):
        i = picks[c][0]
        height, slant, _ = _line_features(line(i))
        styles.append({"style": n, "text": str(d["texts"][i]), "writer": str(d["writer_ids"][i]),
                       "line_id": str(d["line_ids"][i]), "split": ["train", "valid", "test"][int(d["split"][i])],
                       "height": round(float(height), 1), "slant_degrees": round(slant, 1),
                       "offsets": line(i).tolist()})
    doc = {"about": "Real IAM-OnDB lines for generate.py --style N: raw offsets [dx, dy (y up), eos] in the board's "
                    "units, first point (0, 0); picked by utils.make_styles from validation/test writers.",
           "reference": {"height": round(ref_height, 1), "step": round(ref_step, 2)},
           "styles": styles}
    body = json.dumps(doc, separators=(",", ":")).replace('{"style"', '\n{"style"')

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body + "\n")
    atomic_write(out, write)
    if preview:
        draw_styles(styles, preview)
    return styles


def load_styles(path):
    """The styles file (make_styles): {"reference": {...}, "styles": [{"text", "offsets", ...}, ...]}. Raises
    FileNotFoundError or ValueError with a one-line message."""
    try:
        with open(path, encoding="utf-8-sig") as f:     # -sig: a byte-order mark (Notepad) is dropped
            data = json.load(f)
        styles = data["styles"]
        assert isinstance(styles, list) and styles
    except FileNotFoundError:
        raise FileNotFoundError(f"no styles file at {path}; pass --styles FILE (see README: styles)") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise ValueError(f"--styles {path} is not a styles file (JSON with a non-empty 'styles' list)") from None
    ref = data.get("reference", {})
    ref = {**PRIME_REFERENCE, **ref} if isinstance(ref, dict) else {}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 1e5
    if not (ref and number(ref["height"]) and number(ref["step"]) and ref["step"] < ref["height"]):
        raise ValueError(f"--styles {path}: 'reference' must be {{\"height\": H, \"step\": S}}, board units from 1 to "
                         f"100,000, the step below the height (IAM-OnDB: {PRIME_REFERENCE['height']:g} and "
                         f"{PRIME_REFERENCE['step']:g})")
    return data


def load_style(path, n):
    """--style N of the styles file at path -> (text, raw offsets (T, 3) float64, first point (0, 0))."""
    styles = load_styles(path)["styles"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(styles):
        raise ValueError(f"--style {n!r} does not exist: {path} has styles 0 to {len(styles) - 1} (see docs/styles.png)")
    try:
        text, offsets = styles[n]["text"], np.asarray(styles[n]["offsets"], dtype=np.float64).reshape(-1, 3)
        assert isinstance(text, str) and text.strip() and len(offsets) > 1 and np.isfinite(offsets).all()
        return text, offsets
    except (KeyError, TypeError, ValueError, AssertionError):
        raise ValueError(f"--styles {path}: style {n} is not a text with finite offsets") from None


# offsets of lines in IAM-OnDB (raw units): used to bring a --prime-file to the data's scale when the styles file
# has no "reference" entry. height: 5-95 % range of y over a line; step: median pen-down step length.
PRIME_REFERENCE = {"height": 343.0, "step": 19.6}
MAX_PRIME_POINTS = 4000     # a priming line longer than this is not a line
MIN_PRIME_POINTS_PER_CHAR = 4   # at the data's point spacing: IAM-OnDB lines have 9-90 per character (median 21)
SAVED_HAND_PAST = 4.0       # characters a saved hand's window may run past its text unsaid (saved_hand_misfit)


def respace_stroke(points, step):
    """Points (n, 2) along one pen-down stroke -> points spaced `step` apart along its path, interpolated (ends kept):
    a mouse or tablet samples a line far more sparsely or densely than IAM-OnDB's pen (prepare_data.resample_stroke
    only drops points)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    length = seg.sum()
    if len(points) < 2 or length < step:
        return points[[0, -1]] if len(points) > 1 and length > 0 else points[:1]
    s = np.concatenate([[0.0], np.cumsum(seg)])
    keep = np.concatenate([[True], seg > 0])                  # np.interp needs increasing positions
    at = np.append(np.arange(0.0, length, step), length)
    return np.stack([np.interp(at, s[keep], points[keep, i]) for i in range(2)], axis=1)


def load_prime_file(path, styles_path=None):
    """--prime-file: JSON {"text": ..., "strokes": [[[x, y], ...], ...], "y_up": false} -> (text, raw offsets (T, 3),
    first point (0, 0)), brought to the scale and point spacing of IAM-OnDB lines (the styles file's "reference" when
    it has one, else PRIME_REFERENCE). Raises FileNotFoundError or ValueError with a one-line message."""
    try:
        with open(path, encoding="utf-8-sig") as f:     # -sig: a byte-order mark (Notepad) is dropped
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--prime-file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prime-file {path}: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise ValueError(f"--prime-file {path} is not valid JSON: {e}") from None
    bad = (f"--prime-file {path} must hold {{\"text\": \"...\", \"strokes\": [[[x, y], ...], ...]}} "
           f"(a list of strokes, each a list of [x, y] points)")
    if not isinstance(data, dict) or not isinstance(data.get("text"), str) or not isinstance(data.get("strokes"), list):
        raise ValueError(bad)
    try:
        strokes = [np.asarray(s, dtype=np.float64) for s in data["strokes"]]
    except (ValueError, TypeError):
        raise ValueError(bad) from None
    if not all(s.ndim == 2 and s.shape[1] == 2 for s in strokes if s.size):
        raise ValueError(bad)
    strokes = [s for s in strokes if len(s)]
    if not data["text"].strip() or not strokes or not all(np.isfinite(s).all() for s in strokes):
        raise ValueError(f"--prime-file {path} needs a non-empty text and at least one stroke of finite numbers")
    ref = dict(PRIME_REFERENCE)
    if styles_path and os.path.exists(styles_path):
        ref.update(load_styles(styles_path).get("reference", {}))
    if not isinstance(data.get("y_up", False), bool):
        raise ValueError(f"--prime-file {path}: \"y_up\" must be true or false")
    if not data.get("y_up", False):
        strokes = [s * [1, -1] for s in strokes]              # screen coordinates -> y up, as in the data
    if not isinstance(data.get("data_units", False), bool):
        raise ValueError(f"--prime-file {path}: \"data_units\" must be true or false")
    points = np.concatenate(strokes)
    with np.errstate(over="ignore", invalid="ignore"):
        height = np.percentile(points[:, 1], 95) - np.percentile(points[:, 1], 5)
        width = np.ptp(points[:, 0])
    if not (np.isfinite(height) and np.isfinite(width)):
        raise ValueError(f"--prime-file {path}: the coordinates are too large (up to {np.abs(points).max():.3g}); "
                         f"use pixels or mm")
    if height <= 0:
        raise ValueError(f"--prime-file {path}: the strokes have no height; is it handwriting?")
    if not height / 50 <= width <= 200 * height:                # a line of handwriting is some characters wide
        raise ValueError(f"--prime-file {path}: the strokes are {width / height:.3g} times as wide as high; give one "
                         f"line of handwriting")
    # a line the model wrote (--save-hand, data_units) keeps its size; every line gets the data's point spacing
    scale = 1.0 if data.get("data_units", False) else ref["height"] / height
    strokes = [respace_stroke(s * scale, ref["step"]) for s in strokes]
    points = np.concatenate(strokes)
    if len(points) > MAX_PRIME_POINTS:
        raise ValueError(f"--prime-file {path} is too long ({len(points)} points after resampling, at most "
                         f"{MAX_PRIME_POINTS}); use one line of handwriting")
    text = " ".join(data["text"].split())
    if len(points) < MIN_PRIME_POINTS_PER_CHAR * len(text):   # too little ink for the text: the model reads a few letters
        raise ValueError(f"--prime-file {path}: {len(points)} points for {len(text)} characters of text, too few to "
                         f"write it (at least {MIN_PRIME_POINTS_PER_CHAR} per character at the data's spacing; real "
                         f"lines have about 21); give the strokes of the whole text")
    offsets = np.zeros((len(points), 3))
    offsets[1:, :2] = np.diff(points, axis=0)
    offsets[np.cumsum([len(s) for s in strokes]) - 1, 2] = 1
    return text, offsets


def saved_hand(path):
    """Whether a --prime-file (already read by load_prime_file) is a line the model wrote, saved by --save-hand."""
    with open(path, encoding="utf-8-sig") as f:
        return json.load(f).get("data_units", False)


def saved_hand_misfit(warning):
    """relay_warnings' reword for a saved hand's PrimeMisfitWarning. Its text is what its strokes write, but a sampled
    line ends as its window passes its text, so read back the window is nearly always past it: 2.5-3.9 characters for
    14 of 18 hands, and harmless there; beyond SAVED_HAND_PAST lines misread their first word twice as often (README,
    Styles). Only that is said, with what to do."""
    if warning.fit > SAVED_HAND_PAST:
        return (f"the saved hand's window runs {warning.fit:.1f} characters past the end of its text (beyond "
                f"{SAVED_HAND_PAST:g}, lines misread their first word about twice as often): save the hand again with "
                f"another --seed")
    return None if warning.fit > 0 else str(warning)


def prime_file_reword(path):
    """relay_warnings' reword for the PrimeMisfitWarning of a --prime-file (path None: no file): a saved hand has its
    own rule (saved_hand_misfit); any other prime is warned of as the model words it (None)."""
    return saved_hand_misfit if path and saved_hand(path) else None


def save_prime_file(path, text, offsets, source=None):
    """A written line as a --prime-file: JSON {"text", "strokes", "data_units": true} (load_prime_file's format,
    screen coordinates, y down, in the data's units: read back at its size, not scaled to a reference height as a
    hand's own strokes are) from its raw offsets (T, 3), so that later texts are written in the same hand. Written
    atomically."""
    strokes = [[[round(float(x), 2) or 0.0, round(-float(y), 2) or 0.0] for x, y in part]   # or: no -0.0
               for part in offsets_to_strokes(offsets)]
    data = {"text": text, "strokes": strokes, "data_units": True, **({"source": source} if source else {})}

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
    atomic_write(path, write)


def load_prime(styles_path, style=None, prime_file=None):
    """--style N or --prime-file FILE (generate.py, evaluate.py) -> (text, raw offsets (T, 3), first point (0, 0)),
    or (None, None) for neither. Raises FileNotFoundError or ValueError with a one-line message."""
    if style is not None:
        return load_style(styles_path, style)
    if prime_file:
        return load_prime_file(prime_file, styles_path)              # brought to the data's scale and spacing
    return None, None


def draw_styles(styles, path):
    """All styles, numbered as for --style N, with their text, writer and slant: docs/styles.png."""
    plot_lines([(np.asarray(s["offsets"], dtype=np.float64),
                 f"style {n}: \"{s['text']}\"  (writer {s['writer']}, {s['line_id']}, slant {s.get('slant_degrees', 0):+.0f} deg)")
                for n, s in enumerate(styles)], path, line_height=50)

# end of rendering
# -----------------------------------------------------------------------------


### checkpoints, training plots and samples (train.py, evaluate.py, generate.py)

DTYPES = ("float32", "bfloat16", "float16")   # --dtype choices: autocast dtypes (losses stay float32)


def autocast_dtype(name, device):
    """--dtype as a torch dtype, or ValueError where autocast cannot run it: on a CPU, PyTorch's fused LSTM (oneDNN)
    has no bf16/fp16 kernel on some CPUs and fails deep inside (measured: an AVX2-only EPYC VM failed, the AVX-512
    Zen 4 VMs ran bf16 but not fp16), so it is probed once."""
    import torch
    dtype = getattr(torch, name)
    if dtype != torch.float32 and torch.device(device).type == "cpu" and not cpu_lstm_supports(dtype):
        measured = ("it ran on AVX-512 CPUs such as AMD Zen 4, not on an AVX2-only one" if name == "bfloat16" else
                    "none of the CPUs tried had one, AVX-512 AMD Zen 4 included, where bfloat16 ran")
        raise ValueError(f"--dtype {name}: this CPU's LSTM kernels (oneDNN) have no {name} path ({measured}); leave "
                         f"out --dtype (float32), or use a GPU")
    return dtype


@functools.lru_cache(maxsize=None)
def cpu_lstm_supports(dtype):
    """Whether a tiny nn.LSTM runs forward and backward under CPU autocast in `dtype` on this machine."""
    import torch
    lstm, x = torch.nn.LSTM(4, 4, batch_first=True), torch.zeros(1, 2, 4, requires_grad=True)
    try:
        with torch.autocast("cpu", dtype=dtype):
            y = lstm(x)[0]
        y.float().sum().backward()
        return True
    except RuntimeError:
        return False


def learning_rate(step, total_steps, lr, warmup=0, schedule="constant", progress=None):
    """Linear warm-up over `warmup` steps, then constant or cosine decay to lr/20 at total_steps. progress (0 to 1), if
    given, is how far the decay has gone instead of (step - warmup) / (total_steps - warmup): e.g. of a time budget."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if progress is None:
        progress = (step - warmup) / max(total_steps - warmup, 1)
    progress = min(max(progress, 0.0), 1.0)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(name, params, lr):
    """'adam' (fused: one kernel per step, and it can skip a step on the device, see clipped_step) or 'rmsprop'
    (Graves (2013) eq. 38-41's decay, momentum and eps, but torch adds eps outside the square root, and our loss is a
    mean per point where the paper's is a line's sum: an approximation, not a replica)."""
    import torch
    params = list(params)
    if name == "adam":
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(params, lr=lr, fused=fused)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.95, momentum=0.9, eps=1e-4, centered=True)


def clipped_step(optimizer, params, loss_sum, clip):
    """Clip the gradient norm to `clip` (0: no clipping), then an optimiser step unless the loss or the gradient is
    not finite. Returns `ok`, a bool tensor on the device. Fused Adam skips on the device (found_inf, the mechanism of
    torch.amp.GradScaler), so no host sync is needed and the host can queue the next chunk while the GPU works; other
    optimisers read ok first (one sync)."""
    import torch
    # why clip: rare huge gradients from near-singular Gaussians would otherwise wreck the weights
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    ok = torch.isfinite(loss_sum) & torch.isfinite(gnorm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()     # skipped: weights, moments and Adam's step count left as they were
        optimizer.step()
    elif ok.item():
        optimizer.step()
    return ok


class WeightAverage:
    """Exponential moving average of the weights (Polyak averaging): after every optimiser step
    average <- average + (1 - d) (weights - average), d = min(decay, (1 + step) / (10 + step)) so that the first
    steps do not drag in the initial weights for long. The average sits beside the model; `swapped_in()` puts it into
    the model's parameters in place (for evaluation, sampling) and the training weights back afterwards, so CUDA
    graphs and the optimiser, which hold the parameters' storage, see nothing change."""

    def __init__(self, model, decay):
        self.model, self.decay = model, decay
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params]

    def update(self, step):
        import torch
        with torch.no_grad():
            torch._foreach_lerp_(self.average, self.params, 1 - min(self.decay, (1 + step) / (10 + step)))

    @contextmanager
    def swapped_in(self):
        import torch
        with torch.no_grad():
            training = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, training)

    def state_dict(self):
        """The model's state dict with the averaged weights in place of the parameters (copies)."""
        average = {name: a for (name, _), a in zip(self.model.named_parameters(), self.average)}
        return {k: average.get(k, v).detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        import torch
        with torch.no_grad():
            for (name, _), a in zip(self.model.named_parameters(), self.average, strict=True):
                a.copy_(state[name])


def show_chars(chars):
    """Characters for a message: quoted, or by code point where quoting shows nothing (a lone accent, a control)."""
    import unicodedata
    return " ".join(repr(c) if c.isprintable() and not unicodedata.combining(c) else f"U+{ord(c):04X}" for c in chars)


def warn_unwritten(prog, forms, dropped):
    """One warning line each for the characters the model's alphabet lacks: those written in another form
    ({character: form}, Alphabet.fold: 'é' as 'e') and those left out."""
    if forms:
        print(f"{prog}: warning: wrote " + ", ".join(f"{show_chars(a)} as {b!r}" for a, b in forms.items())
              + " (not in the alphabet)", file=sys.stderr)
    if dropped:
        print(f"{prog}: warning: left out {show_chars(dropped)} (not in the alphabet)", file=sys.stderr)


def finite_float(text):
    """argparse type for float flags: a number, but not nan or inf (they would reach the model as garbage)."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help adds "(default: X)" to a flag's help, unless the help states its default itself or there is none to
    state (None, or False for a switch)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block left to --help), for every script's flags."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_typed(self, argv=None):
        """parse_args, plus args.typed: the flags (dests) given on the command line, even at their default value, so
        that a script can refuse one that does not apply to the run rather than ignore it. (Parsed a second time into a
        namespace that already holds a marker for every flag: argparse fills in defaults only where nothing is set.)"""
        args = self.parse_args(argv)
        unset = object()
        seen = self.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in self._actions}))
        args.typed = {k for k, v in vars(seen).items() if v is not unset}
        return args


def at_least(low, below=None, exclusive=False):
    """argparse type for a flag with a floor: at_least(1) takes integers >= 1, at_least(0.0) finite floats >= 0;
    exclusive: > low; below: and < below."""
    import argparse
    kind = "an integer" if isinstance(low, int) else "a number"
    wanted = f"{kind} {'>' if exclusive else '>='} {low}" + (f" and < {below}" if below is not None else "")

    def parse(text):
        try:
            value = int(text) if isinstance(low, int) else finite_float(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected {wanted}, not {text!r}") from None
        if value < low or (exclusive and value == low) or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {wanted}, not {text!r}")
        return value
    return parse


def bias_value(text):
    """argparse type for a sampling bias (section 5.4): a number from 0 (the network's own distribution) to MAX_BIAS."""
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        value = math.nan
    if not 0 <= value <= MAX_BIAS:
        raise argparse.ArgumentTypeError(f"expected a number from 0 (unbiased) to {MAX_BIAS}, not {text!r} (beyond about 5 "
                                         f"the writing no longer changes)")
    return value


def quiet_broken_pipe():
    """After a BrokenPipeError (output piped into `head`, which stopped reading): send the rest of stdout to the null
    device, so that Python's flush at exit adds no traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def say(text):
    """print(text) for a script that goes on writing files after it: if the reader of a pipe has gone (`| head -1`,
    unbuffered output), the rest of stdout is dropped and the work goes on."""
    try:
        print(text)
    except BrokenPipeError:
        quiet_broken_pipe()


@contextmanager
def relay_warnings(prog, category, reword=None):
    """Python warnings of `category` raised inside (the model's PrimeMisfitWarning) -> one line on stderr,
    'prog: warning: ...', for the first of them only (batch after batch would repeat it); other warnings as before.
    reword(warning) -> the line to print instead, or None to pass it over (saved_hand_misfit)."""
    shown = False

    def show(message, cat, *args, **kwargs):
        nonlocal shown
        if not issubclass(cat, category):
            return original(message, cat, *args, **kwargs)
        line = reword(message) if reword else message
        if line is not None and not shown:
            print(f"{prog}: warning: {line}", file=sys.stderr, flush=True)
            shown = True
    with warnings.catch_warnings():                  # restores the filters and showwarning after the block
        warnings.simplefilter("always", category)
        original, warnings.showwarning = warnings.showwarning, show
        yield


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; anything else as given ('cpu', 'cuda:1', 'mps', ...), checked (CUDA: its
    availability and the GPU number; other kinds by putting a tensor there). Raises ValueError with a one-line message
    (for --device) when this machine cannot use it."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device {name}: CUDA is not available here ({why}); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "meta":                # tensors there have shapes but no values: nothing can run
        raise ValueError(f"--device {name} holds shapes, not numbers; use cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPUs) is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):   # not on CUDA: under torchrun every process would open a context on GPU 0
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"--device {name} cannot be used here ({str(e).splitlines()[0][:80]}); use --device cpu") from None
    return device


def training_state(model, optimizer, run, device, average=None):
    """What a checkpoint needs to continue exactly: weights, optimiser, counters (run's attributes) and RNG states.
    With a WeightAverage, `model` holds the average (what is evaluated and shipped) and `train_weights` the weights
    the optimiser steps."""
    import torch
    weights = {"model": average.state_dict(), "train_weights": model.state_dict()} if average else {"model": model.state_dict()}
    return {**weights, "optimizer": optimizer.state_dict(), "step": run.step,
            "run": dict(run.__dict__),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def restore_training_state(checkpoint, model, optimizer, run, device):
    """Inverse of training_state: load the weights the optimiser steps, optimiser, counters and RNG states in place
    (a WeightAverage's `model` is loaded by its owner)."""
    import torch
    model.load_state_dict(checkpoint.get("train_weights", checkpoint["model"]))
    optimizer.load_state_dict(checkpoint["optimizer"])
    run.__dict__.update(checkpoint["run"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)


def save_checkpoint(checkpoint, path):
    """torch.save a plain dict atomically: a crash never leaves a half-written checkpoint."""
    import torch
    try:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    except RuntimeError as e:   # torch reports a full disk so ("PytorchStreamWriter failed writing file ...")
        raise OSError(f"cannot write {path} ({str(e).splitlines()[0]})") from None


def export_weights(checkpoint, path, dtype="float16"):
    """Write the shippable part of a training checkpoint: weights (as dtype) and what generation needs
    (config, alphabet, normalisation, step, metrics); no optimiser or RNG state."""
    import torch
    keep = ("model_config", "recognizer_config", "alphabet", "mean", "std", "step", "metrics", "train_args")
    weights = {k: v.to(getattr(torch, dtype)) for k, v in checkpoint["model"].items()}
    save_checkpoint({"model": weights, **{k: checkpoint[k] for k in keep if k in checkpoint}}, path)


def checkpoint_norm(checkpoint, dtype=np.float64):
    """(mean, std): the normalisation of the offsets a checkpoint's model reads and writes, as numpy arrays (3,)."""
    return tuple(np.asarray(checkpoint[k], dtype=dtype) for k in ("mean", "std"))


def load_checkpoint(path, map_location="cpu", config_key="model_config", writer="train.py", flag="--checkpoint"):
    """Load one of our checkpoints with weights_only=True: a dict with `model` and `config_key` (model_config for
    train.py's, recognizer_config for recognizer.py's). Raises FileNotFoundError or ValueError with a one-line
    message that says what to do (`writer` names the script that makes such checkpoints, `flag` the flag that gave
    the path)."""
    import torch
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is a folder; pass a .pt file in it (last.pt, best.pt, model.pt)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train one with {writer} or pass {flag} PATH")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # pickle, zip and torch errors all mean the same thing to a user, but for the device
        if isinstance(e, RuntimeError) and "device" in str(e).lower():
            raise ValueError(f"cannot load {path} onto {map_location}: {str(e).splitlines()[0]}") from None
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}): cut short, damaged or not "
                         f"a .pt file; " + ("resume from the run's best.pt instead, or " if flag == "--resume" else "")
                         + f"pass a .pt file written by {writer}") from None
    if not isinstance(checkpoint, dict) or config_key not in checkpoint or "model" not in checkpoint:
        kind = "handwriting" if config_key == "model_config" else config_key.split("_")[0]
        other = {"recognizer_config": "a recognizer checkpoint (recognizer.py)",
                 "model_config": "a handwriting checkpoint (train.py)"}
        what = next((other[k] for k in other if k != config_key and isinstance(checkpoint, dict) and k in checkpoint),
                    f"not a {kind} checkpoint (no {config_key}/model)")
        raise ValueError(f"{path} is {what}; pass a .pt file written by {writer}")
    if flag == "--resume" and "optimizer" not in checkpoint:
        raise ValueError(f"{path} holds weights only (no optimiser state, like model.pt and the shipped files): resume "
                         f"from a run's last.pt" + (", or train on from these weights with --init-from"
                                                     if config_key == "model_config" else ""))
    return checkpoint


RUN_FILES = ("last.pt", "best.pt", "model.pt", "metrics.jsonl")   # a run folder's files (train.py, recognizer.py train)


def in_another_folder(checkpoint, out):
    """Whether a checkpoint file lies outside the run folder `out`."""
    return os.path.realpath(os.path.dirname(os.path.abspath(checkpoint))) != os.path.realpath(out)


def moved_run(resume, out, say):
    """On resume: whether the checkpoint `resume` goes on in another folder than its own, `out`; says so (say). Its
    best figure then starts afresh, so that OUT/best.pt (and model.pt) are written there at the first evaluation."""
    moved = in_another_folder(resume, out)
    if moved:
        say(f"note: {resume} goes on in {out}: best figure reset, {out}/best.pt is written at the next evaluation "
            f"(the best of the run so far stays in {os.path.dirname(resume) or '.'})")
    return moved


def resume_path(out, resume):
    """The checkpoint --resume names: None, a path, or 'auto' (OUT/last.pt if it exists). A run that would overwrite
    another run's files in OUT is refused: a new one where any of them is, or resuming a checkpoint from another
    folder where OUT/last.pt is. Raises ValueError."""
    last = os.path.join(out, "last.pt")
    if resume == "auto" and os.path.exists(last):
        return last
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if resume in (None, "auto") and held:
        raise ValueError(f"{out} already holds a run ({', '.join(held)}): "
                         + ("pass --resume auto to go on with it" if "last.pt" in held else
                            "it has no last.pt to go on from" + (" (--resume OUT/best.pt does)" if "best.pt" in held
                                                                 else "")) + ", or another --out")
    if resume not in (None, "auto") and held and in_another_folder(resume, out):
        raise ValueError(f"{out} holds another run ({', '.join(held)}), which resuming {resume} there would overwrite: "
                         f"pass the --out that run was in, or a new one")
    return None if resume == "auto" else resume


def plot_loss_curve(metrics_path, png_path):
    """Draw train and validation loss (nats per point), validation NLL per line and, when train.py checked
    legibility (--recognizer), the generated lines' CER, against steps from a metrics.jsonl file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # Agg without touching pyplot's backend
    from matplotlib.figure import Figure
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [r["step"] for r in rows]
    cer = [(r["step"], r["val_cer"]) for r in rows if "val_cer" in r]
    fig = Figure(figsize=(15 if cer else 10, 3.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if cer else 2)
    ax1, ax2 = axes[:2]
    dot = "." if len(rows) < 30 else None                       # a run of one or few evaluations still shows them
    ax1.plot(steps, [r["train_loss"] for r in rows], label="train", marker=dot)
    ax1.plot(steps, [r["val_nll_per_point"] for r in rows], label="validation", marker=dot)
    ax1.set(xlabel="step", ylabel="nats per point", title="loss")
    ax1.legend()
    ax2.plot(steps, [r["val_nll_per_line"] for r in rows], color="C1", marker=dot,
             label="averaged weights (--ema)" if "val_raw_nll_per_line" in rows[-1] else None)
    raw = [(r["step"], r["val_raw_nll_per_line"]) for r in rows if "val_raw_nll_per_line" in r]
    if raw:
        ax2.plot(*zip(*raw), color="C1", alpha=0.4, label="training weights", marker=dot)
        ax2.legend()
    ax2.set(xlabel="step", ylabel="nats per line", title="validation NLL (Graves' units)")
    if cer:
        axes[2].plot(*zip(*cer), color="C2", marker=".")
        axes[2].set(xlabel="step", ylabel="character error rate", title="legibility: recognizer CER of written lines")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def save_sample_image(model, alphabet, mean, std, path, text="", seed=0, bias=0.5, steps=700):
    """Sample one line (synthesis: of `text`; prediction: `steps` free points) and draw it to a PNG."""
    import torch
    from dataset import denormalize
    generator = torch.Generator(device=model.mdn.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    if model.synthesis:
        ids = alphabet.encode(text, drop_unknown=True)[None]
        if not ids.numel():                                      # nothing the model can write: no picture
            model.train(was_training)
            return
        result = model.sample(ids, bias=bias, generator=generator)
    else:
        result = model.sample(steps=steps, bias=bias, generator=generator, batch_size=1)
    model.train(was_training)
    n = int(result["lengths"][0])
    offsets = denormalize(result["strokes"][0, :n].cpu().numpy(), mean, std)
    if not np.isfinite(offsets).all():                          # weights gone NaN: the run's own message says why
        return
    plot_lines([(offsets, text if model.synthesis else "(unconditional sample)")], path)
