"""Prepare the IAM On-Line Handwriting Database (IAM-OnDB) for handwriting synthesis.

Reads the official archives (or their unpacked folders) once and writes one compact file:

    python prepare_data.py --raw data/raw --out data/processed

    data/raw/lineStrokes-all.tar.gz   (or data/raw/lineStrokes/)   pen trajectories, one XML per text line
    data/raw/ascii-all.tar.gz         (or data/raw/ascii/)         transcriptions, the CSR: block of each form
 -> data/processed/iam_ondb.npz       offsets (dx, dy, eos) of every kept line, texts, split, mean/std, alphabet
    data/splits/{train,valid,test}.txt  line ids of each split (written once, then read: committed to the repo)

Each line becomes a sequence of points x_t = (dx, dy, eos) as in Graves (2013), section 4: the pen offset from the
previous point (y pointing up) and eos = 1 on the last point of each stroke (the pen lifts after it). The first
offset of a line is (0, 0). This is the only code that reads the raw XML.
"""
import gzip
import hashlib
import json
import math
import os
import re
import signal
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

if __name__ == "__main__":   # Ctrl-C while the libraries load (torch: 1-2 s): stop quietly, not with a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # main() then reports an interrupt in one line

import numpy as np
from tqdm import tqdm

from utils import (SPLITS, OneLineParser, at_least, atomic_write, interrupt_on_signals, plot_lines, restore_signals,
                   writable_folder)

VERSION = 1
DOWNLOAD = ("download lineStrokes-all.tar.gz and ascii-all.tar.gz (free registration) from "
            "https://fki.tic.heia-fr.ch/databases/iam-on-line-handwriting-database into {raw}/")   # .format(raw=...)
VALID_FRACTION = TEST_FRACTION = 0.10            # of the kept lines, whole writers at a time
SPLIT_SEED = "iam-ondb-split-v1"                 # writers are ordered by sha1(seed + writer id)
PLACEHOLDER = re.compile(r"please enter transcription here|%%%", re.IGNORECASE)

# Pen jumps. Measured on all 12,195 lines (7.66 M points, board units; the median line is 580 high, 5,534 wide):
#   pen-down steps (within a stroke): median 18, 99 % 63, 99.99 % 244, max 926 (2,466 in the placeholder form z01-000z).
#     The few steps above a line height are sensor drop-outs (0.04-2 s without samples) or missed pen lifts
#     (a straight line drawn across letters). A line with a pen-down step > MAX_PEN_DOWN_STEP is dropped: 7 lines.
#   pen-up moves (between strokes): median 175, 99 % 711, 99.99 % 2,072, max 3,048. All lie within the line's width;
#     the largest, looked at one by one, are real returns to dot an i, add a quote or strike a word out. Capping them
#     would draw those marks in the wrong place, so pen-up moves are kept as they are.
#   Repeated points (a zero step within a stroke: 112,765, 1.5 %; the pen at rest) are removed. Graves kept them
#     ("beyond that, no preprocessing was used"): --keep-repeats does too. They change the NLL per line (README).
MAX_PEN_DOWN_STEP = 600
# Sampling: the eBeam pen is read about every 0.015 s (times are stored to 0.01 s, so steps read 0.01 or 0.02 s);
#   1.4 % of pen-down steps span 0.03 s or more: missed readings, 13 per line (--fill-gaps fills them in, as Graves).
SAMPLE_INTERVAL = 0.015
MAX_GAP = 0.5           # seconds; a longer pause within a stroke is not a missed reading (a handful of steps)
DROP_REASONS = ("no_transcription", "placeholder_text", "corrupt_xml", "pen_jump", "too_few_points")


class DataError(Exception):
    """Bad or missing input: main() prints it as one line and exits with status 1."""


### reading the raw files: archives (streamed, never unpacked) or folders


def find_source(raw, name):
    """('tar', path) for RAW/<name>-all.tar.gz, else ('dir', path) for RAW/<name>/; DataError if neither."""
    if not os.path.isdir(raw):
        what = "is a file, not a folder" if os.path.exists(raw) else "not found"
        raise DataError(f"raw data folder {raw} {what}; " + DOWNLOAD.format(raw=raw))
    archive, folder = os.path.join(raw, f"{name}-all.tar.gz"), os.path.join(raw, name)
    if os.path.isfile(archive):
        return "tar", archive
    if os.path.isdir(folder):
        return "dir", folder
    raise DataError(f"neither {archive} nor {folder}/ found; " + DOWNLOAD.format(raw=raw))


def iter_files(source, suffix):
    """Yield (file stem, bytes) of every file ending in `suffix`, streaming the archive member by member."""
    kind, path = source
    if kind == "dir":
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                if f.endswith(suffix) and not f.startswith("._"):
                    with open(os.path.join(root, f), "rb") as fh:
                        yield f[: -len(suffix)], fh.read()
        return
    try:
        with gzip.open(path, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name.endswith(suffix) and not name.startswith("._"):
                    yield name[: -len(suffix)], tar.extractfile(member).read()
            while gz.read(1 << 20):   # to the end: gzip checks its end marker and CRC, so a cut-short download fails
                pass                  # (tar alone stops silently when the cut falls on a file boundary)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e}); the archive looks damaged, "
                        + DOWNLOAD.format(raw=os.path.dirname(path))) from None


def parse_csr(text):
    """Form transcription -> the text lines of its CSR: block; item N - 1 belongs to <form>-0N.xml.

    Checked on all 1,730 forms: line numbers start at 1, no form skips one, and each form has one CSR line per XML
    except a08-551z (its last line has none) and z01-000z (a placeholder).
    """
    lines = text.replace("\r", "").split("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == "CSR:"), None)
    if start is None:
        return []
    block = lines[start + 1:]
    while block and not block[0].strip():         # the blank line after "CSR:"
        block.pop(0)
    return [" ".join(line.split()) for line in block]   # collapse runs of spaces; trailing blanks become ""


def read_transcriptions(source):
    """{form id: [line text, ...]} from every ascii/*.txt (the CSR block: corrected transcription)."""
    forms = {}
    for form, data in iter_files(source, ".txt"):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        forms[form] = parse_csr(text)
    return forms


def read_writers(path):
    """{form id: writer id} from a TSV with a header line: form_id<TAB>writer_id."""
    writers = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, row in enumerate(f):
                cols = row.rstrip("\r\n").split("\t")
                if len(cols) >= 2 and not (i == 0 and cols[0] == "form_id"):
                    writers[cols[0].strip()] = cols[1].strip()
    except UnicodeDecodeError:
        raise DataError(f"writer map {path} is not UTF-8 text (form_id<TAB>writer_id lines)") from None
    except OSError as e:
        raise DataError(f"cannot read writer map {path}: {e.strerror or e}") from None
    return writers


### one line: XML -> (offsets, eos)


def parse_strokes(xml_bytes):
    """StrokeSet XML -> points (T, 2) int64 (x, y) with y pointing up (the XML's y grows downward),
    stroke (T,) int64, the index of the stroke each point belongs to, and time (T,) float64 in seconds (NaN where
    a Point has none)."""
    root = ET.fromstring(xml_bytes)
    x, y, t, stroke = [], [], [], []
    for k, s in enumerate(root.iter("Stroke")):
        for p in s.iter("Point"):
            x.append(p.get("x"))
            y.append(p.get("y"))
            t.append(p.get("time", "nan"))
            stroke.append(k)
    if None in x or None in y:
        raise ValueError("a Point without x or y")
    points = np.column_stack([np.array(x, dtype=np.int64), -np.array(y, dtype=np.int64)]).reshape(-1, 2)
    return points, np.array(stroke, dtype=np.int64), np.array(t, dtype=np.float64)


def fill_gaps(points, stroke, time):
    """Graves' 'interpolating to fill in for missing readings': where two consecutive points of a stroke lie
    n = round(dt / SAMPLE_INTERVAL) > 1 sampling intervals apart (dt < MAX_GAP), the n - 1 missing points go on the
    straight line between them (rounded to board units). Returns points, stroke."""
    dt = np.diff(time)
    n = np.where((stroke[1:] == stroke[:-1]) & (dt < MAX_GAP), np.round(dt / SAMPLE_INTERVAL), 1)   # NaN time: 1
    n = n.clip(min=1).astype(np.int64)                              # (T - 1,) points each step becomes
    if (n == 1).all():
        return points, stroke
    rows = np.repeat(np.arange(len(n)), n)                          # the step each output point belongs to
    k = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n) + 1   # 1..n within its step
    step = (points[1:] - points[:-1]).astype(np.float64)
    filled = np.rint(points[:-1][rows] + (k / n[rows])[:, None] * step[rows]).astype(np.int64)   # k = n: the real point
    return np.concatenate([points[:1], filled]), np.concatenate([stroke[:1], stroke[1:][rows]])


def resample_stroke(points, spacing):
    """(n, 2) points of one stroke -> the points at least `spacing` apart, walking along it; the end is kept."""
    xy, kept = points.tolist(), [0]
    for i in range(1, len(xy) - 1):
        last = xy[kept[-1]]
        if math.hypot(xy[i][0] - last[0], xy[i][1] - last[1]) >= spacing:
            kept.append(i)
    return points[kept + [len(xy) - 1]] if len(xy) > 1 else points


def process_line(task):
    """Worker: (line id, XML bytes, options: resample, keep_repeats, fill_gaps) -> (line id, 'ok', offsets (T, 2)
    int16, eos (T,) uint8, repeats removed, points filled in) or (line id, drop reason, detail)."""
    line_id, xml_bytes, opt = task
    try:
        points, stroke, time = parse_strokes(xml_bytes)             # (T, 2), (T,), (T,)
    except (ET.ParseError, ValueError) as e:                        # malformed XML, missing or non-integer x / y
        return line_id, "corrupt_xml", str(e)
    if len(points) < 2:                                             # an empty StrokeSet, or one point
        return line_id, "too_few_points", ""
    step = np.diff(points, axis=0)                                  # (T - 1, 2)
    pen_down = stroke[1:] == stroke[:-1]                            # step within a stroke
    if np.any(np.hypot(step[:, 0], step[:, 1])[pen_down] > MAX_PEN_DOWN_STEP):
        return line_id, "pen_jump", ""
    filled = 0
    if opt["fill_gaps"]:
        n = len(points)
        points, stroke = fill_gaps(points, stroke, time)
        filled = len(points) - n
        step, pen_down = np.diff(points, axis=0), stroke[1:] == stroke[:-1]   # of the filled line
    keep = np.concatenate([[True], ~(pen_down & np.all(step == 0, axis=1)) | opt["keep_repeats"]])   # repeated points
    repeats = int(len(points) - keep.sum())
    points, stroke = points[keep], stroke[keep]
    resample = opt["resample"]
    if resample > 0:
        ends = np.flatnonzero(np.diff(stroke)) + 1
        parts = [resample_stroke(p, resample) for p in np.split(points, ends)]
        points = np.concatenate(parts)
        stroke = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    if len(points) < 2:
        return line_id, "too_few_points", ""
    offsets = np.zeros_like(points)
    offsets[1:] = points[1:] - points[:-1]                          # (T, 2), first row (0, 0)
    eos = np.append(stroke[1:] != stroke[:-1], True).astype(np.uint8)   # 1 on the last point of each stroke
    info = np.iinfo(np.int16)
    return line_id, "ok", np.clip(offsets, info.min, info.max).astype(np.int16), eos, repeats, filled


### split: whole writers into valid / test, the rest (and unknown writers) into train


def split_by_writer(writer_ids, seed=SPLIT_SEED):
    """writer_ids (N,) -> split codes (N,): whole writers, in sha1 order, fill valid then test to about 10 % each.

    A writer joins a part while that keeps the part nearest its target; the rest, and unknown writers (''), train.
    """
    counts = Counter(w for w in writer_ids if w)
    order = sorted(counts, key=lambda w: hashlib.sha1(f"{seed}:{w}".encode()).hexdigest())
    targets = [VALID_FRACTION * len(writer_ids), TEST_FRACTION * len(writer_ids)]
    filled, code = [0, 0], {}
    for w in order:
        part = next((k for k in (0, 1) if filled[k] + counts[w] / 2 <= targets[k]), None)
        if part is not None:
            code[w] = part + 1
            filled[part] += counts[w]
    return np.array([code.get(w, 0) for w in writer_ids], dtype=np.int8)


def read_split_lists(folder):
    """{line id: split code} from folder/{train,valid,test}.txt, or None when the lists do not exist."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataError(f"--splits {folder} is a file; give a folder (train.txt, valid.txt, test.txt are read or written there)")
    paths = [os.path.join(folder, f"{name}.txt") for name in SPLITS]
    if not all(os.path.isfile(p) for p in paths):
        if any(os.path.isfile(p) for p in paths):
            raise DataError(f"{folder} holds only some of train.txt, valid.txt, test.txt; restore or delete them")
        return None
    lists = {}
    for code, p in enumerate(paths):
        with open(p, encoding="utf-8") as f:
            lists.update({line.strip(): code for line in f if line.strip()})
    return lists


def write_split_lists(folder, line_ids, split):
    """folder/{train,valid,test}.txt: the sorted line ids of each split, one a line."""
    for code, name in enumerate(SPLITS):
        text = "".join(f"{i}\n" for i in sorted(line_ids[split == code]))
        atomic_write(os.path.join(folder, f"{name}.txt"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


### main


def get_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", default="data/raw", help="folder holding lineStrokes-all.tar.gz and ascii-all.tar.gz, "
                   "or the unpacked lineStrokes/ and ascii/ (default: data/raw)")
    p.add_argument("--out", default="data/processed", help="output folder for iam_ondb.npz and lines.png "
                   "(default: data/processed)")
    p.add_argument("--writers", default=None, help="form_id<TAB>writer_id file used to split by writer when the "
                   "split lists do not exist yet (default: RAW/writers.tsv if present)")
    p.add_argument("--splits", default="data/splits", help="folder of train.txt, valid.txt, test.txt line-id lists: "
                   "read when present, else made from the writer map and written there (default: data/splits)")
    p.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1, help="parser processes "
                   f"(default: the number of CPU cores, {os.cpu_count() or 1} here)")
    p.add_argument("--resample", type=at_least(0.0), default=0.0, metavar="D", help="keep only points at least D board "
                   "units apart within a stroke (default: 0 = off, full resolution as in Graves 2013)")
    p.add_argument("--keep-repeats", action="store_true", help="keep repeated points (zero steps within a stroke, "
                   "1.5 %% of points) as Graves (2013) did, for NLL figures in his units (default: off, they are removed)")
    p.add_argument("--fill-gaps", action="store_true", help="fill in missed pen readings (a step within a stroke "
                   f"spanning n > 1 sampling intervals of {SAMPLE_INTERVAL} s) with n - 1 points on the straight line, "
                   "as Graves (2013) did (default: off)")
    p.add_argument("--plot", type=at_least(0), default=0, metavar="N", help="after preparing, draw N prepared lines with "
                   "their text to OUT/lines.png (default: 0 = no plot)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    args.written = None
    previous = interrupt_on_signals()                  # Ctrl-C, `kill`, `timeout`: one line, status 130
    try:
        prepare(args)
    except DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"prepare_data.py: interrupted after writing {args.written} (only the --plot was left)" if args.written
              else "prepare_data.py: interrupted; nothing written (run it again: it starts from the beginning)",
              file=sys.stderr)
        sys.exit(130)
    finally:
        restore_signals(previous)


def init_worker():
    """A parsing worker ignores Ctrl-C (the main process stops the pool) and dies on SIGTERM (pool.terminate)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def prepare(args):
    """Read, clean, split and write; the summary goes to stdout, progress to stderr."""
    t0 = time.time()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise DataError(f"--out {args.out} is a file; give a folder (iam_ondb.npz is written into it)")

    ### sources and transcriptions
    strokes_src, ascii_src = find_source(args.raw, "lineStrokes"), find_source(args.raw, "ascii")
    forms = read_transcriptions(ascii_src)
    lists = read_split_lists(args.splits)
    try:                                                     # found now, not after a minute of parsing
        writable_folder(args.out)
        if lists is None:                                    # they will be made and written there
            writable_folder(args.splits, "--splits")
    except ValueError as e:
        raise DataError(str(e)) from None
    writers_path = args.writers or os.path.join(args.raw, "writers.tsv")
    if args.writers and not os.path.isfile(args.writers):
        raise DataError(f"writer map {args.writers} is a folder; give the TSV file" if os.path.isdir(args.writers)
                        else f"writer map {args.writers} not found")
    writers = read_writers(writers_path) if os.path.isfile(writers_path) else {}

    ### parse every line XML in parallel
    dropped = {reason: [] for reason in DROP_REASONS}        # reason -> line ids
    corrupt, texts, lines = [], {}, {}

    def tasks():                                             # runs in the main process, feeding the workers
        for line_id, data in iter_files(strokes_src, ".xml"):
            form, _, number = line_id.rpartition("-")
            csr = forms.get(form, [])
            text = csr[int(number) - 1] if number.isdigit() and 0 < int(number) <= len(csr) else ""
            if not text:
                dropped["no_transcription"].append(line_id)   # list.append is thread-safe
            elif PLACEHOLDER.search(text):
                dropped["placeholder_text"].append(line_id)
            else:
                texts[line_id] = text
                yield line_id, data, options

    duplicates = filled = 0
    options = {"resample": args.resample, "keep_repeats": args.keep_repeats, "fill_gaps": args.fill_gaps}
    pool = Pool(args.workers, initializer=init_worker) if args.workers > 1 else None
    try:
        results = pool.imap_unordered(process_line, tasks(), chunksize=16) if pool else map(process_line, tasks())
        for line_id, status, *rest in tqdm(results, desc="parsing lines", unit=" lines", mininterval=0.5):
            if status == "ok":
                lines[line_id] = rest[:2]
                duplicates += rest[2]
                filled += rest[3]
            else:
                dropped[status].append(line_id)
                if status == "corrupt_xml":
                    corrupt.append(f"{line_id}.xml ({rest[0]})")
    except BaseException:                                    # Ctrl-C or an error: stop the workers, not wait for them
        if pool:
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    if not lines:
        raise DataError(f"no usable text lines found in {args.raw}; " + DOWNLOAD.format(raw=args.raw))

    ### assemble, sorted by line id so every run writes the same bytes
    line_ids = np.array(sorted(lines))
    lengths = np.array([len(lines[i][0]) for i in line_ids])
    line_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)                  # (N + 1,)
    offsets = np.concatenate([lines[i][0] for i in line_ids])                                # (P, 2) int16
    eos = np.concatenate([lines[i][1] for i in line_ids])                                    # (P,) uint8
    text_list = [texts[i] for i in line_ids]
    writer_ids = np.array([writers.get(i.rpartition("-")[0], "") for i in line_ids])

    ### split
    if lists is not None:
        split = np.array([lists.get(i, 0) for i in line_ids], dtype=np.int8)
        unlisted = int(sum(i not in lists for i in line_ids))
        split_note = f"from the lists in {args.splits}" + (f"; {unlisted} lines not listed went to train"
                                                            if unlisted else "")
        split_source = "lists"
    else:
        if writers:
            split = split_by_writer(writer_ids)
            split_source = os.path.basename(writers_path)
            unknown = int(np.sum(writer_ids == ""))
            split_note = (f"by writer from {writers_path} ({len(set(writer_ids) - {''})} writers"
                          + (f"; {unknown} lines of unknown writer went to train)" if unknown else ")"))
        else:                                                # no writer map: forms stand in for writers
            split = split_by_writer(np.array([i.rpartition("-")[0] for i in line_ids]))
            split_source = "forms"
            split_note = "by form (no writer map found: a writer may appear in two splits)"
        write_split_lists(args.splits, line_ids, split)
        split_note += f"; lists written to {args.splits}"

    ### normalisation and alphabet from the training split only
    train_rows = np.repeat(split == 0, lengths)
    train_offsets = offsets[train_rows].astype(np.float64)
    if not len(train_offsets):
        raise DataError(f"the training split is empty; check the split lists in {args.splits}")
    mean, std = train_offsets.mean(0).astype(np.float32), train_offsets.std(0).astype(np.float32)
    alphabet = "".join(sorted(set("".join(t for t, s in zip(text_list, split) if s == 0))))
    outside = int(sum(bool(set(t) - set(alphabet)) for t in text_list))

    meta = {"version": VERSION, "source": {"lineStrokes": os.path.basename(strokes_src[1]),
                                           "ascii": os.path.basename(ascii_src[1])},
            **options, "max_pen_down_step": MAX_PEN_DOWN_STEP, "split_source": split_source,
            "dropped": {k: len(v) for k, v in dropped.items()},
            "dropped_lines": {k: sorted(v) for k, v in dropped.items()}, "corrupt_files": sorted(corrupt),
            "duplicate_points_removed": int(duplicates), "points_filled_in": int(filled),
            "lines": {name: int(np.sum(split == k)) for k, name in enumerate(SPLITS)},
            "points": int(len(offsets)), "characters": int(sum(map(len, text_list)))}
    arrays = dict(offsets=offsets, eos=eos, line_starts=line_starts, texts=np.array(text_list), line_ids=line_ids,
                  writer_ids=writer_ids, split=split, mean=mean, std=std, alphabet=np.array(alphabet),
                  meta=np.array(json.dumps(meta, sort_keys=True)))
    path = os.path.join(args.out, "iam_ondb.npz")

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)
    args.written = path                                      # (for the Ctrl-C message)

    ### summary
    n_drop = sum(map(len, dropped.values()))
    print(f"lines kept: {len(line_ids):,} = " + ", ".join(f"{name} {meta['lines'][name]:,}" for name in SPLITS)
          + f"  (split {split_note})")
    print(f"lines dropped: {n_drop:,} = " + ", ".join(f"{k} {len(v)}" for k, v in dropped.items()))
    for c in sorted(corrupt):
        print(f"  corrupt, skipped: {c}")
    for name in SPLITS[1:]:
        if not meta["lines"][name]:
            print(f"prepare_data.py: warning: the {name} split is empty (" + (
                  f"the split lists in {args.splits} name none of these lines; --splits NEW_FOLDER splits them by "
                  f"writer" if split_source == "lists" else "too few writers") + "): train.py needs a valid split, "
                  "evaluate.py the one it scores", file=sys.stderr)
    kept = "repeated points kept" if args.keep_repeats else f"{duplicates:,} repeated points removed"
    print(f"points: {len(offsets):,} ({kept}" + (f", {filled:,} missed readings filled in" if args.fill_gaps else "")
          + f"), characters: {meta['characters']:,}")
    print(f"alphabet ({len(alphabet)} characters, from train): {alphabet!r}"
          + (f"; {outside} lines hold characters outside it" if outside else ""))
    print(f"mean (dx, dy) = ({mean[0]:.3f}, {mean[1]:.3f}), std = ({std[0]:.3f}, {std[1]:.3f}) board units")
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.time() - t0:.1f} s with {args.workers} "
          f"worker(s)")

    if args.plot > 0:
        picks = np.linspace(0, len(line_ids) - 1, min(args.plot, len(line_ids))).round().astype(int)
        drawn = [(np.column_stack([offsets[line_starts[i]:line_starts[i + 1]], eos[line_starts[i]:line_starts[i + 1]]]),
                  f"{line_ids[i]}: {text_list[i]}") for i in picks]
        plot_lines(drawn, os.path.join(args.out, "lines.png"))
        print(f"drew {len(drawn)} lines to {os.path.join(args.out, 'lines.png')}")


if __name__ == "__main__":
    main()
