"""
Speed benchmark: training throughput of our model against a textbook implementation, and sampling time.

    python bench.py                                   # CPU or GPU (auto), defaults below
    python bench.py --device cuda --dtype bfloat16    # GPU, bf16 autocast
    python bench.py --threads 1                       # a CPU shared with other jobs: avoid thread contention

Prints one JSON object:
- train: points per second for one optimiser step (forward, float32 loss, backward, gradient-norm clip, Adam; as in
  train.py) at paper size (3 x 400 LSTM, M = 20 mixtures, K = 10 window Gaussians, 81 characters), for our model
  (model.py) and for the textbook reference (reference.py: nn.LSTMCell loop, plain window and MDN) in the same
  run, repetitions interleaved so that a change of machine load hits both; the speed-up is ours / reference;
- sample: seconds to sample one 40-character line and a batch of 64 lines, with a fixed number of points per
  character (the window is pinned so the stopping rule never fires: an untrained model's stopping time is noise),
  the weights rounded to float16 numbers as in the shipped checkpoints (--sample-weights);
- the device, torch version, threads, load average and every setting.
The headline figures come first; "train" and "sample" hold the details: wall-clock seconds, and process CPU
seconds (all threads together) as a second view on a shared machine. Warm-up repetitions are excluded; medians
are reported. Data are synthetic (random offsets, pen lifts with probability 0.05, random text), which costs the
same as real data: every line is --seq-len points long, text --text-len characters.
"""
import json
import os
import platform
import statistics
import signal
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # idle OpenMP threads sleep, not spin: on cores other jobs use,
                                                    # spinning made runs 10-40x slower (README, Troubleshooting)
if __name__ == "__main__":   # Ctrl-C while the libraries load (torch: 1-2 s): stop quietly, not with a traceback;
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # main() then reports an interrupt in one line

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)

from model import GraphedChunk, HandwritingModel, ModelConfig, load_weights, nll, sampling_mode
from reference import ReferenceModel, reference_nll
from utils import (DefaultsHelpFormatter, OneLineParser, at_least, autocast_dtype, clipped_step, interrupt_on_signals,
                   make_optimizer, pick_device, restore_signals)

DTYPES = ("float32", "bfloat16")
# defaults that depend on the device: (GPU, CPU); the CPU ones keep the whole run under a minute on 2 cores
DEFAULTS = {"batch_size": (64, 8), "seq_len": (600, 600), "reps": (10, 3), "warmup": (2, 1),
            "sample_reps": (5, 3), "sample_batch_reps": (5, 1)}


def get_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--task", choices=["prediction", "synthesis"], default="synthesis", help="network to time (paper sections 4 and 5)")
    p.add_argument("--batch-size", type=at_least(0), default=0, help="lines per training step (0 = 64 on GPU, 8 on CPU)")
    p.add_argument("--seq-len", type=at_least(0), default=0, help="points per line in a training step (0 = 600; IAM-OnDB's median line has 620)")
    p.add_argument("--text-len", type=at_least(1), default=30, help="characters per line of text in training (IAM-OnDB median: 29)")
    p.add_argument("--reps", type=at_least(0), default=0, help="timed repetitions, median reported (0 = 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=at_least(-1), default=-1, help="untimed repetitions first (-1 = 2 on GPU, 1 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype for the networks (on a CPU, bfloat16 only where its oneDNN LSTM has a kernel, e.g. AVX-512 Zen 4; float16 on none tried; else a one-line error); the loss is always float32")
    p.add_argument("--threads", type=at_least(0), default=0, help="CPU threads for torch (0 = torch's default, one per core); "
                   "on cores busy with other jobs, 1 is usually faster")
    p.add_argument("--sample-chars", type=at_least(1), default=40, help="characters of text per sampled line")
    p.add_argument("--steps-per-char", type=at_least(1), default=25, help="points sampled per character (IAM-OnDB mean: about 21)")
    p.add_argument("--sample-weights", choices=["float16", "float32"], default="float16", help="the sampled model's weights: "
                   "float16 numbers, as the shipped checkpoints and train.py's model.pt store them (on a CPU, sampled "
                   "through the float16 product: model.StepProduct), or float32 ones, as in best.pt and last.pt")
    p.add_argument("--sample-batch", type=at_least(0), default=64, help="lines in the batched sampling test (0 = skip it)")
    p.add_argument("--sample-reps", type=at_least(0), default=0, help="timed repetitions of one-line sampling (0 = 5 on GPU, 3 on CPU)")
    p.add_argument("--sample-batch-reps", type=at_least(0), default=0, help="timed repetitions of batched sampling (0 = 5 on GPU, 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model's window step (train.py --compile); "
                   "compile time is spent in the warm-up")
    p.add_argument("--tbptt", type=at_least(0), default=0, help="our model trains in chunks of this many points, one Adam step "
                   "each, state carried (train.py --tbptt; 0 = whole lines); the reference always takes whole lines")
    p.add_argument("--cuda-graph", action="store_true", help="replay each chunk's forward and backward as a CUDA graph "
                   "(train.py --cuda-graph; needs --tbptt; without CUDA the same code runs eagerly), and each block of "
                   "sampling steps (sample(cuda_graph=True))")
    p.add_argument("--skip-reference", action="store_true", help="do not time the textbook reference")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (flags typed beside it win): a smoke test of this script, not a measurement")
    p.add_argument("--seed", type=at_least(0, below=2 ** 63), default=0, help="random seed for weights and synthetic data")
    args = p.parse_typed(argv)
    typed = vars(args).pop("typed")
    try:
        args.device = str(pick_device(args.device))
    except ValueError as e:
        sys.exit(f"error: {e}")
    gpu = torch.device(args.device).type == "cuda"
    if args.quick:   # tiny sizes, for the flags not typed
        tiny = dict(batch_size=2, seq_len=20, text_len=5, reps=1, warmup=0, sample_reps=1, sample_batch_reps=1,
                    sample_chars=4, steps_per_char=5, sample_batch=4)
        for name, value in tiny.items():
            if name not in typed:
                setattr(args, name, value)
    for name, (on_gpu, on_cpu) in DEFAULTS.items():
        if getattr(args, name) == (-1 if name == "warmup" else 0):
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.cuda_graph and not args.tbptt:
        p.error("--cuda-graph records fixed-length chunks: give --tbptt N")
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(args, alphabet, device, g):
    """Random inputs, targets and text for one training step: (B, T, 3) offsets with pen lifts, (B, U) ids."""
    B, T = args.batch_size, args.seq_len
    strokes = torch.randn(B, T + 1, 3, generator=g)
    strokes[..., 2] = (torch.rand(B, T + 1, generator=g) < 0.05).float()
    inputs, targets = strokes[:, :-1].clone(), strokes[:, 1:]
    inputs[:, 0] = 0                                                   # start token, as teacher_forcing makes it
    text = torch.randint(1, alphabet + 1, (B, args.text_len), generator=g)
    mask = torch.ones(B, T)
    return [t.to(device) for t in (inputs, targets, mask, text)]


def make_train_step(model, loss_fn, batch, device, dtype, chunk=0, graph=False):
    """One training step as train.py takes it: per chunk of `chunk` points (0 = whole lines; state carried) a forward
    under autocast, mean nats per point, clip, Adam; with graph, forward and backward replayed as a CUDA graph."""
    inputs, targets, mask, text = batch
    text = text if model.synthesis else None
    optimizer = make_optimizer("adam", model.parameters(), lr=1e-4)
    chunk = chunk or inputs.shape[1]
    graphed = GraphedChunk(model, inputs.shape[0], chunk, text.shape[1] if text is not None else 0, dtype) if graph else None

    def step(points=0):
        """One step over the first `points` points of the lines (0 = all; a cheap warm-up without graphs)."""
        state, ok = None, []
        if graphed:
            graphed.reset(text)
        T = points or inputs.shape[1]
        for start in range(0, T, chunk):
            sl = slice(start, min(start + chunk, T))
            if graphed:
                loss_sum, _ = graphed.step(inputs[:, sl], targets[:, sl], mask[:, sl])
                ok.append(clipped_step(optimizer, model.parameters(), loss_sum, 3.0))
                continue
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                y = model(inputs[:, sl], text, state) if state is not None else model(inputs[:, sl], text)
            y, state = (y[0], y[1].detach()) if isinstance(y, tuple) else (y, None)
            loss_sum = loss_fn(y, targets[:, sl], mask[:, sl]).sum()
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / mask[:, sl].sum()).backward()
            ok.append(clipped_step(optimizer, model.parameters(), loss_sum, 3.0))
        if not torch.stack(ok).all():          # one host sync per batch, as in train.py
            raise RuntimeError("non-finite loss in the benchmark")
    return step


def time_interleaved(fns, reps, warmup, device, warmup_kwargs=None):
    """Run each function warmup + reps times, in turn (warm-up calls with warmup_kwargs). Returns {name: [(wall
    seconds, process CPU seconds)]}."""
    times = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(**(warmup_kwargs or {})) if i < warmup else fn()
            synchronize(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def summary(times, points):
    """Median wall seconds, points per second, and the CPU-time view of the same (see --threads)."""
    wall = statistics.median(t for t, _ in times)
    cpu = statistics.median(c for _, c in times)
    return {"seconds": round(wall, 4), "points_per_s": round(points / wall), "cpu_seconds": round(cpu, 4),
            "points_per_cpu_s": round(points / cpu), "all_seconds": [round(t, 4) for t, _ in times]}


def time_sampling(model, lines, reps, args, device, dtype, g):
    """Median seconds to sample `lines` lines of --sample-chars characters, --steps-per-char points each."""
    steps = args.sample_chars * args.steps_per_char
    if model.synthesis:
        text = torch.randint(1, model.config.alphabet_size + 1, (lines, args.sample_chars), generator=g).to(device)

    def run(n):
        kw = dict(text=text) if model.synthesis else dict(batch_size=lines)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model.sample(**kw, steps=n, generator=torch.Generator(device=device).manual_seed(args.seed),
                               cuda_graph=args.cuda_graph)
        assert out["strokes"].shape[1] == n, "sampling stopped early"
        return out

    run(min(steps, 32))                                                # warm-up: allocator, kernels, caches
    times = time_interleaved({"run": lambda: run(steps)}, reps, 0, device)["run"]
    return {"lines": lines, "points_per_line": steps, **summary(times, lines * steps)}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({os.cpu_count()} logical cores)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def main(argv=None):
    """Runs the benchmark (run) and returns its result; Ctrl-C or SIGTERM: one line, status 130."""
    args = get_args(argv)
    previous = interrupt_on_signals()
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        restore_signals(previous)


def run(args):
    try:
        device, dtype = torch.device(args.device), autocast_dtype(args.dtype, args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg = lambda: [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    load_start = loadavg()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    ### paper-size model and its textbook twin (same weights)
    config = ModelConfig(task=args.task, hidden_size=400, layers=3, mixtures=20, window_gaussians=10,
                         alphabet_size=81 if args.task == "synthesis" else 0)
    model = HandwritingModel(config).to(device)
    if args.compile:
        model.compile_window_step()
    batch = synthetic_batch(args, max(config.alphabet_size, 1), device, g)

    ### training throughput
    steps = {"ours": make_train_step(model, nll, batch, device, dtype, args.tbptt, args.cuda_graph)}
    if not args.skip_reference:
        reference = ReferenceModel.from_model(model)
        steps["reference"] = make_train_step(reference, reference_nll, batch, device, dtype)
    # warm-up (allocator, kernels, graph capture): on a CPU 100 points of each line are enough (the first timed
    # step was no slower), where a full step would cost a quarter of the run; a GPU warms up at full size
    warm = {"points": min(args.seq_len, 100)} if device.type == "cpu" else {}
    times = time_interleaved(steps, args.reps, args.warmup, device, warm)
    points = args.batch_size * args.seq_len
    train = {name: summary(t, points) for name, t in times.items()}
    if "reference" in train:
        train["speedup"] = round(train["ours"]["points_per_s"] / train["reference"]["points_per_s"], 3)
        train["speedup_cpu_time"] = round(train["ours"]["points_per_cpu_s"] / train["reference"]["points_per_cpu_s"], 3)

    ### sampling (model already built and warm)
    model.eval()
    if model.synthesis:
        with torch.no_grad():   # pin the window at the start (kappa += exp(-30) per point): the stopping rule never fires
            model.window.bias[2 * config.window_gaussians:] = -30.0
    if args.sample_weights == "float16":    # loaded as a shipped checkpoint loads: float16 weights into float32
        load_weights(model, {k: v.half() for k, v in model.state_dict().items()}, "the benchmark's")
    with sampling_mode(device), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):   # as it samples
        half = model._step_weights()[0][0].half                   # the product sample() chooses (StepProduct)
    sample = {"one_line": time_sampling(model, 1, args.sample_reps, args, device, dtype, g)}
    if args.sample_batch:
        sample["batch"] = time_sampling(model, args.sample_batch, args.sample_batch_reps, args, device, dtype, g)

    result = {
        "train_points_per_s": train["ours"]["points_per_s"],
        "reference_points_per_s": train["reference"]["points_per_s"] if "reference" in train else None,
        "speedup": train.get("speedup"),
        "sample_one_line_s": sample["one_line"]["seconds"],
        "sample_batch_s": sample["batch"]["seconds"] if "batch" in sample else None,
        "sample_float16_products": half,
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_start, "load_average_end": loadavg(),
        "settings": {**vars(args), "model": config.to_dict(), "points_per_step": points,
                     "data": "synthetic: N(0,1) offsets, pen lifts with p = 0.05, uniform random text; all lines full length",
                     "optimizer": "Adam lr 1e-4, gradient norm clipped to 3 (as train.py)"},
        "train": train, "sample": sample,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
