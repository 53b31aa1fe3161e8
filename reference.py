"""
A textbook implementation of Graves' handwriting networks (arXiv 1308.0850, sections 4-5), kept for
checking and benchmarking the fast model in model.py.

Everything is written the plain way: one `nn.LSTMCell` per layer, all layers stepped together in one
Python loop over time, the soft window (eq. 46-51) and the mixture density loss (eq. 23-26) as the paper
writes them, with no log-space tricks. It computes the same function as `HandwritingModel` (same
clamps, same input ordering, same initial state, and the same departures from the paper: no peepholes, 0-based
character positions; README, "Where the code differs from the paper"), so `ReferenceModel.from_model(model)` gives a copy
whose outputs, loss and gradients must match; tests/test_reference.py checks that, and bench.py times it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import LOG_SIGMA_MIN, RHO_MAX, HandwritingModel, ModelConfig


class ReferenceModel(nn.Module):

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        H, A, L = cfg.hidden_size, cfg.alphabet_size, cfg.layers
        self.synthesis = cfg.task == "synthesis"
        skip = cfg.input_size + (A if self.synthesis else 0)     # [x_t, w_t] reaches every layer (eq. 52-53)
        # layer 1 reads [x_t, w_{t-1}]; layer n > 1 reads [x_t, w_t, h^{n-1}_t]
        self.cells = nn.ModuleList(nn.LSTMCell(skip + (H if n > 0 else 0), H) for n in range(L))
        if self.synthesis:
            self.window = nn.Linear(H, 3 * cfg.window_gaussians)   # (alpha_hat, beta_hat, kappa_hat)
        self.mdn = nn.Linear(L * H, cfg.output_size)                # every layer -> output (eq. 17)

    @classmethod
    def from_model(cls, model: HandwritingModel):
        """A reference copy of `model`'s weights (same dtype and device)."""
        ref = cls(model.config).to(device=model.mdn.weight.device, dtype=model.mdn.weight.dtype)
        ref.load_from(model)
        return ref

    @torch.no_grad()
    def load_from(self, model: HandwritingModel):
        """Copy the weights of a HandwritingModel with the same config."""
        A = self.config.alphabet_size
        cells = iter(self.cells)
        if self.synthesis:
            # the fast layer 1 splits its weights as W_x x_t + b and W_wh [w_{t-1}, h_{t-1}]
            first = next(cells)
            first.weight_ih.copy_(torch.cat([model.lstm1_x.weight, model.lstm1_wh.weight[:, :A]], dim=1))
            first.weight_hh.copy_(model.lstm1_wh.weight[:, A:])
            first.bias_ih.copy_(model.lstm1_x.bias)
            first.bias_hh.zero_()
            self.window.load_state_dict(model.window.state_dict())
        for cell, rnn in zip(cells, model.rnns):
            cell.weight_ih.copy_(rnn.weight_ih_l0)
            cell.weight_hh.copy_(rnn.weight_hh_l0)
            cell.bias_ih.copy_(rnn.bias_ih_l0)
            cell.bias_hh.copy_(rnn.bias_hh_l0)
        self.mdn.load_state_dict(model.mdn.state_dict())

    def model_layout(self, tensors=None):
        """Map tensors named like this module's parameters (default: the parameters; pass their gradients
        to compare gradients) to HandwritingModel's parameter names. The layer-1 bias of the fast model
        is bias_ih + bias_hh here (both receive the same gradient)."""
        t = dict(self.named_parameters()) if tensors is None else tensors
        A, out = self.config.alphabet_size, {}
        n0 = 0
        if self.synthesis:
            w_ih = t["cells.0.weight_ih"]
            out["lstm1_x.weight"] = w_ih[:, :-A]
            out["lstm1_x.bias"] = t["cells.0.bias_ih"]
            out["lstm1_wh.weight"] = torch.cat([w_ih[:, -A:], t["cells.0.weight_hh"]], dim=1)
            out["window.weight"], out["window.bias"] = t["window.weight"], t["window.bias"]
            n0 = 1
        for i, n in enumerate(range(n0, self.config.layers)):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                out[f"rnns.{i}.{name}_l0"] = t[f"cells.{n}.{name}"]
        out["mdn.weight"], out["mdn.bias"] = t["mdn.weight"], t["mdn.bias"]
        return out

    def forward(self, x, text=None):
        """x: (B, T, 3) input points; text: (B, U) character ids, 0 = padding (synthesis).
        Returns the network outputs y (B, T, 1 + 6M), starting from the zero state."""
        B, T, _ = x.shape
        H, A = self.config.hidden_size, self.config.alphabet_size
        h = [x.new_zeros(B, H) for _ in self.cells]
        c = [x.new_zeros(B, H) for _ in self.cells]
        if self.synthesis:
            onehot = F.one_hot(text, A + 1)[..., 1:].to(x.dtype)           # (B, U, A), padding rows zero
            u = torch.arange(text.shape[1], device=x.device, dtype=x.dtype)  # character positions 0..U-1
            kappa = x.new_zeros(B, self.config.window_gaussians)           # (B, K)
            w = x.new_zeros(B, A)                                          # w_0 = 0
        outputs = []
        for t in range(T):
            x_t = x[:, t]
            if self.synthesis:
                h[0], c[0] = self.cells[0](torch.cat([x_t, w], dim=1), (h[0], c[0]))
                # the window, eq. 46-51
                alpha_hat, beta_hat, kappa_hat = self.window(h[0]).chunk(3, dim=1)   # (B, K) each
                alpha, beta = torch.exp(alpha_hat), torch.exp(beta_hat)
                kappa = kappa + torch.exp(kappa_hat)
                phi = (alpha[:, :, None] * torch.exp(-beta[:, :, None] * (kappa[:, :, None] - u) ** 2)).sum(dim=1)  # (B, U)
                w = (phi[:, :, None] * onehot).sum(dim=1)                  # (B, A)
                skip = torch.cat([x_t, w], dim=1)
            else:
                h[0], c[0] = self.cells[0](x_t, (h[0], c[0]))
                skip = x_t
            for n in range(1, len(self.cells)):
                h[n], c[n] = self.cells[n](torch.cat([skip, h[n - 1]], dim=1), (h[n], c[n]))
            outputs.append(torch.cat(h, dim=1))                            # (B, L * H)
        return self.mdn(torch.stack(outputs, dim=1))                       # (B, T, 1 + 6M)


def reference_nll(y, target, mask):
    """Eq. 23-26 written directly: -log(sum_j pi_j N(x | mu_j, sigma_j, rho_j)) - log P(eos), summed over
    each line's points. Same clamps as model.mixture_params. y (B, T, 1 + 6M), target (B, T, 3), mask (B, T).
    Returns (B,) in y's dtype (float32 at least)."""
    y = y if y.dtype == torch.float64 else y.float()
    target = target.to(y.dtype)
    M = (y.shape[-1] - 1) // 6
    e_hat, pi_hat, mu1, mu2, s1_hat, s2_hat, rho_hat = y.split([1] + [M] * 6, dim=-1)
    pi = torch.softmax(pi_hat, dim=-1)                                     # eq. 19
    s1 = torch.exp(s1_hat.clamp(min=LOG_SIGMA_MIN))                        # eq. 21
    s2 = torch.exp(s2_hat.clamp(min=LOG_SIGMA_MIN))
    rho = torch.tanh(rho_hat).clamp(-RHO_MAX, RHO_MAX)                     # eq. 22
    e = torch.sigmoid(e_hat.squeeze(-1))                                   # eq. 18, with e_hat's sign flipped
    x1, x2, eos = target[..., :1], target[..., 1:2], target[..., 2]
    z = ((x1 - mu1) / s1) ** 2 + ((x2 - mu2) / s2) ** 2 - 2 * rho * (x1 - mu1) * (x2 - mu2) / (s1 * s2)   # eq. 25
    density = torch.exp(-z / (2 * (1 - rho ** 2))) / (2 * math.pi * s1 * s2 * torch.sqrt(1 - rho ** 2))  # eq. 24
    p_point = (pi * density).sum(dim=-1)
    p_eos = eos * e + (1 - eos) * (1 - e)
    return -((torch.log(p_point) + torch.log(p_eos)) * mask).sum(dim=1)   # eq. 26
