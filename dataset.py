"""Data handling: the prepared IAM-OnDB file, text encoding, and length-bucketed batches.

A line is a sequence x_t = (dx, dy, eos) (Graves 2013, section 4), offsets normalised to mean 0, std 1 with the
training split's statistics, and its text as character ids c_u (section 5; id 0 is padding).
"""
import hashlib
import json
import math
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import SPLITS

KEYS = ("offsets", "eos", "line_starts", "texts", "line_ids", "writer_ids", "split", "mean", "std", "alphabet", "meta")
POOL_BATCHES = 50                                 # bucketing sorts by length inside random pools of 50 batches


def prepared_file(path):
    """The npz that --data names: the file itself, or iam_ondb.npz in the folder prepare_data.py wrote to."""
    path = Path(path)
    return path / "iam_ondb.npz" if path.is_dir() else path


def load_prepared(path):
    """The arrays of prepare_data.py's npz (path to it or to its folder) as a dict; alphabet -> str, meta -> dict."""
    path = prepared_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run prepare_data.py first")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:   # not an npz, cut short, pickles
        raise ValueError(f"{path} is not a readable prepared file ({type(e).__name__}); run prepare_data.py again") from None
    missing = [k for k in KEYS if k not in data]
    if len(missing) == len(KEYS):
        raise ValueError(f"{path} is not prepared data (none of its arrays); pass the folder prepare_data.py wrote")
    if missing and {"offsets", "eos", "line_starts", "texts"} <= data.keys():     # generate.py's lines, say
        raise ValueError(f"{path} is a strokes file (lines without splits, e.g. generate.py's), not prepared data: "
                         f"--data takes the folder prepare_data.py wrote from IAM-OnDB (training here uses real lines "
                         f"only); recognizer.py read reads strokes files")
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: made by another version, run prepare_data.py again")
    data["alphabet"] = str(data["alphabet"])
    data["meta"] = json.loads(str(data["meta"]))
    return data


def prepared_digest(data):
    """A short digest of a prepared file's lines, texts, splits, normalisation and preparation settings (not of its
    points, for speed): a run resumed on data prepared anew into the same folder is told apart by content."""
    h = hashlib.blake2b(digest_size=8)
    meta = data["meta"] if isinstance(data["meta"], dict) else json.loads(str(data["meta"]))
    for part in (json.dumps(meta, sort_keys=True), "\n".join(map(str, data["line_ids"])), "\n".join(map(str, data["texts"])),
                 str(data["alphabet"])):
        h.update(part.encode())
    for array in (data["line_starts"], data["split"], data["mean"], data["std"]):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def check_splits(train_set, valid_set, data):
    """ValueError, saying what to do, when training cannot start for an empty train or valid split of `data`."""
    for s in (train_set, valid_set):
        if len(s) == 0:
            why = ("the split lists it was prepared with name none of its lines (prepared from part of IAM-OnDB?); "
                   "prepare it again with --splits NEW_FOLDER, which splits the lines found by writer"
                   if s.meta.get("split_source") == "lists" else
                   "too few writers to fill the train, valid and test splits; prepare more of IAM-OnDB")
            raise ValueError(f"{data} has no {s.split} lines: {why}")


def read_line_ids(path):
    """A text file of IAM-OnDB line ids, one per line (blank lines and # comments ignored) -> set of ids. Raises
    FileNotFoundError or ValueError with a one-line message."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            ids = {line.split("#")[0].strip() for line in f} - {""}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    bad = sorted(i for i in ids if len(i.split()) > 1)
    if bad or not ids:
        raise ValueError(f"{path} must list line ids, one per line (e.g. a01-000u-01)" + (f"; not {bad[0]!r}" if bad else ""))
    return ids


def normalize(offsets, mean, std):
    """(..., 3) rows (dx, dy, eos), numpy or torch -> float copy with (dx, dy) scaled to mean 0, std 1."""
    return _affine(offsets, mean, std, inverse=False)


def denormalize(offsets, mean, std):
    """Inverse of normalize: (..., 3) normalised rows -> board units; eos passes through."""
    return _affine(offsets, mean, std, inverse=True)


def prime_strokes(offsets, mean, std):
    """A priming line's raw offsets (T, 3), first point (0, 0) -> what sample(prime=) feeds: its normalised points
    after the first (T - 1, 3) float32 (the start token x_0 = 0 takes the first one's place, as in training), or None."""
    offsets = np.asarray(offsets, np.float32)
    if offsets.ndim != 2 or offsets.shape[1] != 3:
        raise ValueError(f"a priming line's offsets must be (T, 3) rows (dx, dy, eos), not {offsets.shape}")
    prime = torch.as_tensor(normalize(offsets, np.asarray(mean, np.float32),
                                      np.asarray(std, np.float32)))[1:]
    return prime if len(prime) else None


def from_its_first_point(offsets):
    """Raw offsets (T, 3) of a line written after a priming line -> a copy that starts at its own first point, as a
    real line does (first row (0, 0, eos)): the pen's jump from the priming line's end is dropped."""
    out = offsets.copy()
    out[:1, :2] = 0
    return out


def _affine(offsets, mean, std, inverse):
    if torch.is_tensor(offsets):
        out = offsets.clone() if offsets.is_floating_point() else offsets.float()
        mean, std = (torch.as_tensor(np.asarray(v, np.float64), dtype=out.dtype, device=out.device)
                     for v in (mean, std))
    else:
        out = np.array(offsets, dtype=np.result_type(np.asarray(offsets).dtype, np.float32))
        mean, std = np.asarray(mean, out.dtype), np.asarray(std, out.dtype)
    out[..., :2] = out[..., :2] * std + mean if inverse else (out[..., :2] - mean) / std
    return out


# typographic characters a user may type or paste (phone keyboards type curly quotes), and their plain forms
SUBSTITUTES = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-",
               "\u2026": "...", "\u00a0": " ", "\t": " "}
# letters Unicode does not decompose, in the plain forms a writer without them would use (Alphabet.fold); U+2044, the
# fraction slash, is what the decomposition of a vulgar fraction writes ('½' -> '1⁄2')
LETTER_FORMS = {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d",
                "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "ħ": "h", "Ħ": "H", "\u2044": "/"}


class Alphabet:
    """Characters <-> ids: id 0 is padding, ids 1..n are the characters of `chars` in order."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("alphabet has repeated characters")
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    def __len__(self):
        """The ids, padding included: len(chars) + 1."""
        return len(self.chars) + 1

    def unknown(self, text):
        """Characters of `text` not in the alphabet, each once, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.index))

    def plain(self, text):
        """`text` with the typographic characters this alphabet lacks (SUBSTITUTES) in their plain forms, where it has
        those."""
        for a, b in SUBSTITUTES.items():
            if a not in self.index and all(c in self.index for c in b.strip() or b):
                text = text.replace(a, b)
        return text

    def fold(self, text):
        """`text` with each character this alphabet lacks written as its compatibility form without accents, where the
        alphabet has all of that ('é' -> 'e', 'ﬁ' -> 'fi', full-width 'A' -> 'A', 'ß' -> 'ss', 'æ' -> 'ae', 'ø' -> 'o',
        '½' -> '1/2'). Returns (text, {character: its form})."""
        forms = {}
        for c in self.unknown(text):
            form = "".join(LETTER_FORMS.get(d, d) for d in unicodedata.normalize("NFKD", c) if not unicodedata.combining(d))
            if form and all(d in self.index for d in form):
                forms[c] = form
        return "".join(forms.get(c, c) for c in text), forms

    def writable(self, text):
        """`text` as a model with this alphabet writes it: unknown characters left out, runs of spaces made one."""
        return " ".join("".join(c for c in text if c in self.index).split())

    def encode(self, text, drop_unknown=False):
        """str -> LongTensor (U,); unknown characters raise ValueError, or are left out with drop_unknown."""
        unknown = self.unknown(text)
        if unknown and not drop_unknown:
            raise ValueError("characters not in the model's alphabet: " + ", ".join(repr(c) for c in unknown))
        return torch.tensor([self.index[c] for c in text if c in self.index], dtype=torch.long)

    def decode(self, ids):
        """ids (U,) -> str, skipping padding (0)."""
        return "".join(self.chars[i - 1] for i in (int(i) for i in ids) if 0 < i <= len(self.chars))

    def __repr__(self):
        return f"Alphabet({self.chars!r})"


class HandwritingDataset(Dataset):
    """One split of the prepared file. Item i: (strokes (T, 3) float32 normalised (dx, dy, eos), text ids (U,)).

    max_points drops (not crops) lines longer than that; exclude: line ids to leave out (read_line_ids); max_lines keeps
    the first n lines (tiny runs). Characters outside the alphabet (rare ones seen only in valid / test) are left out of
    the text ids.
    """

    def __init__(self, path_or_dict, split="train", max_points=None, max_lines=None, exclude=()):
        data = path_or_dict if isinstance(path_or_dict, dict) else load_prepared(path_or_dict)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        lines = np.flatnonzero(data["split"] == SPLITS.index(split))         # (N_split,) rows of the file
        starts, ends = data["line_starts"][lines], data["line_starts"][lines + 1]
        keep = ends - starts <= max_points if max_points else np.ones(len(lines), dtype=bool)
        listed = np.isin(data["line_ids"][lines], list(exclude)) if exclude else np.zeros(len(lines), dtype=bool)
        keep &= ~listed
        self.excluded = int(listed.sum())                                     # the split's lines left out as listed
        lines, starts, ends = lines[keep][:max_lines], starts[keep][:max_lines], ends[keep][:max_lines]

        self.offsets, self.eos = data["offsets"], data["eos"]                 # (P, 2) int16, (P,) uint8, shared
        self.starts, self.lengths = starts, ends - starts                      # (N,), (N,) points per line
        self.texts = [str(t) for t in data["texts"][lines]]
        self.line_ids = [str(t) for t in data["line_ids"][lines]]
        self.writer_ids = [str(t) for t in data["writer_ids"][lines]]
        self.alphabet = Alphabet(str(data["alphabet"]))
        self.text_ids = [self.alphabet.encode(t, drop_unknown=True) for t in self.texts]
        self.meta = data["meta"] if isinstance(data["meta"], dict) else json.loads(str(data["meta"]))
        self.split = split
        self.data_digest = prepared_digest(data)
        self.set_normalization(data["mean"], data["std"])

    def set_normalization(self, mean, std):
        """Use these (dx, dy) statistics, e.g. a checkpoint's, instead of the file's."""
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return torch.from_numpy(normalize(self.raw(i), self.mean, self.std)), self.text_ids[i]

    def raw(self, i):
        """Line i as stored, not normalised: (dx, dy, eos) (T, 3) float32."""
        rows = slice(self.starts[i], self.starts[i] + self.lengths[i])
        return np.column_stack([self.offsets[rows], self.eos[rows]]).astype(np.float32)


def collate(batch):
    """[(strokes (T_i, 3), text (U_i,)), ...] -> zero-padded strokes (B, T, 3), text (B, U) and bool masks."""
    strokes, texts = zip(*batch)
    t_len = torch.tensor([len(s) for s in strokes])
    u_len = torch.tensor([len(t) for t in texts])
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "strokes": pad(strokes, batch_first=True),                                        # (B, T, 3) float32
        "stroke_mask": torch.arange(int(t_len.max())) < t_len[:, None],                   # (B, T) bool
        "text": pad(texts, batch_first=True) if u_len.max() > 0 else torch.zeros(len(texts), 0, dtype=torch.long),
        "text_mask": torch.arange(int(u_len.max())) < u_len[:, None],                     # (B, U) bool
    }


def rare_char_copies(texts, threshold, max_copies=8):
    """How many times each line goes into an epoch so that rare characters are seen more often (train.py
    --rare-chars): a line whose rarest character appears n < threshold times in `texts` goes in
    min(max_copies, round(threshold / n)) times, every other line once. Returns an int array, one per line."""
    counts = {}
    for t in texts:
        for c in t:
            counts[c] = counts.get(c, 0) + 1
    rarest = np.array([min((counts[c] for c in t), default=threshold) for t in texts], dtype=np.float64)
    return np.clip(np.round(threshold / np.maximum(rarest, 1)), 1, max_copies).astype(np.int64)


class BucketBatchSampler(Sampler):
    """Batches of lines of similar length, so little compute goes to padding.

    shuffle=True: a random permutation (seeded by seed; train.py passes seed + epoch) is cut into pools of POOL_BATCHES batches,
    each pool is sorted by length and cut into batches, and the batch order is shuffled. shuffle=False: all lines
    sorted by length (for evaluation). Every index appears exactly once per epoch, or copies[i] times if copies is
    given (drop_last: the last, short batch is left out).
    """

    def __init__(self, lengths, batch_size, shuffle=True, seed=0, drop_last=False, copies=None):
        self.index = np.arange(len(lengths)) if copies is None else np.repeat(np.arange(len(lengths)), copies)
        self.lengths = np.asarray(lengths)[self.index]                   # of the epoch's entries
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last

    def __iter__(self):
        n, bs = len(self.lengths), self.batch_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, 0])        # [seed, 0]: the order runs so far were trained on
            order = rng.permutation(n)
            pool = bs * POOL_BATCHES
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")]
                                    for p in np.split(order, range(pool, n, pool))]) if n else order
        else:
            order = np.argsort(self.lengths, kind="stable")
        batches = [self.index[order[i:i + bs]].tolist() for i in range(0, n, bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self):
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def padding_fraction(lengths, batches):
    """Fraction of the padded (B, T_max) grid of these batches that is padding."""
    lengths = np.asarray(lengths)
    total = sum(len(b) * lengths[b].max() for b in batches if len(b))
    return 1.0 - sum(lengths[b].sum() for b in batches) / max(total, 1)


def make_loader(dataset, batch_size, shuffle, seed=0, drop_last=False, num_workers=0, copies=None):
    """DataLoader over a HandwritingDataset with length buckets and padding masks (see collate).

    For a new shuffle every epoch pass seed + epoch (a new loader per epoch). copies: how many
    times each line goes into an epoch (rare_char_copies), else once.
    """
    sampler = BucketBatchSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                 copies=copies)
    # its own generator: iterating a DataLoader draws a seed, which from torch's global one would shift dropout's
    # random numbers and make a resumed run differ from an unbroken one
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def augment(strokes, mask, mean, std, generator, scale=0.1, shear=0.15):
    """Random size (1 +- scale) and slant (dx += k dy, |k| <= shear) per line, applied in board units.
    strokes: (B, T, 3) normalised; returns a new normalised tensor, padding left at zero."""
    B = strokes.shape[0]
    s = (1 + scale * (2 * torch.rand(B, 1, generator=generator) - 1)).to(strokes.device)   # (B, 1)
    k = (shear * (2 * torch.rand(B, 1, generator=generator) - 1)).to(strokes.device)
    raw_x, raw_y = strokes[..., 0] * std[0] + mean[0], strokes[..., 1] * std[1] + mean[1]   # (B, T) board units
    x, y = s * (raw_x + k * raw_y), s * raw_y
    out = torch.stack([(x - mean[0]) / std[0], (y - mean[1]) / std[1], strokes[..., 2]], dim=-1)
    return out * mask.unsqueeze(-1)
