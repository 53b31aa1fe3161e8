#!/usr/bin/env bash
# A GPU session's work in stages, each one command that ends within a time budget (the device tool allows 10
# minutes a call). Needs only the prepared arrays: data/processed/iam_ondb.npz (16 MB; carry it), or the folder DATA
# names (e.g. DATA=data/processed_graves, prepared with --keep-repeats --fill-gaps as Graves did: docs/results.md).
#   bash docs/gpu_session.sh check                # the CUDA-only tests (graphs against eager), 1-2 minutes
#   bash docs/gpu_session.sh bench                # bench.py on the GPU, bf16: eager, CUDA graphs at batch 64-1024
#   bash docs/gpu_session.sh synthesis 7          # train 7 more minutes (resumes runs/synthesis), evaluate, sample
#   bash docs/gpu_session.sh prediction 7         # the same for the prediction network
#   bash docs/gpu_session.sh start synthesis 18   # run 'synthesis 18' in the background (setsid), so it outlives the call
#   bash docs/gpu_session.sh wait synthesis 540   # wait up to 540 s for it; then its model.pt, results.tar and log.txt
#                                                 # go to $OUT/RUN_NAME/ (before: best.pt's weights as best_fp16.pt)
# Several runs at once (a sweep): RUN=runs/NAME with each start and wait, e.g.
#   RUN=runs/s_awn TRAIN_ARGS="--weight-noise 0.01" bash docs/gpu_session.sh start synthesis 20
# Graphed runs are latency-bound: on one H100 a synthesis run trained at 200-230k points/s beside a prediction run
# (683k), 225k alone; four runs at once were too many (three synthesis runs at 52-61k each, the prediction run at
# 235k). A call returns at most 8 files, so fetch two runs per wait call.
# start/wait let one warm machine train both networks at once (each is latency-bound, so two share the GPU well) and
# train longer than one 10-minute call; the machine must stay warm between calls (the device tool keeps it 30 s).
# Results go to $OUT (default out/), at most 8 files as the device tool returns them: log.txt, model.pt (float16
# weights, the file to ship), results.tar (metrics.jsonl, loss.png, the last training sample, valid.json: evaluate.py
# on the whole validation split with best.pt, and for synthesis legibility.json: evaluate.py --legibility, bias 1, 300
# validation prompts) and last.pt cut into 15 MB parts (last.pt.part-aa, ...; 3 at paper size): on a fresh machine,
# put the parts back in runs/TASK/ and this script joins them and resumes. Carry runs/TASK only to a fresh machine:
# carrying replaces the folder there, and a warm machine's own runs/TASK is newer.
# With --ema or --weight-noise last.pt holds one more copy of the weights (paper size: 4 parts, about 60 MB), too
# much to carry beside the 16 MB of data: on a fresh machine go on from model.pt with --init-from instead.
# Environment: TRAIN_ARGS adds train.py flags (e.g. "--batch-size 128 --lr 2e-3", or "--augment-scale 0.1
# --augment-shear 0.1": it gave the CPU prediction stand-in -860.4 against -852.4, and the synthesis stand-in's
# last fine-tuning run better NLL and CER; "--dropout 0.1" then took the prediction stand-in from -860.4 to -869.0
# where the same fine-tune without it stayed at -859.2, and gave the synthesis stand-in a better NLL but less
# legible lines; flags are not kept across resumes, so pass the same on every call; "--ema 0" turns off the
# default --ema 0.999);
# synthesis runs with --tbptt 300 --lr 2e-3 --cuda-graph, batch 64 (CUDA graphs: at 100-point chunks 238k points/s
# on an H100 against 35k eagerly; the paper-size runs so far used 50-point chunks, which learnt a blurred window and
# illegible lines, docs/results.md); TRAIN_ARGS given later win (e.g. "--tbptt 50" for the old setting);
# DATA (data/processed) the prepared data for training and evaluation; DEVICE (cuda) and DTYPE (bfloat16);
# EVAL_ARGS adds evaluate.py flags (e.g. "--max-lines 100" for a quick run);
# RUN is the run folder (runs/TASK); PYTHON the interpreter (default python3, the one that holds PyTorch on the
# lent machines, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash docs/gpu_session.sh check|bench|synthesis|prediction|start|wait ...}
minutes=${2:-7}   # wall minutes of training; evaluations and start-up add 1-2 (a call may last 10)
out=${OUT:-out}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
data=${DATA:-data/processed}
py=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

case $stage in
  check)   # the tests that need CUDA (CUDA graphs of training chunks and of sampling blocks against eager)
    "$py" -m pytest -q -rs tests/test_model.py -k cuda
    # train.py with --cuda-graph against without, plain and with --weight-noise, here on the GPU (12 Adam steps: float
    # noise from other kernels may exceed the test's CPU tolerance; a failure is reported, not fatal)
    "$py" -m pytest -q -rs tests/test_train.py -k cuda_graph_path || echo "train.py graph-vs-eager check failed (see above)"
    ;;
  bench)   # eager with the textbook reference, then CUDA graphs (training chunks of 100 points, sampling blocks)
    mkdir -p "$out/bench"
    "$py" bench.py --device "$device" --dtype "$dtype" --batch-size 64 > "$out/bench/b64_eager.json"
    for b in 64 256 1024; do   # a failure (say, of the sampling graph) must not stop the others: || echo
      "$py" bench.py --device "$device" --dtype "$dtype" --batch-size "$b" --tbptt 100 --cuda-graph --skip-reference \
        > "$out/bench/b${b}_graph.json" || echo "bench at batch $b with --cuda-graph failed"
    done
    for b in 64 256; do
      "$py" bench.py --device "$device" --dtype "$dtype" --batch-size "$b" --tbptt 100 --cuda-graph --compile \
        --skip-reference --sample-batch 0 > "$out/bench/b${b}_graph_compile.json" || echo "bench with --compile failed"
    done
    for g in "" --cuda-graph; do   # the prediction network: cuDNN layers, no window loop
      "$py" bench.py --device "$device" --dtype "$dtype" --task prediction --batch-size 64 --tbptt 100 $g \
        --skip-reference --sample-batch 0 > "$out/bench/prediction_b64${g:+_graph}.json" || echo "prediction bench $g failed"
    done
    tar -cf "$out/bench.tar" -C "$out" bench && rm -r "$out/bench"
    ;;
  synthesis|prediction)
    run=${RUN:-runs/$stage}
    if compgen -G "$run/last.pt.part-*" > /dev/null && { [ ! -f "$run/last.pt" ] || [ "$run/last.pt.part-aa" -nt "$run/last.pt" ]; }; then
      cat "$run"/last.pt.part-* > "$run/last.pt"      # parts newer than last.pt (or no last.pt): they win
      rm -f "$run"/last.pt.part-*
      echo "joined $run/last.pt from its parts"
    fi
    # a moving average of the weights is what gets evaluated and shipped (it beat the training weights by 4-9 nats per
    # line at every evaluation of a CPU fine-tune, and on an H100 at lr 2e-3 by 23 (prediction) and 42 (synthesis); README,
    # Results); the training weights' NLL is logged beside it
    extra=(--ema 0.999)
    if [ "$stage" = synthesis ]; then   # the window loop is launch-bound: CUDA graphs of the chunks (6.9x at 100 points)
      # 300-point chunks, as the legible CPU stand-ins trained: on 3 x 128 models from scratch the window sharpened
      # after 3,000-4,000 updates at batch 32 or 64 (focus 0.42-0.63, CER 0.455-0.596), and not in 13,000 updates of
      # 50-point chunks, the earlier GPU setting (focus 0.31-0.32, CER 0.795; docs/results.md). A step is one chunk,
      # 19,200 points at batch 64: evaluate every 2,000 steps, about 3 minutes at the 225k points/s of batch 64
      extra+=(--recognizer checkpoints/recognizer.pt --select-by cer --legibility-lines 128 --tbptt 300 --lr 2e-3
             --cuda-graph --eval-interval 2000)
    fi
    # shellcheck disable=SC2086
    "$py" train.py --task "$stage" --data "$data" --out "$run" --resume auto --time-limit "$minutes" --device "$device" \
      --dtype "$dtype" --no-progress "${extra[@]}" ${TRAIN_ARGS:-}
    cp "$run/model.pt" "$out/"
    report="$run/report"
    rm -rf "$report" && mkdir -p "$report"
    cp "$run/metrics.jsonl" "$run/loss.png" "$report/"
    last_sample=$(ls "$run"/sample_*.png 2>/dev/null | tail -1)
    [ -n "$last_sample" ] && cp "$last_sample" "$report/"
    # shellcheck disable=SC2086
    "$py" evaluate.py --checkpoint "$run/best.pt" --data "$data" --split valid --device "$device" ${EVAL_ARGS:-} | tail -1 \
      | tee "$report/valid.json"
    if [ "$stage" = synthesis ]; then
      # shellcheck disable=SC2086
      "$py" evaluate.py --checkpoint "$run/best.pt" --data "$data" --legibility --split valid --max-lines 300 --bias 1 \
        --device "$device" --out "$run/legibility" ${EVAL_ARGS:-} | tail -1 | tee "$report/legibility.json"
    fi
    tar -cf "$out/results.tar" -C "$report" .
    rm -f "$out"/last.pt.part-*
    split -b 15M "$run/last.pt" "$out/last.pt.part-"
    n=$(ls "$out" | wc -l)
    [ "$n" -le 8 ] || echo "warning: $n files in $out; the device tool returns at most 8"
    ;;
  start)
    task=${2:?usage: bash docs/gpu_session.sh start TASK MINUTES}
    minutes=${3:-18}
    run=${RUN:-runs/$task}
    mkdir -p "$run"
    rm -f "$run/session.log"
    OUT="$run/outbox" RUN="$run" setsid nohup bash docs/gpu_session.sh "$task" "$minutes" > "$run/session.log" 2>&1 < /dev/null &
    echo $! > "$run/session.pid"
    echo "started $task for $minutes minutes (pid $!); log: $run/session.log"
    ;;
  wait)
    task=${2:?usage: bash docs/gpu_session.sh wait TASK SECONDS}
    secs=${3:-540}
    run=${RUN:-runs/$task}
    end=$((SECONDS + secs))
    done_line="stage $task done"
    while ! grep -q "$done_line" "$run/session.log" 2>/dev/null && [ $SECONDS -lt $end ] \
        && kill -0 "$(cat "$run/session.pid")" 2>/dev/null; do
      sleep 10
    done
    grep "step " "$run/session.log" | tail -3 || true
    tail -4 "$run/session.log"
    dest="$out/$(basename "$run")"   # one folder per run, so several runs can be fetched in one call
    mkdir -p "$dest"
    if grep -q "$done_line" "$run/session.log"; then
      cp "$run/outbox/model.pt" "$run/outbox/results.tar" "$run/outbox/log.txt" "$dest/"
    elif [ -f "$run/best.pt" ]; then   # still training (or it died): keep what is best so far
      "$py" -c "import sys; from utils import export_weights, load_checkpoint; export_weights(load_checkpoint(sys.argv[1]), sys.argv[2])" \
        "$run/best.pt" "$dest/best_fp16.pt"
      cp "$run/metrics.jsonl" "$dest/" 2>/dev/null || true
    fi
    ;;
  *)
    echo "unknown stage '$stage': use check, bench, synthesis, prediction, start or wait" >&2
    exit 2
    ;;
esac
echo "stage $stage done; files in $out: $(ls "$out" | tr '\n' ' ')"
