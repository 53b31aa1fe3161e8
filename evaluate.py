"""
Evaluate a trained network on a split of the prepared data, in Graves' units.

    python evaluate.py --checkpoint checkpoints/synthesis.pt --data data/processed --split test

Prints one JSON object: nll_per_line (mean nats per line, the paper's figure), nll_per_point, sse (mean
squared error of the mixture's expected next offset, normalised units, per point), lines, points.
"""
import argparse
import json
import sys

import torch

from dataset import HandwritingDataset, make_loader
from model import evaluate_nll, load_model, summarize_nll
from utils import load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/synthesis.pt", help="checkpoint written by train.py (last.pt, best.pt or a shipped one)")
    p.add_argument("--data", default="data/processed", help="folder with iam_ondb.npz, or the .npz itself")
    p.add_argument("--split", choices=["train", "valid", "test"], default="valid", help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=64, help="lines per batch")
    p.add_argument("--max-lines", type=int, default=0, help="evaluate only the first N lines of the split (0 = all)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype (the loss is always float32)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        checkpoint = load_checkpoint(args.checkpoint, map_location=device)
        model, checkpoint = load_model(checkpoint)
        dataset = HandwritingDataset(args.data, args.split, max_lines=args.max_lines or None)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if model.synthesis and checkpoint.get("alphabet") != dataset.alphabet.chars:
        sys.exit(f"error: {args.checkpoint} was trained with another alphabet than {args.data}; "
                 f"evaluate on the data it was trained on")
    # the checkpoint's normalisation, so a model is scored on the scale it was trained on
    dataset.set_normalization(checkpoint["mean"], checkpoint["std"])
    model.to(device)
    total = evaluate_nll(model, make_loader(dataset, args.batch_size, shuffle=False), device, DTYPES[args.dtype])
    result = {"checkpoint": args.checkpoint, "split": args.split, "task": model.config.task, **summarize_nll(total)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
