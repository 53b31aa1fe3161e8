"""
Graves' handwriting networks (arXiv 1308.0850, sections 4 and 5).

One model class covers both tasks:
- prediction: 3 stacked LSTMs (no peepholes, as cuDNN's) with skip connections (input -> every layer, every
  layer -> output) and a mixture density (MDN) head of M bivariate Gaussians plus an end-of-stroke Bernoulli.
- synthesis: the same stack plus a soft attention window over the one-hot text, computed from layer 1
  and fed to layers 2..L at step t and to layer 1 at step t + 1.

Only layer 1 and the window form a step-by-step recurrence; layers 2..L and the MDN head run fused over
the whole chunk (cuDNN LSTM on GPU). `forward` serves training (chunks of truncated BPTT with carried state),
evaluation and priming; sampling steps one point at a time with `_step`, the same maths with each layer's
weights merged into one matrix (tested equal to `forward`), float16-valued weights multiplied in float16 on an x86
CPU (StepProduct).
"""
import math
import numbers
import warnings
from dataclasses import dataclass, asdict, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOG_SIGMA_MIN = -7.0    # sigma >= exp(-7) ~ 1e-3 std units: keeps the density finite
RHO_MAX = 1.0 - 1e-4    # |rho| < 1: keeps 1 - rho^2 away from 0
LOG_2PI = math.log(2 * math.pi)
SAMPLE_BLOCK = 16   # sampling steps between stopping tests (one host sync each); a CUDA graph replays a block
# where the window sits, against where the text says it should: after a prime, on the space after the priming text
# (on real lines within 2.5 characters for 97 %: 400 validation lines, both synthesis models, docs/results.md); at a
# line's last point, on its last character. Further off than this, ink and text disagree (a word one has and the other
# lacks): a primed line starts by writing the rest of the priming text or skips its first letters
# (PrimeMisfitWarning); a real line's transcription most likely has a word its ink lacks (score_lines' window_end;
# evaluate.py --per-line)
WINDOW_MISFIT = 2.5  # characters


class PrimeMisfitWarning(UserWarning):
    """sample(prime=...): the priming strokes do not write the priming text (see WINDOW_MISFIT). fit: the worst line's
    prime_fit, in characters (negative: short of the text)."""

    def __init__(self, message, fit=None):
        super().__init__(message)
        self.fit = fit


class Config:
    """Dict round trip for the dataclass configs stored in checkpoints."""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:   # a newer version's setting, which this code would silently build without
            raise ValueError(f"the checkpoint's config has settings this code does not know ({', '.join(unknown)}): "
                             f"it was written by a newer version; update the code")
        return cls(**d)


@dataclass
class ModelConfig(Config):
    task: str = "synthesis"        # 'prediction' (section 4) or 'synthesis' (section 5)
    input_size: int = 3            # (dx, dy, eos) per point
    hidden_size: int = 400         # cells per LSTM layer (paper: 400)
    layers: int = 3                # stacked LSTM layers (paper: 3)
    mixtures: int = 20             # M, bivariate Gaussians in the MDN (paper: 20)
    window_gaussians: int = 10     # K, Gaussians in the attention window (paper: 10)
    alphabet_size: int = 0         # characters in the text alphabet (synthesis only; id 0 is padding)
    kappa_init: float = -3.0       # initial bias of kappa_hat: exp(-3) ~ 0.05 characters per point at start
    dropout: float = 0.0           # training only: dropout on each layer's output, to the layer above and the MDN head
                                   # (not inside the recurrence, nor the window's input); paper: none (weight noise)

    def __post_init__(self):
        if self.task not in ("prediction", "synthesis"):
            raise ValueError(f"task must be 'prediction' or 'synthesis', not {self.task!r}")
        if self.task == "synthesis" and self.alphabet_size <= 0:
            raise ValueError("a synthesis model needs alphabet_size > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a probability in [0, 1), not {self.dropout}")

    @property
    def output_size(self):
        return 1 + 6 * self.mixtures   # eos + (pi, mu1, mu2, sigma1, sigma2, rho) x M


class State(NamedTuple):
    """Recurrent state carried between chunks (truncated BPTT) and between sampling steps."""
    h: list                           # per layer (B, H)
    c: list                           # per layer (B, H)
    kappa: Optional[torch.Tensor]     # (B, K) window positions, in characters (synthesis)
    window: Optional[torch.Tensor]    # (B, A) last window vector w_{t-1} (synthesis)

    def _map(self, fn):
        f = lambda t: None if t is None else fn(t)
        return State([f(h) for h in self.h], [f(c) for c in self.c], f(self.kappa), f(self.window))

    def detach(self):
        return self._map(torch.Tensor.detach)

    def clone(self):
        return self._map(torch.Tensor.clone)

    def tensors(self):
        """Every tensor in a fixed order: h and c of each layer, then kappa and window when present."""
        return [t for t in (*self.h, *self.c, self.kappa, self.window) if t is not None]

    def copy_(self, other):
        """Overwrite these tensors in place with other's (the fixed buffers of a CUDA graph)."""
        for buffer, value in zip(self.tensors(), other.tensors()):
            buffer.copy_(value)


class Mixture(NamedTuple):
    """MDN parameters for every step (eq. 18-22), all (B, T, M) except eos_logit (B, T)."""
    eos_logit: torch.Tensor   # e = sigmoid(eos_logit) is P(pen lifts after this point) (eq. 18 with the sign flipped)
    log_pi: torch.Tensor      # log mixture weights
    mu1: torch.Tensor
    mu2: torch.Tensor
    log_sigma1: torch.Tensor
    log_sigma2: torch.Tensor
    rho: torch.Tensor


def upcast(y):
    """float16 and bfloat16 (autocast's outputs) to float32; float32 and float64 as they are: the mixture's maths,
    the loss and the draws, in float32 or double."""
    return y.float() if y.dtype in (torch.float16, torch.bfloat16) else y


def mixture_params(y, bias=0.0):
    """Split the network output y (B, T, 1 + 6M) into MDN parameters, in float32.
    bias > 0 is Graves' biased sampling (eq. 61-62): pi = softmax(pi_hat (1 + b)), sigma = exp(sigma_hat - b)."""
    y = upcast(y)
    eos_logit, pi_hat, mu1, mu2, s1, s2, rho_hat = torch.split(
        y, [1] + [(y.shape[-1] - 1) // 6] * 6, dim=-1)
    log_pi = torch.log_softmax(pi_hat * (1 + bias), dim=-1)
    log_sigma1 = (s1 - bias).clamp(min=LOG_SIGMA_MIN)
    log_sigma2 = (s2 - bias).clamp(min=LOG_SIGMA_MIN)
    rho = torch.tanh(rho_hat).clamp(-RHO_MAX, RHO_MAX)
    return Mixture(eos_logit.squeeze(-1), log_pi, mu1, mu2, log_sigma1, log_sigma2, rho)


def mixture_log_density(mix, x1, x2):
    """log sum_j pi_j N(x | mu_j, sigma_j, rho_j) (eq. 23-25) in log space; x1, x2: (B, T). Returns (B, T)."""
    z1 = (x1.unsqueeze(-1) - mix.mu1) * torch.exp(-mix.log_sigma1)
    z2 = (x2.unsqueeze(-1) - mix.mu2) * torch.exp(-mix.log_sigma2)
    one_m_rho2 = 1 - mix.rho ** 2
    z = z1 ** 2 + z2 ** 2 - 2 * mix.rho * z1 * z2
    log_n = (-LOG_2PI - mix.log_sigma1 - mix.log_sigma2 - 0.5 * torch.log(one_m_rho2)
             - z / (2 * one_m_rho2))
    return torch.logsumexp(mix.log_pi + log_n, dim=-1)


def check_whole(name, value, low):
    """A whole-number argument of the Python API (not a bool, not a float) >= low, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")


def nll(y, target, mask):
    """Negative log-likelihood (eq. 26) of target points (B, T, 3) under outputs y (B, T, 1 + 6M).
    mask (B, T) marks real points. Returns the loss summed over each line's points: (B,), float32."""
    mix = mixture_params(y)
    target = target.to(mix.mu1.dtype)
    log_p = mixture_log_density(mix, target[..., 0], target[..., 1])
    log_e = -F.binary_cross_entropy_with_logits(mix.eos_logit, target[..., 2], reduction="none")
    return -((log_p + log_e) * mask).sum(dim=1)


def chunk_backward(model, inputs, targets, mask, text, state, dtype=torch.float32, cache=True):
    """One truncated-BPTT chunk, forward and backward, for train.py's eager path and GraphedChunk alike (a new loss
    term goes here). The objective is the mean nats per point, the scale Adam's lr expects; model may be wrapped
    (DDP); cache: autocast's weight-cast cache (off inside a CUDA graph). Returns (the chunk's nats, detached; its
    points; the new state, not yet detached)."""
    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=cache):
        y, state = model(inputs, text, state)
    loss_sum, points = nll(y, targets, mask).sum(), mask.sum()
    (loss_sum / points.clamp(min=1)).backward()
    return loss_sum.detach(), points, state


def teacher_forcing(strokes, stroke_mask):
    """Inputs and targets for next-point prediction from a padded batch (B, T, 3).
    The first point of every line is the start token x_0 = 0 (its offset is (0, 0) by construction; its pen lift,
    when the first stroke is a single point, is dropped); the network predicts points 1..T-1.
    Returns inputs (B, T-1, 3), targets (B, T-1, 3), mask (B, T-1)."""
    inputs = strokes[:, :-1].clone()
    inputs[:, 0] = 0
    return inputs, strokes[:, 1:], stroke_mask[:, 1:]


def lstm_cell(gates, c):
    """LSTM update from pre-activations (B, 4H) in PyTorch's gate order (input, forget, cell, output)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def half_products_exact(weights):
    """Whether sampling may use StepProduct(half=True) for these weights without changing them: on a CPU, in float32
    (not under autocast), every weight a float16 number (the shipped checkpoints store float16), and the op there."""
    w = weights[0]
    if w.device.type != "cpu" or w.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if not all(torch.equal(v.half().float(), v) for v in weights):
        return False
    try:                               # fbgemm's kernel: x86 builds; elsewhere the op is missing or refuses
        StepProduct(torch.ones(1, 1), torch.zeros(1), half=True)(torch.ones(1, 1))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class StepProduct:
    """inp (B, in) -> inp W^T + b, one product of a sampling step: W (out, in), b (out,).
    half: W kept in float16 and multiplied by fbgemm's float16 kernel (float32 inputs, sums and outputs), for weights
    that are float16 numbers already: outputs within about 1e-6 of float32's (the order of the sums differs), half
    the bytes to read per step. A step at batch 1 is bound by reading the weights: on a 2-core AVX-512 VM, 0.37 ms
    a paper-size step instead of 0.62-0.8 ms (docs/results.md, Speed in full)."""

    def __init__(self, weight, bias, half=False):
        self.half = half
        if half:
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias.float())   # bias kept in float32
        else:
            self.weight_t, self.bias = weight.t().contiguous(), bias

    def __call__(self, inp):
        if self.half:
            return torch.ops.quantized.linear_dynamic_fp16(inp, self.packed)
        return torch.addmm(self.bias, inp, self.weight_t)


class HandwritingModel(nn.Module):

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        H, A, K = cfg.hidden_size, cfg.alphabet_size, cfg.window_gaussians
        self.synthesis = cfg.task == "synthesis"
        if self.synthesis:
            # layer 1 by hand: gates = W_x x_t + W_wh [w_{t-1}, h_{t-1}] + b (x part precomputed per chunk)
            self.lstm1_x = nn.Linear(cfg.input_size, 4 * H)
            self.lstm1_wh = nn.Linear(A + H, 4 * H, bias=False)
            self.window = nn.Linear(H, 3 * K)          # (alpha_hat, beta_hat, kappa_hat), eq. 48-51
            first = 1
        else:
            first = 0
        # fused layers: input is [x_t, h^{n-1}_t, w_t] (skip connection from the input, eq. 1-2)
        self.rnns = nn.ModuleList(
            nn.LSTM(cfg.input_size + (H if n > 0 else 0) + (A if self.synthesis else 0), H, batch_first=True)
            for n in range(first, cfg.layers))
        self.mdn = nn.Linear(cfg.layers * H, cfg.output_size)   # every layer -> output (eq. 17)
        self._compiled_step = None                               # see compile_window_step()
        self._step_cache = None                                  # see _step_weights()
        self._init_weights()

    def _init_weights(self):
        H = self.config.hidden_size
        if self.synthesis:
            bound = 1 / math.sqrt(H)   # PyTorch's LSTM initialisation, for the hand-written layer too
            for p in (self.lstm1_x.weight, self.lstm1_x.bias, self.lstm1_wh.weight):
                nn.init.uniform_(p, -bound, bound)
            with torch.no_grad():
                K = self.config.window_gaussians
                self.window.bias[2 * K:].fill_(self.config.kappa_init)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def initial_state(self, batch_size, device=None):
        cfg, w = self.config, self.mdn.weight
        zeros = lambda *s: torch.zeros(*s, device=device or w.device, dtype=w.dtype)
        h = [zeros(batch_size, cfg.hidden_size) for _ in range(cfg.layers)]
        c = [zeros(batch_size, cfg.hidden_size) for _ in range(cfg.layers)]
        if not self.synthesis:
            return State(h, c, None, None)
        return State(h, c, zeros(batch_size, cfg.window_gaussians), zeros(batch_size, cfg.alphabet_size))

    def one_hot(self, text):
        """(B, U) character ids (0 = padding) -> (B, U, A) one-hot, padding rows all zero."""
        return F.one_hot(text, self.config.alphabet_size + 1)[..., 1:].float()

    def forward(self, x, text=None, state=None, return_phi=False):
        """x: (B, T, 3) input points; text: (B, U) ids (synthesis); state: from the previous chunk or None.
        Returns y (B, T, 1 + 6M), the new State, and if return_phi the window weights phi (B, T, U + 1)
        (column u = text length, just past a line's own text, is the stopping rule's; U is the longest line's length)."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        hs, h_new, c_new, phi = [], [], [], None
        if self.synthesis:
            if text is None:
                raise ValueError("the synthesis model needs text")
            onehot = self.one_hot(text).to(x.dtype)                                # (B, U, A)
            h1, c1, kappa, w, h1_seq, w_seq, phi = self._window_loop(
                self.lstm1_x(x), onehot, state.h[0], state.c[0], state.kappa, state.window, return_phi)
            hs.append(self._dropout(h1_seq))
            h_new.append(h1)
            c_new.append(c1)
            skip = torch.cat([x, w_seq], dim=-1)                                   # (B, T, 3 + A)
        else:
            kappa = w = None
            skip = x
        inp = torch.cat([skip, hs[-1]], dim=-1) if hs else skip
        for n, rnn in enumerate(self.rnns, start=len(hs)):
            out, (h, c) = rnn(inp, (state.h[n].unsqueeze(0), state.c[n].unsqueeze(0)))
            h, c = h.squeeze(0), c.squeeze(0)
            out = self._dropout(out)
            hs.append(out)
            h_new.append(h)
            c_new.append(c)
            inp = torch.cat([skip, out], dim=-1)
        y = self.mdn(torch.cat(hs, dim=-1))                                        # (B, T, 1 + 6M)
        new_state = State(h_new, c_new, kappa, w)
        return (y, new_state, phi) if return_phi else (y, new_state)

    def _dropout(self, h):
        """Dropout between layers (Zaremba et al. 2014): identity in eval mode and at config.dropout = 0."""
        return F.dropout(h, self.config.dropout, self.training) if self.config.dropout else h

    def _window_loop(self, xg, onehot, h, c, kappa, w, return_phi):
        """The sequential part: layer-1 LSTM and the soft window, one step at a time.
        xg: (B, T, 4H) precomputed W_x x_t + b; onehot: (B, U, A)."""
        u = torch.arange(onehot.shape[1] + 1, device=xg.device, dtype=xg.dtype)   # positions 0..U
        step = self._compiled_step or self._window_step
        h_seq, w_seq, phis = [], [], []
        for xg_t in xg.unbind(1):   # not xg[:, t]: each select's backward would zero-fill a (B, T, 4H) gradient
            h, c, kappa, phi, w = step(xg_t, w, h, c, kappa, u, onehot)
            h_seq.append(h)
            w_seq.append(w)
            if return_phi:
                phis.append(phi)
        phi_seq = torch.stack(phis, dim=1) if return_phi else None
        return h, c, kappa, w, torch.stack(h_seq, dim=1), torch.stack(w_seq, dim=1), phi_seq

    def _window_step(self, xg_t, w, h, c, kappa, u, onehot):
        """One step of layer 1 (gates = xg_t + W_wh [w_{t-1}, h_{t-1}]) and the window. Returns h, c, kappa, phi, w."""
        h, c = lstm_cell(xg_t + self.lstm1_wh(torch.cat([w, h], dim=-1)), c)   # gates (B, 4H)
        kappa, phi, w = self._window(self.window(h), kappa, u, onehot)
        return h, c, kappa, phi, w

    def compile_window_step(self, **kwargs):
        """torch.compile the window loop's step (fuses its ~25 small kernels per step into a few, forward and backward);
        the first batches compile (tens of seconds), then every step is cheaper. kwargs go to torch.compile."""
        self._compiled_step = torch.compile(self._window_step, **kwargs)
        return self

    def window_centre(self, state, positions):
        """Where the window is at the step `state` ended: sum_u u phi(t, u) / sum_u phi(t, u) over u in
        0..positions - 1 (B,), in 0-based characters. phi(t, u) is _window's, with alpha_t and beta_t from layer 1's
        h_t (state.h[0]) and kappa_t (state.kappa, already moved at step t)."""
        alpha, beta, _ = torch.exp(self.window(state.h[0])).unsqueeze(-1).chunk(3, dim=1)   # (B, K, 1)
        u = torch.arange(positions, device=alpha.device, dtype=alpha.dtype)
        phi = self._phi(alpha, beta, state.kappa, u)                                       # (B, positions)
        return (phi * u).sum(dim=1) / phi.sum(dim=1).clamp_min(1e-30)

    @staticmethod
    def _phi(alpha, beta, kappa, u):
        """phi(t, u) = sum_k alpha_k exp(-beta_k (kappa_k - u)^2) (eq. 46): alpha, beta (B, K, 1), kappa (B, K),
        positions u (P,) -> (B, P)."""
        return (alpha * torch.exp(-beta * (kappa.unsqueeze(-1) - u) ** 2)).sum(dim=1)

    @staticmethod
    def _window(window_out, kappa, u, onehot):
        """The soft window (eq. 46-51) from the window layer's output (B, 3K) = (alpha_hat, beta_hat, kappa_hat):
        phi(t, u) = sum_k alpha_k exp(-beta_k (kappa_k - u)^2) for u in 0..U, w_t = sum_{u<U} phi(t, u) c_u.
        Positions are 0-based (the paper's u is our u + 1); u = U, one past the end, is the stopping test's.
        Returns kappa (B, K), phi (B, U + 1), w (B, A)."""
        alpha, beta, dkappa = torch.exp(window_out).view(-1, 3, kappa.shape[1], 1).unbind(1)   # (B, K, 1)
        kappa = kappa + dkappa[..., 0]                                            # moves forward only
        phi = HandwritingModel._phi(alpha, beta, kappa, u)                        # (B, U + 1)
        w = torch.bmm(phi[:, None, :-1], onehot).squeeze(1)
        return kappa, phi, w

    def _step_weights(self, half=None):
        """Weights for one sampling step, merged so that each layer's gates are one matrix-vector product:
        gates = [inputs, h_{t-1}] W^T + b. A step at batch 1 reads every weight once and is bound by memory bandwidth
        and per-op overhead; this halves the ops (1.5x faster sampling on CPU).
        Returns (one StepProduct per layer, the window's or None, the MDN's). half: the layers' StepProduct half (None:
        when exact, see half_products_exact); the heads stay float32, where fbgemm's float16 call costs more than
        the bytes it saves (window 13.5 us against 3.2, MDN 20 against 12-15: 2-core AVX-512 VM).
        Kept on the model with a copy of the parameters they were built from, and used again only while every
        parameter equals its copy (checked per call: 2.5 ms at paper size, against 35-40 ms, 6 % of a line on a CPU,
        to merge, check and pack them), so any change, an optimiser step, load_state_dict or an edit in place, is
        seen (version counters would not do: fused Adam bumps none). Also rebuilt under or out of inference_mode."""
        params = list(self.parameters())
        key = (half, torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled(),
               *((p.dtype, p.device, p.shape) for p in params))
        cache = self._step_cache
        if cache is not None and cache[0] == key and all(torch.equal(p, kept) for p, kept in zip(params, cache[1])):
            return cache[2]
        pairs = []
        with torch.no_grad():
            if self.synthesis:   # [x_t, w_{t-1}, h^1_{t-1}]
                pairs.append((torch.cat([self.lstm1_x.weight, self.lstm1_wh.weight], 1), self.lstm1_x.bias))
            for rnn in self.rnns:  # [x_t, (w_t), (h^{n-1}_t), h^n_{t-1}]
                pairs.append((torch.cat([rnn.weight_ih_l0, rnn.weight_hh_l0], 1), rnn.bias_ih_l0 + rnn.bias_hh_l0))
            if half is None:
                half = half_products_exact([w for w, _ in pairs])
            layers = [StepProduct(w, b, half) for w, b in pairs]
            heads = [StepProduct(head.weight, head.bias) for head in ([self.window] if self.synthesis else [])
                     + [self.mdn]]
            weights = layers, heads[0] if self.synthesis else None, heads[-1]
            self._step_cache = key, [p.detach().clone() for p in params], weights
        return weights

    def _step(self, x, state, weights, onehot=None, u=None):
        """One sampling step, the same maths as forward() with T = 1: x (B, 3) -> y (B, 1 + 6M), State, phi (B, U + 1)."""
        layers, window, mdn = weights  # StepProducts: inputs -> inputs W^T + b
        h, c, kappa, w, phi = list(state.h), list(state.c), state.kappa, state.window, None
        if self.synthesis:
            h[0], c[0] = lstm_cell(layers[0](torch.cat([x, w, h[0]], dim=-1)), c[0])
            kappa, phi, w = self._window(window(h[0]), kappa, u, onehot)
            x = torch.cat([x, w], dim=-1)                                         # skip input of the layers above
        for n in range(len(layers) - len(self.rnns), len(layers)):
            inp = torch.cat([x, h[n - 1], h[n]] if n > 0 else [x, h[n]], dim=-1)  # h[n - 1] is already step t's
            h[n], c[n] = lstm_cell(layers[n](inp), c[n])
        y = mdn(torch.cat(h, dim=-1))
        return y, State(h, c, kappa, w), phi

    def sample(self, text=None, steps=None, bias=0.0, prime=None, generator=None, batch_size=None,
               max_steps_per_char=40, record=False, retries=0, retry_above=None, cuda_graph=True, prime_chars=0,
               candidates=1, score=None):
        """Sample handwriting, all lines of the batch together.

        text: (B, U) ids (synthesis; padded with 0), which should already include the priming text
        if prime is given ("prime text" + " " + "new text", as in the paper).
        steps: number of points (prediction), or None for synthesis: stop when the window has moved past the
        last character (phi(t, U) > phi(t, u) for all u < U), each line capped at max_steps_per_char * U + 1 points
        of its own U (so batching changes no line; a line that reaches its cap is unfinished); steps given with
        synthesis caps every line at that many points instead (bench.py's fixed-length timing).
        Wrong arguments raise TypeError or ValueError naming the argument.
        prime: (Tp, 3) or (B, Tp, 3) normalised real strokes to feed first (style priming), without the line's
        first (0, 0) point: the start token x_0 = 0 takes its place, as in training. prime_chars: the characters at the
        start of every text that the prime wrote ("prime text" and its space); the cap and retry_above count only the
        characters after them, the ones the model writes.
        retries: lines that hit the cap are sampled again (together, the generator going on), up to this many times;
        with retry_above (points per character; None or 0: off), so are finished lines that took more than that: a window that
        stalls on a character writes loops there (real lines take about 21). A line keeps its first attempt that
        finished within retry_above, else its best one (finished first, then fewest points per character).
        cuda_graph: on a GPU, replay each block of SAMPLE_BLOCK steps as a CUDA graph (_SamplingGraph): the same
        lines as the eager loop (tested), one 40-character line 0.28 s instead of 1.3-2.3 s on an H100; ignored on CPU.
        candidates, score (synthesis): write every line `candidates` times, all in one batch (4 attempts took about
        twice the time of one on a 2-core CPU), and keep the attempt that score(strokes, lengths, text) ranks best:
        score takes N rows of a result and their text and returns (N,) (lower is better; recognition.legibility_score:
        how badly a recognizer reads each line as its text); a finished attempt beats an unfinished one. retries write
        a line's attempts again only when none of them is good (finished, within retry_above).
        Returns dict: strokes (B, T, 3) normalised offsets with eos in {0, 1}; lengths (B,) points per line;
        finished (B,) bool (synthesis: False when the cap was hit); attempts (B,) samplings per line; with prime and
        prime_chars (synthesis): prime_fit (B,), how many characters the window's centre is past the space after the
        priming text once the prime is read (negative: short of it; beyond WINDOW_MISFIT a PrimeMisfitWarning is
        issued); and if record: eos_prob (B, T), mixture (B, T, 1 + 6M raw outputs, for density plots),
        phi (B, T, U + 1)."""
        # on a CPU, inference mode (no autograd bookkeeping at all) takes 10-14 % off a step bound by per-op overhead;
        # a GPU replays graphs recorded under no_grad, as tested there. The results are cloned out of inference mode,
        # so callers may edit them in place.
        self._check_sample_args(text, steps, bias, prime, generator, batch_size, max_steps_per_char, retries,
                                retry_above, prime_chars, candidates, score)
        if candidates > 1:                              # row b * candidates + k: attempt k at line b
            text = text.repeat_interleave(candidates, dim=0)
            if prime is not None and prime.dim() == 3 and prime.shape[0] > 1:
                prime = prime.repeat_interleave(candidates, dim=0)
        training = self.training                        # sampling is evaluation: no dropout on the prime either
        try:
            with sampling_mode(self.mdn.weight.device):
                result = self.eval()._sample(text, steps, bias, prime, generator, batch_size, max_steps_per_char, record,
                                             retries, retry_above, cuda_graph, prime_chars, candidates)
        finally:
            self.train(training)
        result = {k: v.clone() if v.is_inference() else v for k, v in result.items()}
        if "prime_fit" in result:
            fit = result["prime_fit"][result["prime_fit"].abs().argmax()].item()       # the worst line's
            if abs(fit) > WINDOW_MISFIT:
                short = fit < 0
                warnings.warn(PrimeMisfitWarning(
                    f"the priming strokes {'end' if short else 'run'} {abs(fit):.1f} characters "
                    f"{'short of' if short else 'past'} the end of their text (does "
                    f"{'the text have a word the strokes do not write' if short else 'the text lack a word they write'}"
                    f"?): lines will start by {'writing the rest of it' if short else 'skipping letters'}; make the "
                    f"prime's text exactly what its strokes write", fit), stacklevel=2)
        return pick_candidates(result, text, candidates, score) if candidates > 1 else result

    def _check_sample_args(self, text, steps, bias, prime, generator, batch_size, max_steps_per_char, retries,
                           retry_above, prime_chars, candidates=1, score=None):
        """sample()'s arguments: a TypeError or ValueError that names the wrong one (generate.py checks its flags)."""
        if self.mdn.weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sampling needs float32 weights, not {self.mdn.weight.dtype}: call model.float() "
                             f"(load_model returns float32 from the float16 files)")
        if isinstance(bias, torch.Tensor) and bias.dim() == 0:
            bias = bias.item()
        if not isinstance(bias, numbers.Real) or not 0 <= bias < math.inf:
            raise ValueError(f"bias must be a finite number >= 0, not {bias!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)), not "
                            f"{type(generator).__name__}")
        if prime is not None and not (isinstance(prime, torch.Tensor) and prime.dim() in (2, 3) and prime.shape[-1] == 3):
            raise TypeError("prime must be a (Tp, 3) or (B, Tp, 3) tensor of normalised offsets (dataset.prime_strokes)")
        if prime is not None and not (prime.shape[-2] > 0 and bool(torch.isfinite(prime).all())):
            raise ValueError("prime must hold at least one point, all finite (dataset.prime_strokes)")
        if prime is None and prime_chars:
            raise ValueError("prime_chars counts the characters a prime wrote: give prime too, or prime_chars=0")
        check_whole("retries", retries, 0)
        check_whole("max_steps_per_char", max_steps_per_char, 1)
        check_whole("prime_chars", prime_chars, 0)
        check_whole("candidates", candidates, 1)
        if candidates > 1 and not self.synthesis:
            raise ValueError("candidates is for the synthesis model (attempts are ranked by how they write their text)")
        if candidates > 1 and not callable(score):
            raise TypeError("candidates > 1 needs score: a function (strokes, lengths, text) -> (N,) tensor, lower is "
                            "better (recognition.legibility_score)")
        if retry_above is not None and (not isinstance(retry_above, numbers.Real) or not 0 <= retry_above < math.inf):
            raise ValueError(f"retry_above must be None or a number of points per character >= 0, not {retry_above!r}")
        # arguments that would change nothing are refused, not ignored: the caller expected them to
        if score is not None and candidates == 1:
            raise ValueError("score ranks a line's candidates: give candidates > 1 too, or drop score")
        if retry_above and not retries:
            raise ValueError("retry_above chooses the lines that retries samples again, and retries is 0: give "
                             "retries > 0 too, or drop retry_above")
        if steps is not None:
            check_whole("steps", steps, 1)
        if not self.synthesis:
            if text is not None:
                raise ValueError("the prediction model writes no text: pass steps=N (points) instead of text")
            if steps is None:
                raise ValueError("the prediction model needs steps=N: the points to write per line")
            if batch_size is not None:
                check_whole("batch_size", batch_size, 1)
            if retries:
                raise ValueError("retries is for the synthesis model (a prediction line always finishes): drop it")
            if prime_chars:
                raise ValueError("prime_chars is for the synthesis model (the prediction model writes no text): drop it")
            if prime is not None and prime.dim() == 3 and batch_size and prime.shape[0] not in (1, batch_size):
                raise ValueError(f"prime has {prime.shape[0]} lines and batch_size is {batch_size}: give one prime "
                                 f"(Tp, 3) for all, or one per line")
            return
        if not (isinstance(text, torch.Tensor) and text.dim() == 2 and text.dtype == torch.long and text.numel()):
            raise TypeError("the synthesis model needs text: a (B, U) LongTensor of character ids, 0-padded "
                            "(alphabet.encode(s)[None] for one line; write_lines takes strings)")
        if batch_size is not None:
            raise ValueError("batch_size is for the prediction model: the synthesis model writes one line per row of "
                             "text (repeat the row for more)")
        if int(text.min()) < 0 or int(text.max()) > self.config.alphabet_size:
            raise ValueError(f"text holds ids outside 0..{self.config.alphabet_size} (0 = padding): encode it with the "
                             f"model's alphabet, dataset.Alphabet(checkpoint['alphabet'])")
        if bool(((text > 0).sum(dim=1) == 0).any()):
            raise ValueError("a row of text has no characters: every line needs some")
        if bool(((text[:, :-1] == 0) & (text[:, 1:] > 0)).any()):                   # a character after a 0
            raise ValueError("text has padding (0) before a character: pad each row at its end only "
                             "(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))")
        if prime is not None and prime.dim() == 3 and prime.shape[0] not in (1, text.shape[0]):
            raise ValueError(f"prime has {prime.shape[0]} lines and text {text.shape[0]}: give one prime (Tp, 3) for all, "
                             f"or one per line")
        if prime is not None and prime_chars >= int((text > 0).sum(dim=1).min()):
            raise ValueError(f"prime_chars ({prime_chars}) must be fewer than every line's characters: each text is "
                             f"the priming text, a space and the new text")

    def _sample(self, text, steps, bias, prime, generator, batch_size, max_steps_per_char, record, retries,
                retry_above, cuda_graph, prime_chars, candidates=1):
        """sample() under no_grad (and on a CPU inference mode); text already holds each line's candidates."""
        device = self.mdn.weight.device
        if self.synthesis:
            text = text.to(device)
            B = text.shape[0]
            text_len = (text > 0).sum(dim=1)                                       # (B,)
            new_len = (text_len - (prime_chars if prime is not None else 0)).clamp(min=1)   # characters to write
            cap = torch.full_like(text_len, steps) if steps else max_steps_per_char * new_len + 1
        else:
            B = batch_size or (1 if prime is None or prime.dim() == 2 else prime.shape[0])
            cap = torch.full((B,), steps, dtype=torch.long, device=device)
        max_steps = int(cap.max())                                                # cap (B,): each line's most points
        state, prime_fit = self.initial_state(B, device), None
        x = torch.zeros(B, 1, self.config.input_size, device=device)              # start token x_0 = 0
        if prime is not None:
            prime = prime.to(device).float()
            prime = prime.expand(B, -1, -1) if prime.dim() == 2 or prime.shape[0] == 1 else prime   # one for all lines
            inputs = torch.cat([x, prime[:, :-1]], dim=1)
            _, state = self(inputs, text, state)
            x = prime[:, -1:]
            if self.synthesis and prime_chars:                  # the space after the priming text: position prime_chars - 1
                # positions past the text's end count too (as many again), so that a window run far past a short new
                # text is measured where it is, not where the text ends
                prime_fit = self.window_centre(state, 2 * text.shape[1] + 1) - (prime_chars - 1)
        out, eos_prob, ys, phis = [], [], [], []
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = cap.clone()
        weights, x = self._step_weights(), x[:, 0]
        onehot = u = None                                                          # prediction: no text
        if self.synthesis:
            onehot = self.one_hot(text).to(self.mdn.weight.dtype)                  # (B, U, A)
            u = torch.arange(onehot.shape[1] + 1, device=device, dtype=onehot.dtype)
            inside = torch.arange(u.shape[0], device=device)[None] < text_len[:, None]   # (B, U + 1) character positions
        run_block = self._sample_steps
        if cuda_graph and device.type == "cuda":
            run_block = _SamplingGraph(self, x, state, weights, onehot, u, bias, generator, record, SAMPLE_BLOCK)
        for t0 in range(0, max_steps, SAMPLE_BLOCK):
            n = min(SAMPLE_BLOCK, max_steps - t0)
            x, state, xs, phi, eos, y = run_block(x, state, weights, onehot, u, bias, generator, record, n)
            out.append(xs)
            if record:
                eos_prob.append(eos)
                ys.append(y)
                if self.synthesis:
                    phis.append(phi)
            if self.synthesis:
                # stopping rule (section 5.3), tested for a block of steps at once (one host sync): a line ends at the
                # first step where phi at position U exceeds phi at every character position
                end_phi = phi.gather(2, text_len[:, None, None].expand(-1, n, 1)).squeeze(2)
                past = end_phi > phi.masked_fill(~inside[:, None], -1.0).amax(dim=2)   # (B, n)
                step = torch.arange(t0, t0 + n, device=device)                     # (n,) steps of the block
                past &= step[None] < cap[:, None]                                  # within the line's own cap
                first = step[past.int().argmax(dim=1)]                             # argmax: the first True
                lengths = torch.where(past.any(dim=1) & ~finished, first, lengths)
                finished |= past.any(dim=1)
                if bool((finished | (cap <= t0 + n)).all()):
                    break
        strokes = torch.cat(out, dim=1)
        T = strokes.shape[1]
        lengths = lengths.clamp(max=T)
        # a line whose last point starts a stroke (the point before it lifted the pen, its own did not) ends with the
        # pen travelling to a next letter: no ink (made to end its stroke below, it would be drawn as a stray dot)
        rows, last = torch.arange(B, device=device), (lengths - 1).clamp(min=0)
        lengths = lengths - ((lengths >= 2) & (strokes[rows, (lengths - 2).clamp(min=0), 2] > 0.5)
                             & (strokes[rows, last, 2] < 0.5)).long()
        keep = torch.arange(T, device=device)[None] < lengths[:, None]
        strokes = strokes * keep.unsqueeze(-1)
        strokes[rows, (lengths - 1).clamp(min=0), 2] = 1.0                      # the last point ends its stroke
        if self.synthesis:      # fewer points than characters: it stopped before writing, its window past its text
            finished &= lengths >= new_len   # from the start (a prime whose text lacks a word its strokes write)
        result = {"strokes": strokes, "lengths": lengths,
                  "finished": finished if self.synthesis else torch.ones(B, dtype=torch.bool, device=device),
                  "attempts": torch.ones(B, dtype=torch.long, device=device)}
        if prime_fit is not None:
            result["prime_fit"] = prime_fit
        if record:
            result["eos_prob"] = torch.cat(eos_prob, dim=1)
            result["mixture"] = torch.cat(ys, dim=1)
            if self.synthesis:
                result["phi"] = torch.cat(phis, dim=1)
        if self.synthesis and retries > 0:
            good = finished & (lengths <= retry_above * new_len) if retry_above else finished   # needs no retry
            good |= good.view(-1, candidates).any(dim=1).repeat_interleave(candidates)     # nor does a good one's sibling
            if not bool(good.all()):
                again = torch.nonzero(~good).squeeze(1)
                retry = self._sample(text[again], steps, bias, None if prime is None else prime[again], generator, None,
                                     max_steps_per_char, record, retries - 1, retry_above, cuda_graph, prime_chars)
                retry["attempts"] += 1
                # the retry (its own best) replaces this attempt unless it is worse: it did not finish where this one
                # did, or both finished (this one slowly) and it took longer
                take = ~finished[again] | (retry["finished"] & (retry["lengths"] <= lengths[again]))
                result["attempts"][again] = retry["attempts"]
                result = replace_rows(result, {k: v[take] for k, v in retry.items()}, again[take])
        return result

    def _sample_steps(self, x, state, weights, onehot, u, bias, generator, record, n):
        """n sampling steps from point x (B, 3) and state: each point is drawn from the mixture the network gives
        for it (bias sharpens it, section 5.4) and fed back. Returns the last point and state, then the block's
        points (B, n, 3), phi (B, n, U + 1) (synthesis, else None) and, if record, eos_prob (B, n) and the raw
        outputs (B, n, 1 + 6M) (else None)."""
        xs, phis, eos, ys = [], [], [], []
        for _ in range(n):
            y, state, phi = self._step(x, state, weights, onehot, u)              # phi (B, U + 1) or None
            x = self._sample_point(y, bias, generator)                            # (B, 3)
            xs.append(x)
            phis.append(phi)
            if record:
                eos.append(torch.sigmoid(upcast(y[:, 0])))
                ys.append(y)
        stack = lambda seq: torch.stack(seq, dim=1) if seq and seq[0] is not None else None
        return x, state, stack(xs), stack(phis), stack(eos), stack(ys)

    @staticmethod
    def _sample_point(y, bias=0.0, generator=None):
        """Draw one point per line from the mixture that the outputs y (B, 1 + 6M) give, biased by eq. 61-62 (the maths
        of mixture_params, the Gaussian's only for the drawn component), and from the eos Bernoulli. Returns (B, 3)."""
        y = upcast(y)
        B, M = y.shape[0], (y.shape[1] - 1) // 6
        uniform = torch.rand(B, 2, device=y.device, generator=generator)
        normal = torch.randn(B, 2, device=y.device, generator=generator)
        params = y[:, 1:].view(B, 6, M)                     # rows: pi_hat, mu1, mu2, sigma1_hat, sigma2_hat, rho_hat
        # component j with probability pi_j = softmax(pi_hat (1 + b))_j: inverse CDF, j = #{cdf < u * cdf_M}
        cdf = torch.cumsum(torch.log_softmax(params[:, 0] * (1 + bias), dim=-1).exp_(), dim=-1)
        j = torch.searchsorted(cdf, uniform[:, :1] * cdf[:, -1:]).clamp_(max=M - 1)   # (B, 1)
        mu1, mu2, s1, s2, rho = params[:, 1:].gather(2, j[:, None].expand(B, 5, 1)).unbind(1)   # each (B, 1)
        s1, s2 = [torch.exp((s - bias).clamp_(min=LOG_SIGMA_MIN)) for s in (s1, s2)]
        rho = torch.tanh(rho).clamp_(-RHO_MAX, RHO_MAX)
        x1 = mu1 + s1 * normal[:, :1]
        x2 = mu2 + s2 * (rho * normal[:, :1] + torch.sqrt(1 - rho ** 2) * normal[:, 1:])
        eos = (uniform[:, 1:] < torch.sigmoid(y[:, :1])).to(y.dtype)
        return torch.cat([x1, x2, eos], dim=-1)


class _SamplingGraph:
    """sample()'s block of steps (HandwritingModel._sample_steps) recorded once as a CUDA graph and replayed: one
    launch per block instead of ~60 small kernels per step, each launched from Python. Called like _sample_steps;
    the point and state live in the graph's buffers (what it returns is passed back in). A shorter last block
    replays the whole block and keeps its first n steps (the rest only draws numbers after the last point, so
    lines written again by `retries` draw other numbers than the eager loop's)."""

    def __init__(self, model, x, state, weights, onehot, u, bias, generator, record, block):
        device = x.device
        self.x, self.state = x.clone(), state.clone()
        args = (weights, onehot, u, bias, generator, record, block)
        # autocast must not cache casts across the capture; the caller's autocast dtype stays
        autocast = lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                          enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        rng = generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)
        with autocast():                          # warm-up (cuBLAS workspaces) off the capture, on copies
            _on_side_stream(device, lambda: model._sample_steps(self.x.clone(), state, *args))
        if generator is not None:                 # put the warm-up's draws back: the sample is the eager one
            generator.set_state(rng)
        else:
            torch.cuda.set_rng_state(rng, device)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:                 # the default generator needs no registration
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph), autocast():
            x_new, state_new, *self.outputs = model._sample_steps(self.x, self.state, *args)
            self.x.copy_(x_new)
            self.state.copy_(state_new)

    def __call__(self, x, state, weights, onehot, u, bias, generator, record, n):
        self.graph.replay()
        return (self.x, self.state, *[None if o is None else o[:, :n].clone() for o in self.outputs])


def sampling_mode(device):
    """No autograd while sampling: inference mode on a CPU (no bookkeeping at all), no_grad elsewhere (a GPU replays
    graphs recorded under no_grad). Not inference_mode(False), which turns gradients back on, even inside no_grad."""
    return torch.inference_mode() if device.type == "cpu" else torch.no_grad()


def pick_candidates(result, text, k, score):
    """sample(candidates=k): of each line's k attempts (consecutive rows of result), keep the one `score` ranks best
    (lowest), a finished one before any unfinished one. Returns a result with one row per line."""
    s = score(result["strokes"], result["lengths"], text).float().to(result["lengths"].device).view(-1, k)
    done = result["finished"].view(-1, k)
    best = torch.where(done.any(dim=1), s.masked_fill(~done, math.inf).argmin(dim=1), s.argmin(dim=1))   # (B,)
    rows = torch.arange(best.shape[0], device=best.device) * k + best
    return {key: v[rows] for key, v in result.items()}


def replace_rows(result, other, rows):
    """Put the lines of `other` (a sample() result for len(rows) lines) into `result` at `rows`; tensors with a
    time axis (dim 1) are zero-padded to the longer of the two."""
    merged = {}
    for key, value in result.items():
        new = other[key]
        if value.dim() > 1 and value.shape[1] != new.shape[1]:
            T = max(value.shape[1], new.shape[1])
            pad = lambda v: F.pad(v, [0, 0] * (v.dim() - 2) + [0, T - v.shape[1]])
            value, new = pad(value), pad(new)
        value = value.clone()
        value[rows] = new
        merged[key] = value
    return merged


def load_model(checkpoint, map_location="cpu", expect_task=None, task_flag=True):
    """Rebuild a model from a checkpoint dict (see train.py) or path. Raises FileNotFoundError or ValueError
    with a one-line message for a missing file, a file that is not one of our checkpoints, or the wrong task (that
    suggests --task when the caller has that flag: task_flag)."""
    if not isinstance(checkpoint, dict):
        from utils import load_checkpoint
        checkpoint = load_checkpoint(checkpoint, map_location)
    if not isinstance(checkpoint.get("model_config"), dict) or "model" not in checkpoint:
        raise ValueError("the checkpoint dict lacks model_config or model: pass a file train.py wrote, or its dict")
    config = ModelConfig.from_dict(checkpoint["model_config"])
    if expect_task and config.task != expect_task:
        raise ValueError(f"this checkpoint is a {config.task} model, not {expect_task}; "
                         f"pass a {expect_task} checkpoint" + (f" or --task {config.task}" if task_flag else ""))
    model = load_weights(HandwritingModel(config), checkpoint["model"], "checkpoint")
    check_loaded(model, checkpoint)
    return model.eval(), checkpoint


def load_weights(model, weights, what):
    """A checkpoint's weights (float16 or float32) into model, in float32; a ValueError naming the first missing,
    unexpected or misshapen weight (`what`'s weights) if they do not fit."""
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as e:
        detail = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [str(e)]   # line 1: "Error(s) in ..."
        raise ValueError(f"{what} weights do not match its config: {detail[0][:200]}") from None
    return model


def check_loaded(model, checkpoint):
    """ValueError, one line, for a checkpoint that loads but would write garbage: weights that are not finite (a run
    that diverged), a damaged normalisation, or a synthesis alphabet that does not fit the model."""
    bad = next((k for k, v in model.state_dict().items() if not torch.isfinite(v).all()), None)
    if bad:
        raise ValueError(f"the checkpoint's weights are not finite ({bad}): the run that wrote it diverged; use an "
                         f"earlier checkpoint")
    if "mean" in checkpoint or "std" in checkpoint:
        import numpy as np
        from utils import checkpoint_norm
        try:
            mean, std = checkpoint_norm(checkpoint)
            ok = mean.shape == std.shape == (2,) and bool(np.isfinite([mean, std]).all() and (std > 0).all())
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("the checkpoint's normalisation is damaged ('mean' and 'std' must be two finite numbers "
                             "each, std > 0); use a checkpoint written by train.py")
    alphabet = checkpoint.get("alphabet")
    if model.synthesis and alphabet is not None:
        if not isinstance(alphabet, str) or len(set(alphabet)) != len(alphabet):
            raise ValueError("the checkpoint's alphabet is damaged (not a string of distinct characters); use a "
                             "checkpoint written by train.py")
        if len(alphabet) != model.config.alphabet_size:
            raise ValueError(f"its alphabet has {len(alphabet)} characters but the model expects "
                             f"{model.config.alphabet_size}")


@torch.no_grad()
def score_lines(model, batch, device, dtype=torch.float32):
    """Each line of a collated batch (dataset.collate) under teacher forcing, as (B,) float64 tensors: nll (nats),
    sse (squared error of the mixture's expected offset, normalised units, summed over points), points, and for
    synthesis focus (summed over points: the largest share of phi(t, u) on one of the line's characters) and
    window_end: the window's centre at the line's last point (over its characters and the end position U_i) minus
    its last character's position: about 0 to 0.5 where the window read the whole text, far below 0 where the ink
    stops short of its text (a word in the transcription that the pen did not write). The model's training mode is
    left as it was."""
    device, training = torch.device(device), model.training
    try:
        return _score_lines(model.eval(), batch, device, dtype)
    finally:
        model.train(training)


def _score_lines(model, batch, device, dtype):
    strokes, mask = batch["strokes"].to(device), batch["stroke_mask"].to(device)
    inputs, targets, tmask = teacher_forcing(strokes, mask)
    text = batch["text"].to(device) if model.synthesis else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        y, _, *phi = model(inputs, text, return_phi=model.synthesis)
    mix = mixture_params(y)
    pi = torch.exp(mix.log_pi)
    err = ((pi * mix.mu1).sum(-1) - targets[..., 0]) ** 2 + ((pi * mix.mu2).sum(-1) - targets[..., 1]) ** 2
    out = {"nll": nll(y, targets, tmask).double(), "sse": (err * tmask).sum(1).double(), "points": tmask.sum(1).double()}
    if phi:   # (B, T, U + 1)
        text_mask = batch["text_mask"].to(device)
        on_text = phi[0][..., :-1].float() * text_mask[:, None, :]               # the line's own characters only
        share = on_text.max(-1).values / on_text.sum(-1).clamp_min(1e-30)         # (B, T)
        out["focus"] = (share * tmask).sum(1).double()
        T, U = tmask.sum(1).long(), text_mask.sum(1)                             # (B,) points, characters per line
        last = phi[0][torch.arange(len(T), device=device), (T - 1).clamp(min=0)].double()   # (B, U + 1)
        u = torch.arange(last.shape[1], device=device, dtype=last.dtype)
        last = last * (u[None] <= U[:, None])                                  # its characters and its end position
        out["window_end"] = (last * u).sum(1) / last.sum(1).clamp_min(1e-30) - (U - 1)
    return out


def evaluate_nll(model, loader, device, dtype=torch.float32):
    """Validation loss in Graves' units over a loader of collated batches: score_lines summed over every line.
    Returns the sums (nll, sse, lines, points, focus) for summarize_nll, kept as sums so processes can all-reduce
    them."""
    total = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in loader:
        total += line_sums(score_lines(model, batch, device, dtype))
    return total


def line_sums(scores):
    """score_lines' per-line scores -> their sums (nll, sse, lines, points, focus), float64 (5,)."""
    nll_ = scores["nll"]
    focus = scores["focus"].sum() if "focus" in scores else torch.zeros_like(nll_[0])
    return torch.stack([nll_.sum(), scores["sse"].sum(), torch.full_like(nll_[0], len(nll_)), scores["points"].sum(),
                        focus])


def summarize_nll(total):
    """Turn evaluate_nll's sums into the reported metrics. window_focus (synthesis): the mean over points of the
    largest share of the window on one character, 1 when the window reads one character at a time; a legible
    model's is high (the shipped stand-in: 0.64), a model that blurs the text's letters has a low one (0.3)."""
    nll_sum, sse_sum, lines, points, focus = total.tolist()
    return {"nll_per_line": nll_sum / max(lines, 1), "nll_per_point": nll_sum / max(points, 1),
            "sse": sse_sum / max(points, 1), "lines": int(lines), "points": int(points),
            **({"window_focus": focus / max(points, 1)} if focus > 0 else {})}


class GraphedChunk:
    """Forward and backward of one truncated-BPTT chunk, recorded once as a CUDA graph and replayed (--cuda-graph).

    The window loop launches ~75 small kernels per time step, forward and backward; launched one by one from Python,
    their launch cost, not the GPU, sets the speed. A graph replays all of a chunk's kernels as one launch (H100,
    paper-size synthesis, batch 64, 100-point chunks: 238k points/s against 35k eagerly). Shapes are then fixed:
    B lines, L points, U characters, so step() pads smaller chunks with masked rows and points (the loss and gradients are
    unchanged: masked points add nothing, and a point never affects the ones before it). The state carried between
    chunks lives in static buffers: reset(text) at every new batch. Gradients land in the parameters' .grad, which
    the graph owns: do not zero them (set_to_none would disconnect them). Without CUDA the same code runs eagerly,
    which is what the tests compare with the plain forward and backward.
    """

    def __init__(self, model, batch_size, chunk, text_len=0, dtype=torch.float32, warmup=3):
        device, float_type = model.mdn.weight.device, model.mdn.weight.dtype
        self.model, self.dtype, self.graph = model, dtype, None
        zeros = lambda *shape, dtype=float_type: torch.zeros(*shape, device=device, dtype=dtype)
        self.inputs, self.targets = zeros(batch_size, chunk, 3), zeros(batch_size, chunk, 3)
        self.mask = zeros(batch_size, chunk)
        self.text = zeros(batch_size, max(text_len, 1), dtype=torch.long) if model.synthesis else None
        self.state = model.initial_state(batch_size, device)
        if device.type != "cuda":
            return
        for _ in range(warmup):                   # warm-up (cuDNN plans, allocator, compilation) off the capture
            model.zero_grad(set_to_none=True)
            _on_side_stream(device, self._forward_backward)
        model.zero_grad(set_to_none=True)         # .grad is then allocated inside the graph, rewritten by each replay
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss_sum, self.points = self._forward_backward()

    def _forward_backward(self):
        """The recorded work: chunk_backward, then carry the state."""
        loss_sum, points, new = chunk_backward(self.model, self.inputs, self.targets, self.mask, self.text, self.state,
                                               self.dtype, cache=False)
        with torch.no_grad():
            self.state.copy_(new)
        return loss_sum, points

    def reset(self, text=None):
        """Start new lines: zero state; text (b, u) ids for synthesis, b <= B and u <= U."""
        for buffer in self.state.tensors():
            buffer.zero_()
        if self.text is not None:
            if text.shape[0] > self.text.shape[0] or text.shape[1] > self.text.shape[1]:
                raise ValueError(f"text {tuple(text.shape)} does not fit the graph's {tuple(self.text.shape)}")
            self.text.zero_()
            self.text[:text.shape[0], :text.shape[1]] = text

    def step(self, inputs, targets, mask):
        """One chunk: inputs, targets (b, l, 3) and mask (b, l) with b <= B, l <= L. Runs forward and backward (the
        gradients are then in .grad) and returns (loss_sum, points) as tensors, the sum of nats and of points."""
        b, l = mask.shape
        if b > self.mask.shape[0] or l > self.mask.shape[1]:
            raise ValueError(f"chunk {(b, l)} does not fit the graph's {tuple(self.mask.shape)}")
        for buffer, value in ((self.inputs, inputs), (self.targets, targets), (self.mask, mask)):
            buffer.zero_()
            buffer[:b, :l] = value
        if self.graph is not None:
            self.graph.replay()
            return self.loss_sum, self.points
        self.model.zero_grad(set_to_none=True)
        return self._forward_backward()


class WeightNoise:
    """Adaptive weight noise (Graves 2011, "Practical Variational Inference for Neural Networks"), the regulariser of
    the paper's best figures (-1057.7 prediction, -1128.2 synthesis). Every weight is drawn from its own Gaussian,
    w = mu + sigma * eps with eps ~ N(0, 1): mu is the model's parameter and sigma = exp(log_sigma) is learnt beside it.
    The loss adds the weights' description length KL(Q || P) against one Gaussian prior over all n weights, set to its
    optimum: mu0 = mean(mu), sigma0^2 = mean(sigma^2 + (mu - mu0)^2), which makes KL = sum_i log(sigma0 / sigma_i).
    Per point, as train.py's loss: mean NLL per point + KL / N, with N the points of the training split.

    Use: sample(step) once per batch (eps drawn from a generator seeded by the step: the same on every process and
    again on resume), then for every chunk perturb() before the forward and restore() after the backward; the
    optimiser steps the parameters (mu) and log_sigma. Outside perturb/restore the model holds mu, which evaluation
    and sampling use. In-place on the parameters' storage, so it works under CUDA graphs and DDP."""

    def __init__(self, params, init_std, data_points, seed=0):
        self.params = list(params)
        self.log_sigma = [torch.full_like(p, math.log(init_std)).requires_grad_() for p in self.params]
        self.eps = [torch.zeros_like(p) for p in self.params]
        self.mu = [torch.empty_like(p) for p in self.params]
        self.scale, self.seed = 1.0 / data_points, seed
        self.n = sum(p.numel() for p in self.params)
        self.kl = torch.zeros((), device=self.params[0].device)   # KL / N at the last restore(), nats per point

    @torch.no_grad()
    def sample(self, step):
        # 2**32 + ...: not a seed that train.py's augmentation draws (seed * 1_000_003 + step) ever uses
        generator = torch.Generator(device=self.params[0].device).manual_seed(2 ** 32 + self.seed * 1_000_003 + step)
        for e in self.eps:
            e.normal_(generator=generator)

    @torch.no_grad()
    def perturb(self):
        """mu -> w = mu + sigma * eps, in place (mu is kept aside)."""
        for p, mu, log_sigma, e in zip(self.params, self.mu, self.log_sigma, self.eps):
            mu.copy_(p)
            p.addcmul_(log_sigma.exp(), e)

    @torch.no_grad()
    def restore(self):
        """w -> mu, and the gradients of mean NLL + KL / N: the backward left dNLL/dw in mu's .grad (= dNLL/dmu);
        dNLL/dlog_sigma = dNLL/dw * eps * sigma. The prior's own dependence on mu and sigma adds nothing (it sits
        at its optimum), so dKL/dmu_i = (mu_i - mu0) / sigma0^2 and dKL/dlog_sigma_i = sigma_i^2 / sigma0^2 - 1."""
        for p, mu in zip(self.params, self.mu):
            p.copy_(mu)
        sigma = [ls.exp() for ls in self.log_sigma]
        mu0 = sum(p.sum() for p in self.params) / self.n
        var0 = sum((s * s).sum() + ((p - mu0) ** 2).sum() for s, p in zip(sigma, self.params)) / self.n
        for p, log_sigma, s, e in zip(self.params, self.log_sigma, sigma, self.eps):
            if p.grad is None:                       # a weight the loss did not reach: its NLL gradient is 0
                p.grad = torch.zeros_like(p)
            log_sigma.grad = p.grad * e * s + self.scale * (s * s / var0 - 1)
            p.grad.add_((p - mu0) * (self.scale / var0))
        self.kl = self.scale * (0.5 * self.n * var0.log() - sum(ls.sum() for ls in self.log_sigma))

    def state_dict(self):
        return {"log_sigma": [ls.detach().clone() for ls in self.log_sigma]}

    def load_state_dict(self, state):
        with torch.no_grad():
            for ls, saved in zip(self.log_sigma, state["log_sigma"], strict=True):
                ls.copy_(saved)


def _on_side_stream(device, fn):
    """Run fn on a fresh CUDA stream, ordered after and before the current one: warm-ups before a graph capture
    must not run on the capturing stream."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


### writing many lines (generate.py's .npz output; the legibility measure in recognition.py)
def iter_write_lines(model, texts, alphabet, norm, bias=1.0, generator=None, batch_size=64, max_steps_per_char=40,
                     progress=False, retries=0, retry_above=None, prime=None, prime_chars=0, candidates=1, score=None):
    """Write many lines with the synthesis model, batched by text length so that a batch's lines end at about the
    same step (generate.py's .npz output, legibility). texts: strings in the model's alphabet (with prime, each one
    already "prime text" + " " + "new text", as sample() wants); norm: (mean, std) of the model's data; prime: (Tp, 3)
    normalised strokes fed before every line (or (len(texts), Tp, 3), one per text), prime_chars the characters it wrote (a primed line's offsets start at its
    own first point); the rest as in sample() (retries: stalled lines are written again; candidates: each line is
    written that many times, a batch of batch_size lines being batch_size x candidates rows, and the best one kept).
    Yields one dict per batch: index (positions in texts), raw offsets [(T_i, 3) float64], finished, steps and
    attempts (samplings per line), so that a caller can keep what is done if it is stopped."""
    import numpy as np
    from dataset import Alphabet, denormalize, from_its_first_point
    from utils import MAX_LINE_CHARS
    if not model.synthesis:
        raise ValueError("write_lines needs a synthesis model; the prediction model writes no text (sample(steps=N))")
    ### the arguments, all checked before any line is sampled
    try:
        texts = texts if isinstance(texts, str) else list(texts)      # (any iterable of strings, read once)
    except TypeError:
        raise TypeError("texts must be a list of strings, one per line") from None
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings, one per line"
                        + (" ([text] for one)" if isinstance(texts, str) else ""))
    if not isinstance(alphabet, Alphabet) or len(alphabet.chars) != model.config.alphabet_size:
        raise ValueError(f"alphabet must be the model's: dataset.Alphabet(checkpoint['alphabet']) "
                         f"({model.config.alphabet_size} characters)")
    check_whole("batch_size", batch_size, 1)
    try:
        mean, std = (np.asarray(v, dtype=np.float64).reshape(2) for v in norm)
        assert np.isfinite([mean, std]).all() and (std > 0).all()
    except (TypeError, ValueError, AssertionError):
        raise ValueError("norm must be (mean, std) of the model's data, two (dx, dy) pairs, std > 0: "
                         "(checkpoint['mean'], checkpoint['std'])") from None
    for i, t in enumerate(texts):
        if not t.strip():
            raise ValueError(f"texts[{i}] is empty: every line needs some characters")
        unknown = alphabet.unknown(t)
        if unknown:
            raise ValueError(f"texts[{i}] has characters not in the model's alphabet: "
                             f"{', '.join(map(repr, unknown))} (alphabet.writable(text) leaves them out)")
    per_line = isinstance(prime, torch.Tensor) and prime.dim() == 3 and prime.shape[0] > 1   # (sample() checks prime)
    if per_line and prime.shape[0] != len(texts):
        raise ValueError(f"prime has {prime.shape[0]} lines and texts {len(texts)}: give one prime (Tp, 3) for all, "
                         f"or one per text")
    long = [i for i, t in enumerate(texts) if len(t) - prime_chars > MAX_LINE_CHARS]
    if long:
        warnings.warn(f"{len(long)} text(s) longer than {MAX_LINE_CHARS} characters, the longest line the model saw "
                      f"(texts[{long[0]}], ...): such lines drift and blur; split them", stacklevel=2)
    device = model.mdn.weight.device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    bar = None
    if progress:                                  # in lines, shown from the start (a batch can take minutes)
        from tqdm import tqdm
        bar = tqdm(total=len(texts), desc="generating", unit="line", disable=None)
    try:
        for a in range(0, len(order), batch_size):
            idx = order[a:a + batch_size]
            text = nn.utils.rnn.pad_sequence([alphabet.encode(texts[i]) for i in idx], batch_first=True)
            result = model.sample(text=text.to(device), bias=bias, generator=generator,
                                  prime=prime[idx] if per_line else prime,              # each text's own, if given
                                  max_steps_per_char=max_steps_per_char, retries=retries, retry_above=retry_above,
                                  prime_chars=prime_chars, candidates=candidates, score=score)
            steps = result["lengths"].tolist()
            strokes = denormalize(result["strokes"].cpu().double().numpy(), mean, std)
            raw = [strokes[b, :n] if prime is None else from_its_first_point(strokes[b, :n]) for b, n in enumerate(steps)]
            if bar is not None:
                bar.update(len(idx))
            yield {"index": idx, "raw": raw, "steps": steps,
                   "finished": result["finished"].tolist(), "attempts": result["attempts"].tolist()}
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()


def write_lines(model, texts, alphabet, norm, **kwargs):
    """iter_write_lines, collected: raw offsets [(T_i, 3) float64], finished flags, step counts and attempts, in the
    order of texts."""
    batches = list(iter_write_lines(model, texts, alphabet, norm, **kwargs))   # (texts may be any iterable)
    out = {k: [None] * sum(len(b["index"]) for b in batches) for k in ("raw", "finished", "steps", "attempts")}
    for batch in batches:
        for k in out:
            for i, v in zip(batch["index"], batch[k]):
                out[k][i] = v
    return out["raw"], out["finished"], out["steps"], out["attempts"]
