"""
The handwriting recognizer (an online CTC reader, Graves et al. 2006) and the legibility measure built on it: write
texts with the synthesis model, read them back, count the errors (evaluate.py --legibility, train.py --recognizer).
recognizer.py trains, evaluates and runs it.

Strided 1-D convolutions shorten a line `downsample` times (a character spans about 21 points, so about 5 frames; CTC
needs at least one frame per character), a bidirectional LSTM reads the frames, and a linear layer gives per-frame
log-probabilities over the CTC blank (id 0, the dataset's padding id) and the characters (ids 1..n, as in
dataset.Alphabet).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import Alphabet, denormalize, normalize
from model import Config, load_weights, write_lines
from utils import checkpoint_norm, load_checkpoint

BLANK = 0   # CTC blank = the dataset's padding id


@dataclass
class RecognizerConfig(Config):
    input_size: int = 3            # (dx, dy, eos) per point, normalised as for the handwriting model
    conv_channels: int = 96        # channels of every convolution
    conv_layers: int = 3           # 1-D convolutions; the last log2(downsample) of them have stride 2
    kernel_size: int = 5           # points (odd)
    downsample: int = 4            # frames = ceil(points / downsample); a power of 2
    hidden_size: int = 128         # LSTM cells per direction
    layers: int = 2                # bidirectional LSTM layers
    dropout: float = 0.2           # after the convolutions and between LSTM layers (training only)
    alphabet_size: int = 0         # characters; the output has alphabet_size + 1 classes (blank first)

    def __post_init__(self):
        strided = self.downsample.bit_length() - 1
        if self.downsample < 1 or 1 << strided != self.downsample or strided > self.conv_layers:
            raise ValueError(f"downsample must be a power of 2 <= 2 ** conv_layers, not {self.downsample}")
        if self.alphabet_size <= 0:
            raise ValueError(f"a recognizer needs an alphabet, not alphabet_size {self.alphabet_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout (--dropout) is a probability in [0, 1), not {self.dropout}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size (--kernel-size) must be odd, so that a convolution keeps its points centred, "
                             f"not {self.kernel_size}")


class Recognizer(nn.Module):

    def __init__(self, config: RecognizerConfig):
        super().__init__()
        self.config = cfg = config
        first_strided = cfg.conv_layers - (cfg.downsample.bit_length() - 1)
        self.strides = [2 if n >= first_strided else 1 for n in range(cfg.conv_layers)]
        self.convs = nn.ModuleList(nn.Conv1d(cfg.input_size if n == 0 else cfg.conv_channels, cfg.conv_channels,
                                             cfg.kernel_size, stride=s, padding=cfg.kernel_size // 2)
                                   for n, s in enumerate(self.strides))
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.conv_channels) for _ in self.strides)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.conv_channels, cfg.hidden_size, cfg.layers, batch_first=True, bidirectional=True,
                            dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.out = nn.Linear(2 * cfg.hidden_size, cfg.alphabet_size + 1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, x, lengths):
        """x: (B, T, 3) normalised points, zero after each line's length; lengths: (B,) points.
        Returns log-probabilities (B, T', alphabet_size + 1) in float32 and frame counts (B,), T' = ceil(T / downsample).
        Padding is zeroed after every convolution, so a line's output does not depend on its batch."""
        h = x.transpose(1, 2)                                                      # (B, C, T)
        for conv, norm, s in zip(self.convs, self.norms, self.strides):
            h = conv(h)
            lengths = (lengths - 1) // s + 1                                       # ceil(L / s), odd kernel
            mask = torch.arange(h.shape[-1], device=h.device) < lengths[:, None]   # (B, T')
            h = F.gelu(norm(h.transpose(1, 2))).transpose(1, 2) * mask[:, None]
        h = self.dropout(h.transpose(1, 2))                                        # (B, T', C)
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=h.shape[1])
        return torch.log_softmax(self.out(self.dropout(h)).float(), dim=-1), lengths   # CTC in float32


def ctc_loss(log_probs, frames, targets, target_lengths, per_line=False):
    """CTC loss (float32) summed over the batch (a line too short for its text counts 0), or with per_line (B,) losses
    (inf for such a line). log_probs (B, T', C), frames (B,), targets (B, U) padded ids."""
    return F.ctc_loss(log_probs.transpose(0, 1), targets, frames, target_lengths, blank=BLANK,
                      reduction="none" if per_line else "sum", zero_infinity=not per_line)


def greedy_decode(log_probs, frames):
    """Best path decoding: argmax per frame, repeats collapsed, blanks dropped. Returns a list of id lists."""
    best = log_probs.argmax(dim=-1).cpu()                                          # (B, T')
    return [[i for i in torch.unique_consecutive(best[b, :n]).tolist() if i != BLANK]
            for b, n in enumerate(frames.tolist())]


def edit_distance(a, b):
    """Levenshtein distance between two sequences (strings or lists of words): insertions, deletions, substitutions."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        diag, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (x != y))
    return row[-1]


def error_rates(refs, hyps):
    """Character and word error rates over lines: total edit distance / total reference characters (words); and
    where in a line the errors fall: first_word_wrong (last_word_wrong), the share of lines of two or more words
    whose first (last) word is not the one read there (None without such lines). Writing that drifts as a line goes
    on (smaller, looser) shows as a last word misread more often than a first."""
    chars = sum(len(r) for r in refs)
    words = sum(len(r.split()) for r in refs)
    cer = sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / max(chars, 1)
    wer = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)) / max(words, 1)
    pairs = [(r.split(), h.split()) for r, h in zip(refs, hyps) if len(r.split()) >= 2]
    wrong = lambda k: sum(not h or r[k] != h[k] for r, h in pairs) / len(pairs) if pairs else None
    return {"cer": cer, "wer": wer, "lines": len(refs), "chars": chars, "words": words,
            "first_word_wrong": wrong(0), "last_word_wrong": wrong(-1)}


@torch.no_grad()
def read_lines(model, strokes, alphabet, batch_size=64):
    """Recognise lines: strokes is a list of (T_i, 3) normalised tensors. Returns their texts, in order."""
    model.eval()
    device = model.out.weight.device
    order = sorted((i for i in range(len(strokes)) if len(strokes[i])), key=lambda i: len(strokes[i]))   # similar
    texts = [""] * len(strokes)                                                   # lengths batch together; no ink: ""
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        x = nn.utils.rnn.pad_sequence([torch.as_tensor(strokes[i], dtype=torch.float32) for i in idx], batch_first=True)
        lengths = torch.tensor([len(strokes[i]) for i in idx])
        log_probs, frames = model(x.to(device), lengths.to(device))
        for i, ids in zip(idx, greedy_decode(log_probs, frames)):
            texts[i] = alphabet.decode(ids)
    return texts


@torch.no_grad()
def write_and_read(model, recognizer, texts, alphabet, rec_alphabet, norm, rec_norm, bias=1.0, generator=None,
                   batch_size=64, max_steps_per_char=40, progress=False, retries=0, retry_above=None, prime=None,
                   prime_chars=0, candidates=1, score=None):
    """Legibility (evaluate.py --legibility, train.py --recognizer): write every text with the synthesis model
    (write_lines) and read the lines back with the recognizer. rec_norm: (mean, std) of the recognizer's data.
    With prime (style priming, as in write_lines) only the new writing is read: texts[i][prime_chars:]. candidates,
    score: as in sample() (best of K attempts; with a score from another recognizer than this one, so that the lines
    are not judged by the one that chose them).
    Returns raw offsets [(T_i, 3) float64], recognised texts, finished flags, step counts and attempts (samplings per
    line), in the order of texts."""
    raw, finished, steps, attempts = write_lines(model, texts, alphabet, norm, bias=bias, generator=generator,
                                                 batch_size=batch_size, max_steps_per_char=max_steps_per_char,
                                                 progress=progress, retries=retries, retry_above=retry_above,
                                                 prime=prime, prime_chars=prime_chars, candidates=candidates,
                                                 score=score)
    rec_mean, rec_std = (np.asarray(v, np.float32) for v in rec_norm)
    read = read_lines(recognizer, [torch.from_numpy(normalize(r.astype(np.float32), rec_mean, rec_std)) for r in raw],
                      rec_alphabet, batch_size)
    return raw, read, finished, steps, attempts


def legibility_score(recognizer, rec_ckpt, alphabet, norm, prime_chars=0):
    """The score for HandwritingModel.sample(candidates=K, score=...): how badly the recognizer reads each written
    line as its own text, the CTC loss -log p(text | line) in nats (lower: read more surely as the text asked for).
    recognizer, rec_ckpt: as load_recognizer returns them; alphabet, norm: the synthesis model's; prime_chars: the
    characters at the start of every text that a prime wrote (not in the written line, so not scored)."""
    device = recognizer.eval().out.weight.device
    rec_alphabet, rec_norm = Alphabet(rec_ckpt["alphabet"]), checkpoint_norm(rec_ckpt, np.float32)

    @torch.no_grad()
    def score(strokes, lengths, text):                       # strokes (N, T, 3) normalised, lengths (N,), text (N, U)
        raw = denormalize(strokes.float(), *norm)
        if prime_chars:                                      # from its own first point, as write_lines gives it
            raw[:, 0, :2] = 0
        x = normalize(raw, *rec_norm)
        x *= (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).unsqueeze(-1)   # zero after the end
        targets = [rec_alphabet.encode(alphabet.decode(t)[prime_chars:], drop_unknown=True) for t in text.cpu()]
        target_lengths = torch.tensor([len(t) for t in targets])
        log_probs, frames = recognizer(x.to(device), lengths.to(device))
        return ctc_loss(log_probs, frames, nn.utils.rnn.pad_sequence(targets, batch_first=True).to(device),
                        target_lengths.to(device), per_line=True)
    return score


def load_recognizer(checkpoint, map_location="cpu", flag="--checkpoint"):
    """Rebuild a Recognizer from a checkpoint dict or path (recognizer.py train; flag: the flag that gave the path).
    Raises FileNotFoundError or ValueError with a one-line message."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint, map_location, config_key="recognizer_config", writer="recognizer.py train",
                                     flag=flag)
    model = load_weights(Recognizer(RecognizerConfig.from_dict(checkpoint["recognizer_config"])), checkpoint["model"],
                         "recognizer")
    return model.eval(), checkpoint
