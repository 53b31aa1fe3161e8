"""Exact checks of the model's maths: loss against a naive reference, step-by-step against batched,
chunked against whole, sampling rules."""
import math

import pytest
import torch

import model as model_module
from model import (HandwritingModel, ModelConfig, WeightNoise, chunk_backward, half_products_exact, load_weights,
                   mixture_params, nll, replace_rows, teacher_forcing)
from utils import make_optimizer


def tiny(task, **kw):
    cfg = ModelConfig(task=task, hidden_size=24, mixtures=3, window_gaussians=2,
                      alphabet_size=7 if task == "synthesis" else 0, **kw)
    torch.manual_seed(0)
    return HandwritingModel(cfg).double()


def batch(B=3, T=13, U=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3, generator=g, dtype=torch.double)
    x[..., 2] = (torch.rand(B, T, generator=g) < 0.2).double()
    text = torch.randint(1, 8, (B, U), generator=g)
    text[0, 3:] = 0                                   # a shorter, padded line
    return x, text


def naive_nll(y, target):
    """Eq. 26 written plainly with torch.distributions, one point at a time."""
    M = (y.shape[-1] - 1) // 6
    total = torch.zeros(y.shape[0], dtype=torch.double)
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            v = y[b, t].double()
            e_hat, pi_hat, mu1, mu2, s1, s2, rho_hat = v[0], *v[1:].split(M)
            pi, rho = torch.softmax(pi_hat, 0), torch.tanh(rho_hat)
            p = 0.0
            for j in range(M):
                cov = torch.tensor([[s1[j].exp() ** 2, rho[j] * s1[j].exp() * s2[j].exp()],
                                    [rho[j] * s1[j].exp() * s2[j].exp(), s2[j].exp() ** 2]], dtype=torch.double)
                mvn = torch.distributions.MultivariateNormal(torch.stack([mu1[j], mu2[j]]), covariance_matrix=cov)
                p = p + pi[j] * mvn.log_prob(target[b, t, :2]).exp()
            bern = torch.distributions.Bernoulli(logits=e_hat)
            total[b] -= torch.log(p) + bern.log_prob(target[b, t, 2])
    return total


def test_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    B, T, M = 2, 5, 4
    y = torch.randn(B, T, 1 + 6 * M, generator=g, dtype=torch.double) * 0.5
    target = torch.randn(B, T, 3, generator=g, dtype=torch.double)
    target[..., 2] = (torch.rand(B, T, generator=g) < 0.3).double()
    mask = torch.ones(B, T)
    ours = nll(y, target, mask).double()
    ref = naive_nll(y, target)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-4), (ours, ref)


def test_nll_ignores_padding_and_stays_finite():
    y = torch.zeros(1, 4, 1 + 6 * 2)
    y[..., 1 + 2 * 3: 1 + 2 * 5] = -100.0             # tiny sigmas: clamped, still finite
    target = torch.randn(1, 4, 3)
    target[..., 2] = 1
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    full = nll(y, target, mask)
    assert torch.isfinite(full).all()
    target2 = target.clone()
    target2[0, 2:] = 1e6                              # garbage in the padded part changes nothing
    assert torch.equal(nll(y, target2, mask), full)


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_stepwise_equals_batched(task):
    model = tiny(task)
    x, text = batch()
    y, state = model(x, text)
    s, ys = None, []
    for t in range(x.shape[1]):
        yt, s = model(x[:, t:t + 1], text, s)
        ys.append(yt)
    assert torch.allclose(torch.cat(ys, 1), y, atol=1e-10)
    for a, b in zip(s.h + s.c, state.h + state.c):
        assert torch.allclose(a, b, atol=1e-10)
    if task == "synthesis":
        assert torch.allclose(s.kappa, state.kappa, atol=1e-10)
        assert torch.allclose(s.window, state.window, atol=1e-10)


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_sampling_step_equals_batched_forward(task):
    """sample()'s step (merged, transposed weights) computes what forward() computes over the whole sequence."""
    model = tiny(task)
    x, text = batch()
    y, state, phi = model(x, text, return_phi=True) if task == "synthesis" else (*model(x, text), None)
    weights = model._step_weights()
    synthesis = task == "synthesis"
    onehot = model.one_hot(text).double() if synthesis else None
    u = torch.arange(text.shape[1] + 1, dtype=torch.double) if synthesis else None
    s, ys, phis = model.initial_state(x.shape[0]), [], []
    for t in range(x.shape[1]):
        yt, s, pt = model._step(x[:, t], s, weights, onehot, u)
        ys.append(yt)
        phis.append(pt)
    assert torch.allclose(torch.stack(ys, 1), y, atol=1e-10)
    for a, b in zip(s.h + s.c, state.h + state.c):
        assert torch.allclose(a, b, atol=1e-10)
    if synthesis:
        assert torch.allclose(torch.stack(phis, 1), phi, atol=1e-10)
        assert torch.allclose(s.kappa, state.kappa, atol=1e-10) and torch.allclose(s.window, state.window, atol=1e-10)


def float16_valued(task):
    """A float32 tiny model whose weights are float16 numbers, as the shipped checkpoints' are once loaded."""
    model = tiny(task).float()
    return load_weights(model, {k: v.half() for k, v in model.state_dict().items()}, "test")


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_float16_step_products_compute_the_float32_step(task):
    """StepProduct(half=True) (fbgemm's float16 kernel) gives a sampling step what addmm gives it, to float32's
    rounding, for float16-valued weights; sample() takes it by itself only for those (CPU, float32, no autocast)."""
    model = float16_valued(task)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    if not half_products_exact(matrices):
        pytest.skip("no float16 product kernel in this torch build (fbgemm: x86 only)")
    assert all(p.half for p in model._step_weights()[0])                       # chosen by itself
    assert not any(p.half for p in tiny(task).float()._step_weights()[0])      # float32 weights: not float16 numbers
    assert not half_products_exact([m.double() for m in matrices])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not half_products_exact(matrices)
    x, text = batch()
    x, synthesis = x.float(), task == "synthesis"
    onehot = model.one_hot(text).float() if synthesis else None
    u = torch.arange(text.shape[1] + 1, dtype=torch.float) if synthesis else None
    states = [model.initial_state(x.shape[0])] * 2
    for t in range(x.shape[1]):
        (y16, s16, p16), (y32, s32, p32) = [model._step(x[:, t], s, model._step_weights(half=h), onehot, u)
                                            for s, h in zip(states, (True, False))]
        assert torch.allclose(y16, y32, rtol=1e-5, atol=1e-5)
        if synthesis:
            assert torch.allclose(p16, p32, rtol=1e-5, atol=1e-6)
        states = [s16, s32]
    for a, b in zip(states[0].tensors(), states[1].tensors()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_step_weights_are_kept_until_a_weight_changes():
    """sample() packs the step weights once and keeps them on the model; any change to a weight (in place, through
    .data, load_weights, a fused Adam step, which bumps no version counter) or a move to another dtype packs them
    again, so no line is drawn with old ones."""
    model = tiny("synthesis").float()
    text = torch.tensor([[1, 2, 3, 4]])
    line = lambda m: m.sample(text, generator=torch.Generator().manual_seed(0), max_steps_per_char=5)["strokes"]
    fresh = lambda m: line(load_weights(tiny("synthesis").float(), m.state_dict(), "test"))   # a model built anew
    before = line(model)
    kept = model._step_cache[2]
    with torch.inference_mode():                          # as sample() runs on a CPU
        assert line(model).equal(before) and model._step_weights() is kept
    with torch.no_grad():
        model.rnns[-1].weight_hh_l0.mul_(1.5)              # in place
    after = line(model)
    assert model._step_cache[2] is not kept and not after.equal(before) and fresh(model).equal(after)
    model.mdn.weight.data[0, 0] += 1.0                     # through .data: no version counter moves
    assert line(model).equal(fresh(model))
    optimizer = make_optimizer("adam", model.parameters(), 1e-2)
    x, text_b = batch(T=9)
    inputs, targets, mask = teacher_forcing(x.float(), torch.ones(x.shape[:2], dtype=torch.bool))
    for _ in range(3):
        optimizer.zero_grad()
        chunk_backward(model, inputs, targets, mask, text_b, None)
        optimizer.step()
    assert line(model).equal(fresh(model))
    load_weights(model, tiny("synthesis").float().state_dict(), "test")
    assert line(model).equal(before)
    assert model.double()._step_weights()[-1].weight_t.dtype == torch.float64


def test_a_model_built_under_inference_mode_samples_its_current_weights():
    """Parameters made under torch.inference_mode have no version counter: such a model samples (its step weights
    packed on every call), and an edit made there is drawn."""
    text = torch.tensor([[1, 2, 3, 4]])
    line = lambda m: m.sample(text, generator=torch.Generator().manual_seed(0), max_steps_per_char=5)["strokes"]
    with torch.inference_mode():
        model = tiny("synthesis").float()
        before = line(model)
        model.rnns[-1].weight_hh_l0.mul_(1.5)
        after = line(model)
    assert not after.equal(before)
    plain = tiny("synthesis").float()
    load_weights(plain, model.state_dict(), "test")
    assert line(plain).equal(after)


def test_sample_with_float16_products_writes_the_float32_lines(monkeypatch):
    """A whole sampled line through the float16 product against the same seed through addmm: the same points."""
    model = float16_valued("synthesis")
    text = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2]])
    if not half_products_exact([p for p in model.parameters() if p.dim() == 2]):
        pytest.skip("no float16 product kernel in this torch build (fbgemm: x86 only)")
    kw = dict(generator=None, max_steps_per_char=6, bias=1.0, record=True)
    r16 = model.sample(text, **{**kw, "generator": torch.Generator().manual_seed(0)})
    monkeypatch.setattr(model_module, "half_products_exact", lambda weights: False)
    model._step_cache = None                            # packed by the first sample() (kept until a weight changes)
    r32 = model.sample(text, **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert r16["lengths"].tolist() == r32["lengths"].tolist() and r16["lengths"].item() > 20
    assert torch.allclose(r16["strokes"], r32["strokes"], atol=1e-4)
    assert torch.allclose(r16["mixture"], r32["mixture"], atol=1e-4)


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_chunked_equals_whole_including_gradients(task):
    model = tiny(task)
    x, text = batch(T=17)
    target = torch.randn_like(x)
    mask = torch.ones(x.shape[:2])
    y, _ = model(x, text)
    loss = nll(y, target, mask).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    s, ys = None, []
    for a, b in [(0, 5), (5, 6), (6, 17)]:
        yc, s = model(x[:, a:b], text, s)            # state carried, not detached: exact gradients
        ys.append(yc)
    y2 = torch.cat(ys, 1)
    loss2 = nll(y2, target, mask).sum()
    grads2 = torch.autograd.grad(loss2, list(model.parameters()))
    assert torch.allclose(y, y2, atol=1e-10)
    for g1, g2 in zip(grads, grads2):
        assert torch.allclose(g1, g2, atol=1e-8)


def test_compiled_window_step_equals_eager():
    """train.py --compile: the torch.compile'd step gives the same outputs and gradients (skipped without a C++
    compiler, which inductor needs on a CPU; with one, any failure of the compiled path fails the test)."""
    import shutil
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler here: torch.compile's CPU backend needs one")
    eager, x, text = tiny("synthesis").float(), *batch(T=6)
    compiled = tiny("synthesis").float()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_window_step()
    results = []
    for model in (eager, compiled):
        try:
            y, _ = model(x.float(), text)
        except Exception as e:                          # a compiler that cannot build inductor's C++ (no Python.h, ...)
            if not any(s in f"{type(e).__name__} {e}" for s in ("CppCompileError", "InvalidCxxCompiler")):
                raise
            pytest.skip(f"torch.compile's C++ build fails here: {type(e).__name__}")
        results.append((y, torch.autograd.grad(y.square().sum(), list(model.parameters()))))
    (y1, g1), (y2, g2) = results
    assert torch.allclose(y1, y2, atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_dropout_acts_between_layers_in_training_only(task):
    model, plain = tiny(task, dropout=0.5), tiny(task)                 # the same weights
    x, text = batch()
    text = text if task == "synthesis" else None
    y_eval, _ = model.eval()(x, text)
    y_plain, s_plain = plain.train()(x, text)
    assert torch.equal(y_eval, y_plain)              # off at evaluation and sampling; dropout 0 changes nothing
    model.train()
    torch.manual_seed(1)
    y1, s1 = model(x, text)
    torch.manual_seed(2)
    y2, _ = model(x, text)
    assert not torch.allclose(y1, y2) and not torch.allclose(s1.h[-1], s_plain.h[-1])   # random, and reaches layer 2+
    if task == "synthesis":                          # layer 1 and the window (the recurrence) never see it
        for a, b in [(s1.h[0], s_plain.h[0]), (s1.c[0], s_plain.c[0]), (s1.kappa, s_plain.kappa), (s1.window, s_plain.window)]:
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(task="prediction", dropout=1.0)


def test_window_moves_forward_and_masks_padding():
    model = tiny("synthesis")
    x, text = batch(T=30)
    _, state, phi = model(x, text, return_phi=True)
    assert phi.shape == (3, 30, text.shape[1] + 1)
    # kappa only increases: rerun step by step and compare
    s, prev = None, torch.zeros(3, 2, dtype=torch.double)
    for t in range(30):
        _, s = model(x[:, t:t + 1], text, s)
        assert (s.kappa > prev).all()
        prev = s.kappa
    # padding changes nothing: line 0 (3 real characters, padded to 5) gives what it gives alone, unpadded
    y, state = model(x, text)
    y0, state0 = model(x[:1], text[:1, :3])
    assert torch.allclose(y[:1], y0, atol=1e-12) and torch.allclose(state.window[:1], state0.window, atol=1e-12)
    assert torch.allclose(state.kappa[:1], state0.kappa, atol=1e-12)


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_evaluate_nll_sums_match_each_line_scored_alone(task):
    """evaluate_nll on a padded batch (lines of 9-17 points, texts of 2-5 characters) against every line run alone,
    unpadded, and scored plainly: NLL (eq. 26, naive), the squared error of the expected offset, the window focus;
    and score_lines' window_end per line: the centre of phi at the line's last point less its last character's place."""
    from dataset import collate
    from model import evaluate_nll, score_lines, summarize_nll
    model = tiny(task)
    g = torch.Generator().manual_seed(3)
    lines = []
    for T, U in [(9, 2), (17, 5), (12, 4)]:
        x = torch.randn(T, 3, generator=g, dtype=torch.double)
        x[:, 2] = (torch.rand(T, generator=g) < 0.2).double()
        lines.append((x, torch.randint(1, 8, (U,), generator=g)))
    total = evaluate_nll(model, [collate(lines)], torch.device("cpu"))
    ends = score_lines(model, collate(lines), torch.device("cpu")).get("window_end")
    model.train()                                   # a device by name; the training mode is left as it was
    again = score_lines(model, collate(lines), "cpu")
    assert model.training and torch.equal(again["nll"], score_lines(model, collate(lines), torch.device("cpu"))["nll"])
    model.eval()
    want = torch.zeros(5, dtype=torch.double)
    for k, (x, text) in enumerate(lines):
        inputs, targets, _ = teacher_forcing(x[None], torch.ones(1, len(x), dtype=torch.bool))
        y, _, phi = model(inputs, text[None] if task == "synthesis" else None, return_phi=True)
        want[0] += naive_nll(y, targets)[0]
        M = (y.shape[-1] - 1) // 6
        pi, mu1, mu2 = torch.softmax(y[0, :, 1:1 + M], -1), y[0, :, 1 + M:1 + 2 * M], y[0, :, 1 + 2 * M:1 + 3 * M]
        want[1] += (((pi * mu1).sum(-1) - targets[0, :, 0]) ** 2 + ((pi * mu2).sum(-1) - targets[0, :, 1]) ** 2).sum()
        want[2] += 1
        want[3] += targets.shape[1]   # the points predicted
        if task == "synthesis":   # phi over the line's own characters only: (T, U)
            on_text = phi[0, :, :len(text)]
            want[4] += (on_text.max(-1).values / on_text.sum(-1)).sum()
            last = phi[0, -1]                                         # (U + 1,): its characters and its end
            centre = sum(u * last[u] for u in range(len(last))) / last.sum()
            assert ends[k].item() == pytest.approx(centre.item() - (len(text) - 1), abs=1e-9)
    torch.testing.assert_close(total, want)
    metrics = summarize_nll(total)
    assert metrics["nll_per_line"] == pytest.approx(float(want[0]) / 3)
    assert ("window_focus" in metrics) == (task == "synthesis")
    if task == "synthesis":
        assert 1 / 5 < metrics["window_focus"] <= 1


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_weight_noise_gradients_are_autograds_of_the_variational_loss(task):
    """WeightNoise: perturb, backward, restore gives the gradients autograd takes of the loss written out in full:
    mean NLL per point at w = mu + sigma * eps plus KL(Q || P) / N, the KL of the two Gaussians with the prior's mu0
    and sigma0 computed from mu and sigma (autograd differentiates through them; restore() leaves them out)."""
    model = tiny(task)
    x, text = batch(T=11)
    text = text if task == "synthesis" else None
    target, mask, N = torch.randn_like(x), torch.ones(x.shape[:2]), 50
    noise = WeightNoise(model.parameters(), 0.05, data_points=N, seed=3)
    with torch.no_grad():                            # sigmas of different sizes, as after some training
        for log_sigma in noise.log_sigma:
            log_sigma.add_(0.5 * torch.randn_like(log_sigma))
    noise.sample(step=7)
    mu = [p.detach().clone() for p in model.parameters()]
    noise.perturb()
    assert all(not torch.equal(p, m) for p, m in zip(model.parameters(), mu))
    model.zero_grad()
    (nll(model(x, text)[0], target, mask).sum() / mask.sum()).backward()
    noise.restore()
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mu))    # the mean weights are back
    # the reference: the variational loss as a function of mu and log_sigma
    mu_ref = [m.clone().requires_grad_() for m in mu]
    log_sigma_ref = [ls.detach().clone().requires_grad_() for ls in noise.log_sigma]
    names = [name for name, _ in model.named_parameters()]
    w = {n: m + ls.exp() * e for n, m, ls, e in zip(names, mu_ref, log_sigma_ref, noise.eps)}
    y, _ = torch.func.functional_call(model, w, (x, text))
    m, s = torch.cat([v.flatten() for v in mu_ref]), torch.cat([v.exp().flatten() for v in log_sigma_ref])
    mu0, var0 = m.mean(), (s ** 2 + (m - m.mean()) ** 2).mean()
    kl = (0.5 * var0.log() - s.log() + (s ** 2 + (m - mu0) ** 2) / (2 * var0) - 0.5).sum()
    (nll(y, target, mask).sum() / mask.sum() + kl / N).backward()
    for p, ref in zip(model.parameters(), mu_ref):
        assert torch.allclose(p.grad, ref.grad, rtol=1e-7, atol=1e-12)
    for log_sigma, ref in zip(noise.log_sigma, log_sigma_ref):
        assert torch.allclose(log_sigma.grad, ref.grad, rtol=1e-7, atol=1e-12)
    assert float(noise.kl) == pytest.approx(float(kl.detach()) / N, rel=1e-9)
    # the same step again draws the same noise (resume, processes); another step draws other noise
    eps = [e.clone() for e in noise.eps]
    noise.sample(step=7)
    assert all(torch.equal(a, b) for a, b in zip(eps, noise.eps))
    noise.sample(step=8)
    assert not torch.equal(eps[0], noise.eps[0])


def test_biased_sampling_formulas():
    M = 3
    y = torch.randn(2, 1, 1 + 6 * M)
    b = 1.5
    mix = mixture_params(y, bias=b)
    pi_hat, s1 = y[..., 1:1 + M], y[..., 1 + 3 * M:1 + 4 * M]
    assert torch.allclose(mix.log_pi.exp(), torch.softmax(pi_hat * (1 + b), -1), atol=1e-6)
    assert torch.allclose(mix.log_sigma1.exp(), torch.exp(s1 - b), atol=1e-6)


@pytest.mark.parametrize("b", [0.0, 1.0])
def test_sample_point_draws_from_the_mixture(b):
    """_sample_point against the mixture it samples (eq. 18-22, biased by eq. 61-62): three components 5+ sigma apart,
    so each draw's component is known; its frequency, mean, standard deviations and correlation, and the pen lifts."""
    M, n = 3, 60_000
    pi_hat, mu1, mu2 = torch.tensor([0.2, 1.0, -0.3]), torch.tensor([-20.0, 0.0, 20.0]), torch.tensor([5.0, -5.0, 0.0])
    s_hat, rho_hat = torch.tensor([0.0, 0.3, -0.2]) + b, torch.tensor([0.0, 1.0, -0.6])   # sigma = exp(s_hat - b)
    y = torch.cat([torch.tensor([0.4]), pi_hat, mu1, mu2, s_hat, s_hat - 0.2, rho_hat]).double().expand(n, 1 + 6 * M)
    x = HandwritingModel._sample_point(y, b, torch.Generator().manual_seed(0))
    j = torch.bucketize(x[:, 0].contiguous(), torch.tensor([-10.0, 10.0], dtype=torch.double))   # each draw's component
    pi = torch.softmax(pi_hat * (1 + b), 0)
    assert torch.allclose(torch.bincount(j, minlength=M).double() / n, pi.double(), atol=0.01)
    for k in range(M):
        d = x[j == k, :2]
        sd1, sd2 = math.exp(s_hat[k] - b), math.exp(s_hat[k] - 0.2 - b)
        assert torch.allclose(d.mean(0), torch.tensor([mu1[k], mu2[k]], dtype=torch.double), atol=0.05 * sd1 + 0.02)
        assert torch.allclose(d.std(0), torch.tensor([sd1, sd2], dtype=torch.double), rtol=0.05)
        assert abs(torch.corrcoef(d.T)[0, 1] - math.tanh(rho_hat[k])) < 0.04
    assert abs(x[:, 2].mean() - torch.sigmoid(torch.tensor(0.4))) < 0.01   # eos: P(lift) = sigmoid(e_hat)


def test_teacher_forcing_start_token():
    strokes = torch.randn(2, 6, 3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    inputs, targets, tmask = teacher_forcing(strokes, mask)
    assert inputs.shape == (2, 5, 3) and torch.all(inputs[:, 0] == 0)
    assert torch.equal(inputs[:, 1:], strokes[:, 1:-1]) and torch.equal(targets, strokes[:, 1:])


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_sampling_is_seeded_and_batched(task):
    model = tiny(task).float()
    text = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    kw = dict(text=text) if task == "synthesis" else dict(steps=25, batch_size=2)
    r1 = model.sample(**kw, generator=torch.Generator().manual_seed(3), max_steps_per_char=10, record=True)
    r2 = model.sample(**kw, generator=torch.Generator().manual_seed(3), max_steps_per_char=10)
    assert torch.equal(r1["strokes"], r2["strokes"])
    B, T, _ = r1["strokes"].shape
    assert B == 2 and set(r1["strokes"][..., 2].unique().tolist()) <= {0.0, 1.0}
    assert r1["eos_prob"].shape == (2, T) and r1["mixture"].shape == (2, T, 1 + 6 * 3)
    for b in range(B):   # each line ends with a pen lift, and nothing is drawn past its length
        n = int(r1["lengths"][b])
        assert r1["strokes"][b, n - 1, 2] == 1 and r1["strokes"][b, n:].abs().sum() == 0
    if task == "synthesis":
        assert r1["phi"].shape == (2, T, 5)


def steady_window(model, chars_per_step):
    """Make kappa move by exactly chars_per_step per step (window_gaussians=2: kappa_hat is outputs 4 and 5), and
    keep the pen down (eos logit -30), so that a line is exactly as long as its stopping step."""
    with torch.no_grad():
        model.window.bias[4:].fill_(math.log(chars_per_step))
        model.window.weight[4:].zero_()
        model.mdn.bias[0] = -30.0
        model.mdn.weight[0].zero_()
    return model


def test_a_line_does_not_end_with_the_pen_travelling_to_a_next_letter(monkeypatch):
    """The last point of a line that starts a stroke (the point before lifted the pen, its own did not) is the pen on
    its way to a letter that never comes: it is left out, not drawn as a dot; a dot the model ends itself stays."""
    model = steady_window(tiny("synthesis").float(), 0.3)
    text = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [3, 2, 1, 0, 0, 0, 0, 0, 0, 0]])
    stop = model.sample(text, generator=torch.Generator().manual_seed(0))["lengths"].tolist()   # pen down: the steps
    assert stop[1] + 5 < stop[0]                                   # far apart: the lines' lifts do not mix
    draw = HandwritingModel._sample_point
    for lifted, want in (({s - 2 for s in stop}, [s - 1 for s in stop]),             # travelling: left out
                         ({t for s in stop for t in (s - 2, s - 1)}, stop)):          # a dot of its own: kept
        step = {"t": 0}

        def point(y, bias=0.0, generator=None):
            x = draw(y, bias, generator)
            x[:, 2] = float(step["t"] in lifted)                  # eos = 1 at these steps, in both lines
            step["t"] += 1
            return x
        monkeypatch.setattr(HandwritingModel, "_sample_point", staticmethod(point))
        r = model.sample(text, generator=torch.Generator().manual_seed(0))
        assert r["lengths"].tolist() == want and r["finished"].all()
        for b, n in enumerate(want):
            assert r["strokes"][b, n - 1, 2] == 1 and r["strokes"][b, n:].abs().sum() == 0


def test_sampling_stops_when_window_passes_the_text():
    """Force kappa to race ahead: every line must stop long before the cap and be marked finished."""
    model = steady_window(tiny("synthesis").float(), 0.6)
    text = torch.tensor([[1, 2, 3, 4, 5, 6]])
    r = model.sample(text, generator=torch.Generator().manual_seed(0), max_steps_per_char=20)
    assert r["finished"].all() and int(r["lengths"][0]) < 10
    model.window.bias.data[4:].fill_(-30.0)             # kappa frozen: each line hits its own cap, reported
    text = torch.tensor([[1, 2, 3, 4, 5, 6], [4, 5, 0, 0, 0, 0]])
    r = model.sample(text, generator=torch.Generator().manual_seed(0), max_steps_per_char=3)
    assert not r["finished"].any() and r["lengths"].tolist() == [3 * 6 + 1, 3 * 2 + 1]
    assert r["strokes"][1, 3 * 2 + 1:].abs().sum() == 0


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_sampling_never_records_gradients(device):
    """On every device: sampling results that required grad crashed train.py's sample image on the GPU
    (torch.inference_mode(False) turns gradients on, even inside no_grad). Only the device's kind is used here."""
    from model import sampling_mode
    with sampling_mode(torch.device(device)):
        assert not torch.is_grad_enabled()
        assert not (torch.zeros(2, requires_grad=True) * 2).requires_grad
    assert torch.is_grad_enabled()


def test_sampling_in_training_mode_is_sampling_in_evaluation_mode():
    """sample() is evaluation even on a model left in training mode: no dropout on the prime's forward pass either,
    and the model's mode is left as it was."""
    model = tiny("synthesis", dropout=0.5).float()
    text, prime = torch.tensor([[1, 2, 3, 4]]), torch.randn(9, 3)
    prime[:, 2] = (prime[:, 2] > 1).float()
    kw = dict(prime=prime, prime_chars=2, max_steps_per_char=5, record=True)
    r_eval = model.eval().sample(text, generator=torch.Generator().manual_seed(0), **kw)
    r_train = model.train().sample(text, generator=torch.Generator().manual_seed(0), **kw)
    assert model.training and torch.equal(r_train["mixture"], r_eval["mixture"])


def test_primed_lines_count_only_the_new_characters():
    """With a prime, the cap and retry_above count the characters after prime_chars (the ones the model writes): a
    primed line that stalls is capped and sampled again as an unprimed line of its new text would be."""
    model = steady_window(tiny("synthesis").float(), 0.3)
    text, prime = torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    prime[:, 2] = 0
    kw = dict(prime=prime, retries=2, retry_above=2.0)      # the window finishes 8 steps after the prime
    r0 = model.sample(text, generator=torch.Generator().manual_seed(0), **kw)
    r3 = model.sample(text, generator=torch.Generator().manual_seed(0), prime_chars=3, **kw)
    assert r0["finished"].all() and r0["lengths"].tolist() == r3["lengths"].tolist() == [8]
    assert r0["attempts"].tolist() == [1] and r3["attempts"].tolist() == [3]   # 8 > 2 x 3 new characters, < 2 x 6
    model.window.bias.data[4:].fill_(-30.0)                 # kappa frozen: the line runs to its cap
    caps = [model.sample(text, prime=prime, generator=torch.Generator().manual_seed(0), max_steps_per_char=3,
                         prime_chars=n)["lengths"].item() for n in (0, 3, 4)]
    assert caps == [3 * 6 + 1, 3 * 3 + 1, 3 * 2 + 1]


def test_window_centre_is_the_centre_of_the_last_steps_phi():
    """window_centre(state) is sum_u u phi(t, u) / sum_u phi(t, u) of the phi that forward() gives at the state's
    last step (a chunk run alone)."""
    model, (x, text) = tiny("synthesis"), batch()
    _, state, phi = model(x, text, return_phi=True)
    u = torch.arange(phi.shape[-1], dtype=phi.dtype)
    want = (phi[:, -1] * u).sum(-1) / phi[:, -1].sum(-1)
    torch.testing.assert_close(model.window_centre(state, phi.shape[-1]), want)


def test_a_prime_that_does_not_write_its_text_is_warned_of():
    """sample(prime=, prime_chars=) gives prime_fit: where the window is after the prime, in characters past the space
    after the priming text, and warns (PrimeMisfitWarning) when it is more than WINDOW_MISFIT off: 10 prime points at
    0.3 characters a step leave it on position 3 (centre 3.0 here)."""
    import warnings
    from model import WINDOW_MISFIT, PrimeMisfitWarning
    model = steady_window(tiny("synthesis").float(), 0.3)
    text, prime = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2]]), torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    prime[:, 2] = 0
    for prime_chars, warned in ((4, None), (2, None), (1, "run 3.0 characters past"), (7, "end 3.0 characters short")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = model.sample(text, prime=prime, prime_chars=prime_chars, generator=torch.Generator().manual_seed(0))
        assert r["prime_fit"].item() == pytest.approx(4 - prime_chars, abs=0.05), prime_chars
        said = [str(w.message) for w in caught if w.category is PrimeMisfitWarning]
        assert len(said) == (abs(4 - prime_chars) > WINDOW_MISFIT) == (warned is not None), prime_chars
        assert warned is None or warned in said[0]
    assert "prime_fit" not in model.sample(text, prime=prime, generator=torch.Generator().manual_seed(0))   # no chars


def test_a_window_past_its_text_from_the_start_is_not_a_finished_line():
    """A prime whose strokes write more than its text leaves the window past the end of a short new text: the line
    stops at once, with fewer points than characters, and must not count as finished (it was drawn as nothing, saved
    as a hand, scored as finished). The fit is measured past the text's end, not cut off there (10 characters past)."""
    import warnings
    model = steady_window(tiny("synthesis").float(), 1.0)
    text, prime = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2]]), torch.randn(12, 3, generator=torch.Generator().manual_seed(1))
    prime[:, 2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = model.sample(text, prime=prime, prime_chars=3, generator=torch.Generator().manual_seed(0))
    assert int(r["lengths"][0]) < 9 - 3 and not r["finished"][0]
    assert r["prime_fit"].item() == pytest.approx(12 - (3 - 1), abs=0.1)              # kappa 12, the space at 2


def test_stopping_step_matches_the_rule_checked_naively():
    """Lines of different lengths in one batch: each stops at the first step where phi(U) beats every phi(u < U)."""
    model = steady_window(tiny("synthesis").float(), 0.3)
    text = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [3, 2, 1, 0, 0, 0, 0, 0, 0, 0]])
    r = model.sample(text, generator=torch.Generator().manual_seed(0), record=True)
    assert r["finished"].all()
    for b, U in enumerate([10, 3]):
        phi = r["phi"][b]                                # (T, U_max + 1)
        first = next(t for t in range(phi.shape[0]) if phi[t, U] > phi[t, :U].max())
        assert int(r["lengths"][b]) == first
    assert int(r["lengths"][1]) < int(r["lengths"][0])
    # a cap of 2 steps per character: the 3-character line would finish at step 8, past its own cap of 7, while
    # the batch runs on for the long line; it is cut at its cap and unfinished
    assert int(r["lengths"][1]) > 2 * 3 + 1
    r = model.sample(text, generator=torch.Generator().manual_seed(0), max_steps_per_char=2)
    assert r["finished"].tolist() == [False, False] and r["lengths"].tolist() == [21, 7]


def test_lines_that_hit_the_cap_are_sampled_again():
    """retries: only the lines that hit the cap are sampled again (the others are exactly as without retries)."""
    model = steady_window(tiny("synthesis").float(), 0.3)
    text = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    kw = dict(max_steps_per_char=2, record=True)         # caps 21 and 3 steps: only the 1-character line finishes
    r0 = model.sample(text, generator=torch.Generator().manual_seed(0), **kw)
    r2 = model.sample(text, generator=torch.Generator().manual_seed(0), retries=2, **kw)
    assert r0["finished"].tolist() == r2["finished"].tolist() == [False, True]
    assert r0["attempts"].tolist() == [1, 1] and r2["attempts"].tolist() == [3, 1]
    for key in r0:
        assert r2[key].shape == r0[key].shape and torch.equal(r2[key][1], r0[key][1]), key
    assert not torch.equal(r2["strokes"][0], r0["strokes"][0])          # line 0 was drawn again


def test_slow_lines_are_sampled_again_and_the_best_attempt_is_kept():
    """retry_above: lines that are unfinished or slower than retry_above points per character are sampled again; each
    keeps its first quick attempt, else its best (finished first, then fewest points, the later on a tie). Checked
    against the attempts replayed one by one with the same generator."""
    model = tiny("synthesis").float()
    with torch.no_grad():                               # a window whose speed varies from line to line and attempt to attempt
        model.window.bias[4:].fill_(math.log(0.15))
        model.window.weight[4:].mul_(6.0)
    text = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [3, 2, 1, 0, 0, 0, 0, 0, 0, 0], [4, 5, 6, 7, 1, 0, 0, 0, 0, 0],
                         [2, 2, 2, 2, 2, 2, 2, 0, 0, 0], [5, 1, 0, 0, 0, 0, 0, 0, 0, 0], [6, 6, 1, 2, 0, 0, 0, 0, 0, 0]])
    U, kw = (text > 0).sum(dim=1), dict(max_steps_per_char=5, retry_above=4.0)
    # replay: attempt k samples the lines still not quick after attempt k - 1, the generator going on
    g, rows, attempts = torch.Generator().manual_seed(4), torch.arange(len(text)), [[] for _ in text]
    for _ in range(3):
        r = model.sample(text[rows], generator=g, max_steps_per_char=5)
        for j, b in enumerate(rows.tolist()):
            attempts[b].append((bool(r["finished"][j]), int(r["lengths"][j]), r["strokes"][j]))
        quick = r["finished"] & (r["lengths"] <= 4.0 * U[rows])
        rows = rows[~quick]
        if not len(rows):
            break
    got = model.sample(text, generator=torch.Generator().manual_seed(4), retries=2, **kw)
    kept_earlier = 0
    for b, tries in enumerate(attempts):
        quick = [k for k, (fin, n, _) in enumerate(tries) if fin and n <= 4.0 * U[b]]
        k = quick[0] if quick else max(range(len(tries)), key=lambda k: (tries[k][0], -tries[k][1], k))
        fin, n, strokes = tries[k]
        kept_earlier += k < len(tries) - 1
        assert int(got["attempts"][b]) == len(tries) and bool(got["finished"][b]) == fin and int(got["lengths"][b]) == n
        assert torch.equal(got["strokes"][b, :n], strokes[:n])
    # the case is not trivial: lines were retried, and at least one kept an attempt before its last
    assert max(len(t) for t in attempts) == 3 and kept_earlier >= 1
    # without retry_above only unfinished lines are retried
    plain = model.sample(text, generator=torch.Generator().manual_seed(4), retries=2, max_steps_per_char=5)
    first = model.sample(text, generator=torch.Generator().manual_seed(4), max_steps_per_char=5)
    assert torch.equal(plain["attempts"] > 1, ~first["finished"])


def test_replace_rows_pads_the_time_axis():
    a = {"strokes": torch.zeros(3, 4, 3), "lengths": torch.tensor([4, 4, 4])}
    b = {"strokes": torch.ones(1, 6, 3), "lengths": torch.tensor([6])}
    m = replace_rows(a, b, torch.tensor([1]))
    assert m["strokes"].shape == (3, 6, 3) and m["lengths"].tolist() == [4, 6, 4]
    assert m["strokes"][1].eq(1).all() and m["strokes"][[0, 2]].eq(0).all() and a["strokes"].eq(0).all()


def test_paper_size_parameter_count():
    # Graves: about 3.4M weights (prediction) and 3.7M (synthesis) at 3 x 400, M = 20
    assert 3.3e6 < HandwritingModel(ModelConfig(task="prediction")).num_params() < 3.6e6
    assert 3.6e6 < HandwritingModel(ModelConfig(task="synthesis", alphabet_size=80)).num_params() < 3.9e6


def check_graphed_chunk(task, device, dtype, close, replays=1):
    """Chunks of 4, 4 and 2 points of 3 lines (one shorter) through GraphedChunk (padded to 4 lines, 7 characters)
    and through the plain chunked forward and backward; close(a, b) compares losses and gradients."""
    from model import GraphedChunk
    plain, graphed_model = (tiny(task).to(device, dtype) for _ in range(2))       # the same weights
    x, text = batch(B=3, T=11, U=5)
    x, text = x.to(device, dtype), text.to(device) if task == "synthesis" else None
    inputs, targets, mask = teacher_forcing(x, torch.ones(3, 11, device=device, dtype=dtype))
    mask[1, 6:] = 0                                                                 # a shorter line
    graphed = GraphedChunk(graphed_model, batch_size=4, chunk=4, text_len=7)
    for _ in range(replays):                                                        # each batch starts over
        graphed.reset(text)
        state = None
        for start in range(0, inputs.shape[1], 4):
            sl = slice(start, start + 4)
            y, state = plain(inputs[:, sl], text, state)
            loss_sum = nll(y, targets[:, sl], mask[:, sl]).sum()
            grads = torch.autograd.grad(loss_sum / mask[:, sl].sum(), list(plain.parameters()))
            state = state.detach()
            g_loss, g_points = graphed.step(inputs[:, sl], targets[:, sl], mask[:, sl])
            assert g_points.item() == mask[:, sl].sum().item()
            close(g_loss, loss_sum)
            for a, p in zip(grads, graphed_model.parameters()):
                close(p.grad, a)
    return graphed


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_graphed_chunk_equals_plain_truncated_bptt(task):
    """train.py --cuda-graph: the static-buffer path (padded to B lines, L points, U characters) gives each chunk's
    loss and gradients exactly as the plain chunked forward and backward; on a CPU it runs without a graph."""
    def close(a, b):
        assert torch.allclose(a, b, atol=1e-10)
    graphed = check_graphed_chunk(task, "cpu", torch.double, close, replays=2)
    assert graphed.graph is None
    with pytest.raises(ValueError, match="does not fit"):
        graphed.step(torch.zeros(5, 4, 3), torch.zeros(5, 4, 3), torch.zeros(5, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has none)")
@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_cuda_graph_replay_matches_eager_on_gpu(task):
    """The recorded graph, replayed, gives the eager chunk's loss and gradients (float32; kernels may differ with
    the padded batch, hence the tolerance). The same check at paper size ran on an H100 on 2026-11-22: losses
    equal to the printed digits, gradients within 2e-5 relative (README, Speed)."""
    def close(a, b):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6
    assert check_graphed_chunk(task, "cuda", torch.float32, close, replays=2).graph is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has none)")
@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_cuda_graph_sampling_draws_what_eager_sampling_draws(task):
    """sample(cuda_graph=True) replays blocks of steps: the same generator seed gives the same lines, recorded
    mixtures and window as the eager loop (the graph consumes random numbers exactly as the eager steps do)."""
    model = tiny(task).float().cuda()
    text = batch(U=5)[1].cuda() if task == "synthesis" else None
    kw = dict(text=text) if task == "synthesis" else dict(batch_size=3, steps=37)
    runs = [model.sample(**kw, bias=0.5, record=True, cuda_graph=graph, max_steps_per_char=7,
                         generator=torch.Generator(device="cuda").manual_seed(5)) for graph in (False, True)]
    for key, value in runs[0].items():
        assert torch.allclose(value.float(), runs[1][key].float(), atol=1e-5), key


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_sampling_in_inference_mode_draws_what_no_grad_draws(task):
    """sample() runs in inference mode on a CPU (faster per step): the same lines, bit for bit, as under no_grad."""
    model = tiny(task).float()
    kw = (dict(text=torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), retries=1) if task == "synthesis"
          else dict(steps=30, batch_size=2))
    fast = model.sample(**kw, generator=torch.Generator().manual_seed(5), max_steps_per_char=10, record=True)
    with torch.no_grad():                                   # (step weights built anew out of inference mode)
        plain = model._sample(kw.get("text"), kw.get("steps"), 0.0, None, torch.Generator().manual_seed(5),
                              kw.get("batch_size"), 10, True, kw.get("retries", 0), None, True, 0)
    assert fast.keys() == plain.keys() and all(torch.equal(fast[k], plain[k]) for k in fast)
    assert not any(v.is_inference() for v in fast.values())        # callers may edit them in place
    fast["strokes"][:, 0] = 0
