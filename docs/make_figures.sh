#!/usr/bin/env bash
# Regenerates every sample picture in the README from the shipped checkpoints (deterministic: fixed seeds).
#   bash docs/make_figures.sh            # writes docs/*.png, *.svg, *.gif
#   bash docs/make_figures.sh /tmp/figs  # somewhere else
# Loss curves come from training runs (train.py writes loss.png); docs/styles.png from utils.make_styles().
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
mkdir -p "$out"
export OMP_NUM_THREADS=1
g() { python generate.py "$@"; }

g --text "Handwriting from text\nin one command" --bias 1 --seed 1 --out "$out/synthesis.png" \
  --plot-attention "$out/attention.png"
# the legibility sheet (issue 5): 10 sentences not in the training text, bias 1, one line each
g --text-file docs/sentences.txt --max-chars-per-line 48 --bias 1 --seed 1 --out "$out/sheet.png"
# the same four sentences of the sheet at bias 0, 0.5, 1 and 2 (issue 5)
for b in 0 0.5 1 2; do
  g --text-file <(head -4 docs/sentences.txt) --max-chars-per-line 48 --bias "$b" --seed 4 --out "$out/bias_$b.png"
done
g --text "Happy birthday, Anna\nwith love from\nall of us" --align center --bias 1 --seed 4 --out "$out/card.png"
g --text "Three versions" --num-samples 3 --bias 0.75 --seed 7 --out "$out/samples.png"
g --text "the quick brown fox" --style 3 --bias 1 --seed 4 --show-prime --out "$out/style.png"
g --prime-file docs/prime_example.json --text "is a concern for us all" --bias 1 --seed 2 --show-prime \
  --out "$out/prime.png"
# one hand for a page: a sampled line saved as a prime file (docs/hand.json), then a text written in its hand
g --text "The quick brown fox jumps over a lazy dog" --max-chars-per-line 50 --bias 1 --seed 11 --out "$out/hand.png" \
  --save-hand "$out/hand.json"
g --text-file <(head -5 docs/sentences.txt) --max-chars-per-line 48 --prime-file "$out/hand.json" --bias 1 --seed 2 \
  --out "$out/hand_letter.png"
g --text "Plot me" --bias 1 --seed 3 --stroke-width 1.5 --color "#1a237e" --out "$out/plot.svg"
g --text "Watch me write" --bias 1 --seed 3 --out "$out/writing.gif"
for v in strokes eos density; do
  g --text "Where the pen goes" --bias 1 --seed 5 --view "$v" --out "$out/view_$v.png"
done
g --task prediction --num-samples 3 --bias 0.5 --seed 3 --out "$out/prediction.png"
# characters the training text rarely holds, written poorly (README, Text, pages and limits)
g --text "Quick Zebras X-ray Quartz\n0123456789 QXZ qxz\nJazz, Xerxes & Quixote: 42?" --bias 1 --seed 3 \
  --out "$out/rare.png"
echo "figures in $out"
