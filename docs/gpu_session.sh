#!/usr/bin/env bash
# A GPU session's work in stages, each one command that ends within a time budget (the device tool allows 10
# minutes a call). Needs only the prepared arrays: data/processed/iam_ondb.npz (16 MB; carry it).
#   bash docs/gpu_session.sh bench                # bench.py on the GPU: bf16, eager and compiled, batch 64 and 256
#   bash docs/gpu_session.sh synthesis 7          # train 7 more minutes (resumes runs/synthesis), evaluate, sample
#   bash docs/gpu_session.sh prediction 7         # the same for the prediction network
# Results go to $OUT (default out/), at most 8 files as the device tool returns them: log.txt, model.pt (float16
# weights, the file to ship), results.tar (metrics.jsonl, loss.png, the last training sample, valid.json: evaluate.py
# on the whole validation split with best.pt, and for synthesis legibility.json: evaluate.py --legibility, bias 1, 300
# validation prompts) and last.pt cut into 15 MB parts (last.pt.part-aa, ...; 3 at paper size): on a fresh machine,
# put the parts back in runs/TASK/ and this script joins them and resumes. Carry runs/TASK only to a fresh machine:
# carrying replaces the folder there, and a warm machine's own runs/TASK is newer.
# Environment: TRAIN_ARGS adds train.py flags (e.g. "--batch-size 128 --lr 2e-3", or "--augment-scale 0.1
# --augment-shear 0.1": it gave the CPU prediction stand-in -860.4 against -852.4, and the synthesis stand-in's
# last fine-tuning run better NLL and CER; "--dropout 0.1" then took the prediction stand-in from -860.4 to -869.0
# where the same fine-tune without it stayed at -859.2, and gave the synthesis stand-in a better NLL but less
# legible lines; flags are not kept across resumes, so pass the same on every call);
# DEVICE (cuda) and DTYPE (bfloat16); EVAL_ARGS adds evaluate.py flags (e.g. "--max-lines 100" for a quick run);
# RUN is the run folder (runs/TASK); PYTHON the interpreter (default python3, the one that holds PyTorch on the
# lent machines, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash docs/gpu_session.sh bench|synthesis|prediction [MINUTES]}
minutes=${2:-7}   # wall minutes of training; evaluations and start-up add 1-2 (a call may last 10)
out=${OUT:-out}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
py=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

case $stage in
  bench)
    for b in 64 256; do
      "$py" bench.py --device "$device" --dtype "$dtype" --batch-size "$b" > "$out/bench_b$b.json"
      "$py" bench.py --device "$device" --dtype "$dtype" --batch-size "$b" --compile --skip-reference \
        > "$out/bench_b${b}_compile.json"
    done
    ;;
  synthesis|prediction)
    run=${RUN:-runs/$stage}
    if compgen -G "$run/last.pt.part-*" > /dev/null && { [ ! -f "$run/last.pt" ] || [ "$run/last.pt.part-aa" -nt "$run/last.pt" ]; }; then
      cat "$run"/last.pt.part-* > "$run/last.pt"      # parts newer than last.pt (or no last.pt): they win
      rm -f "$run"/last.pt.part-*
      echo "joined $run/last.pt from its parts"
    fi
    extra=()
    if [ "$stage" = synthesis ]; then
      extra=(--recognizer checkpoints/recognizer.pt --select-by cer --legibility-lines 128)
    fi
    # shellcheck disable=SC2086
    "$py" train.py --task "$stage" --out "$run" --resume auto --time-limit "$minutes" --device "$device" \
      --dtype "$dtype" --no-progress "${extra[@]}" ${TRAIN_ARGS:-}
    cp "$run/model.pt" "$out/"
    report="$run/report"
    rm -rf "$report" && mkdir -p "$report"
    cp "$run/metrics.jsonl" "$run/loss.png" "$report/"
    last_sample=$(ls "$run"/sample_*.png 2>/dev/null | tail -1)
    [ -n "$last_sample" ] && cp "$last_sample" "$report/"
    # shellcheck disable=SC2086
    "$py" evaluate.py --checkpoint "$run/best.pt" --split valid --device "$device" ${EVAL_ARGS:-} | tail -1 \
      | tee "$report/valid.json"
    if [ "$stage" = synthesis ]; then
      # shellcheck disable=SC2086
      "$py" evaluate.py --checkpoint "$run/best.pt" --legibility --split valid --max-lines 300 --bias 1 \
        --device "$device" --out "$run/legibility" ${EVAL_ARGS:-} | tail -1 | tee "$report/legibility.json"
    fi
    tar -cf "$out/results.tar" -C "$report" .
    rm -f "$out"/last.pt.part-*
    split -b 15M "$run/last.pt" "$out/last.pt.part-"
    n=$(ls "$out" | wc -l)
    [ "$n" -le 8 ] || echo "warning: $n files in $out; the device tool returns at most 8"
    ;;
  *)
    echo "unknown stage '$stage': use bench, synthesis or prediction" >&2
    exit 2
    ;;
esac
echo "stage $stage done; files in $out: $(ls "$out" | tr '\n' ' ')"
