"""The fast model (model.py) against the textbook one (reference.py): same outputs, loss and gradients of
every parameter, in double precision on CPU. This is the equivalence proof behind bench.py's speed-up."""
import pytest
import torch

from model import HandwritingModel, ModelConfig, half_products_exact, nll, teacher_forcing
from reference import ReferenceModel, reference_nll


def pair(task, hidden=20):
    cfg = ModelConfig(task=task, hidden_size=hidden, mixtures=3, window_gaussians=2,
                      alphabet_size=7 if task == "synthesis" else 0)
    torch.manual_seed(0)
    model = HandwritingModel(cfg).double()
    with torch.no_grad():   # random biases everywhere, so that no weight's path is left untested
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, ReferenceModel.from_model(model)


def data(B=3, T=19, U=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    strokes = torch.randn(B, T + 1, 3, generator=g, dtype=torch.double)
    strokes[..., 2] = (torch.rand(B, T + 1, generator=g) < 0.2).double()
    mask = torch.ones(B, T + 1)
    mask[1, T - 4:] = 0                                   # a shorter line
    text = torch.randint(1, 8, (B, U), generator=g)
    text[0, 3:] = 0                                       # a shorter, padded text
    return (*teacher_forcing(strokes, mask), text)


def grads_by_name(module, loss):
    names, params = zip(*module.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_weights_map_both_ways(task):
    model, ref = pair(task)
    mapped = ref.model_layout()
    assert mapped.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(mapped[name], p), name


@pytest.mark.parametrize("task", ["prediction", "synthesis"])
def test_forward_loss_and_gradients_match_reference(task):
    model, ref = pair(task)
    inputs, targets, mask, text = data()
    text = text if task == "synthesis" else None
    y, _ = model(inputs, text)
    y_ref = ref(inputs, text)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)

    # the loss: ours is computed in float32 (by design), the reference in double
    loss, loss_ref = nll(y, targets, mask), reference_nll(y_ref, targets, mask)
    assert torch.allclose(loss.double(), loss_ref, rtol=1e-6, atol=1e-4), (loss, loss_ref)

    # gradients of the same double-precision loss through both networks: equal to rounding
    grads = grads_by_name(model, reference_nll(y, targets, mask).sum())
    raw_ref = grads_by_name(ref, reference_nll(y_ref, targets, mask).sum())
    if task == "synthesis":   # the reference's layer 1 has two biases where ours has one: same gradient
        assert torch.equal(raw_ref["cells.0.bias_ih"], raw_ref["cells.0.bias_hh"])
    grads_ref = ref.model_layout(raw_ref)
    for name, g in grads.items():
        assert g.abs().max() > 0, f"{name} gets no gradient"
        assert torch.allclose(g, grads_ref[name], rtol=1e-9, atol=1e-10), name

    # and the training loss as train.py computes it (our float32 nll) against the reference's double one
    grads = grads_by_name(model, nll(model(inputs, text)[0], targets, mask).sum())
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], rtol=1e-4, atol=1e-5 * grads_ref[name].abs().max()), name


def test_reference_loss_matches_ours_in_float32_at_paper_size():
    """The plain formula the benchmark's reference trains with stays finite and equal to ours at float32."""
    cfg = ModelConfig(task="synthesis", hidden_size=64, alphabet_size=20)
    torch.manual_seed(0)
    model = HandwritingModel(cfg)
    ref = ReferenceModel.from_model(model)
    inputs, targets, mask, text = data(B=2, T=40, U=6)
    inputs, targets = inputs.float(), targets.float()
    with torch.no_grad():
        y, _ = model(inputs, text)
        y_ref = ref(inputs, text)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(nll(y, targets, mask), reference_nll(y_ref, targets, mask), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("task", ["synthesis", "prediction"])
def test_bench_smoke(capsys, task):
    """bench.py end to end on tiny sizes: one JSON object with the headline figures."""
    import json
    import bench
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--task", task])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["train_points_per_s"] > 0 and result["reference_points_per_s"] > 0 and result["speedup"] > 0
    assert result["sample_one_line_s"] > 0 and result["sample"]["batch"]["lines"] == 4
    # the sampled weights are float16 numbers (--sample-weights float16): the float16 product wherever it runs
    assert result["sample_float16_products"] == half_products_exact([torch.ones(1, 1)])


def test_bench_sample_weights_float32_samples_through_the_float32_product():
    import bench
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--sample-weights", "float32",
                             "--skip-reference", "--sample-batch", "0"])
    finally:
        torch.set_num_threads(threads)
    assert result["sample_float16_products"] is False and result["sample_one_line_s"] > 0


def test_bench_quick_keeps_the_sizes_typed_beside_it():
    import bench
    args = bench.get_args(["--quick", "--device", "cpu", "--sample-chars", "10", "--sample-batch", "0", "--warmup", "2"])
    assert (args.sample_chars, args.sample_batch, args.warmup) == (10, 0, 2)             # typed: kept
    assert (args.batch_size, args.seq_len, args.steps_per_char, args.reps) == (2, 20, 5, 1)   # not typed: tiny


def test_bench_half_precision_on_cpu_is_a_one_line_error(monkeypatch):
    import bench
    import utils
    monkeypatch.setattr(utils, "cpu_lstm_supports", lambda d: False)   # as on a CPU without a bf16 LSTM kernel
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", "--device", "cpu", "--dtype", "bfloat16"])
    assert str(e.value).startswith("error: --dtype bfloat16: this CPU's LSTM kernels (oneDNN) have no")
