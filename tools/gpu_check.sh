#!/usr/bin/env bash
# tools/gpu_check.sh OUT_DIR [--dry-run] [--steps a,b,...]
#
# Everything the GPU minutes are for, in one go, each step under its own timeout, logs and JSON in OUT_DIR
# (summary.md at the end). On the GPU machine (no package index) bring the wheels first, see README's
# "On a GPU" section; PYTHONPATH must make detlib importable (no editable install).
#
# Steps (default: all, in this order):
#   env        device and driver (nvidia-smi); the preflight prints python, torch, torchvision, CUDA, cuDNN
#   preflight  R50-FPN 800 px, batch 8, a few steps in bf16, fp16, fp32; sync count of one step
#   pytest     pytest -m gpu
#   default    the default job on CUDA in bf16 (full length), wall time and AP
#   resume     fp16 (bf16 in the dry run): a straight run, and one sent SIGTERM after a checkpoint and resumed; metrics compared
#   bench      tools/benchmark.py R50-FPN 800 px batch 8: bf16 + channels_last vs torchvision fp32, and vs
#              torchvision at the same precision
#   compile    the same with --compile (torch.compile of the backbone)
#   evalbench  COCO evaluation backends on the machine's CPU (small model, 300 val images)
#   predict    tools/predict.py on CUDA with the default job's model
#   summary    summary.md from the JSON above
# --dry-run: the same steps (but four, see below) on the CPU at toy sizes (CI runs it: tests/test_gpu_check.py).
set -uo pipefail

OUT=""; DRY=0; STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) STEPS="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "usage: tools/gpu_check.sh OUT_DIR [--dry-run] [--steps a,b]" >&2; exit 2; }
# The dry run leaves out compile (inductor's CPU build of the backbone takes a minute and proves nothing
# about the script), pytest -m gpu and evalbench (the suite runs both paths on the CPU already) and the
# same-precision benchmark (the code path of the one against fp32, with one flag), so that it stays well
# under two minutes in CI; --steps names any of them to run them too.
[ -n "$STEPS" ] || { [ "$DRY" = 1 ] && STEPS="env,preflight,default,resume,bench,predict,summary" \
  || STEPS="env,preflight,pytest,default,resume,bench,compile,evalbench,predict,summary"; }
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1 GPU_CHECK_OUT="$OUT"

if [ "$DRY" = 1 ]; then
  DEV=cpu; R50=small; SIZE=64; BATCH=2; ITERS=2; WARM=1; WIN=2; DATA="data.root=$OUT/data data.synthetic.num_train=32 data.synthetic.num_val=8"
  DEFAULT="experiment=smoke trainer.max_iters=4"; RESUME_ITERS=8; CKPT=4; RESUME_AMP=bf16  # fp16 convs crawl on CPU
else
  DEV=cuda; R50=faster_rcnn_r50_fpn; SIZE=800; BATCH=8; ITERS=30; WARM=5; WIN=6; DATA=""
  DEFAULT=""; RESUME_ITERS=300; CKPT=100; RESUME_AMP=fp16
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or torch is not importable with $PY);" \
         "tools/gpu_check.sh OUT --dry-run rehearses the steps on the CPU" >&2
    exit 2
  fi
fi

want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
run_step() {  # run_step NAME SECONDS CMD...: one line per step in summary.txt, the output in NAME.log
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt" >&2
  [ $rc = 0 ] || tail -n 30 "$OUT/$name.log" >&2
  return $rc
}

if want env; then  # the versions are printed by the preflight (one python start fewer)
  run_step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo 'nvidia-smi: none'; nproc"
fi
if want preflight; then
  run_step preflight 180 "$PY" tools/gpu_preflight.py --device "$DEV" --model "$R50" --image-size "$SIZE" \
    --batch "$BATCH" --out "$OUT/preflight.json"
fi
if want pytest; then
  run_step pytest 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rfE --durations=10 tests/test_gpu.py
fi
if want default; then
  # shellcheck disable=SC2086
  run_step default 300 "$PY" train.py trainer.device="$DEV" trainer.amp=bf16 $DEFAULT $DATA \
    trainer.progress=false hydra.run.dir="$OUT/default_bf16"
fi
if want resume; then
  args=(trainer.device="$DEV" trainer.amp="$RESUME_AMP" trainer.max_iters="$RESUME_ITERS" trainer.checkpoint_period="$CKPT"
        trainer.log_period=4 trainer.progress=false)
  # shellcheck disable=SC2206
  [ -n "$DATA" ] && args+=($DATA) && args+=(data.batch_size=4)
  run_step resume_straight 200 "$PY" train.py "${args[@]}" hydra.run.dir="$OUT/fp16_straight"
  victim="$OUT/fp16_killed"
  "$PY" train.py "${args[@]}" hydra.run.dir="$victim" >"$OUT/resume_killed.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 1200); do  # up to 120 s for the first checkpoint
    [ -e "$victim/checkpoints/model_$(printf %07d "$CKPT").pt" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM $pid 2>/dev/null; wait $pid; echo "resume_killed rc=$? (143: stopped by SIGTERM)" | tee -a "$OUT/summary.txt" >&2
  run_step resume_continued 200 "$PY" train.py "${args[@]}" hydra.run.dir="$victim"
fi
if want bench; then
  run_step bench_vs_fp32 240 "$PY" tools/benchmark.py --device "$DEV" --model "$R50" --image-size "$SIZE" \
    --batch "$BATCH" --iters "$ITERS" --warmup "$WARM" --windows "$WIN" --amp bf16 --channels-last \
    --data random --eval-images 0 --out "$OUT/bench_vs_fp32.json"
  [ "$DRY" = 1 ] || run_step bench_same_precision 240 "$PY" tools/benchmark.py --device "$DEV" --model "$R50" --image-size "$SIZE" \
    --batch "$BATCH" --iters "$ITERS" --warmup "$WARM" --windows "$WIN" --amp bf16 --channels-last \
    --baseline-amp same --data random --eval-images 0 --out "$OUT/bench_same_precision.json"
fi
if want compile; then
  run_step bench_compile 300 "$PY" tools/benchmark.py --device "$DEV" --model "$R50" --image-size "$SIZE" \
    --batch "$BATCH" --iters "$ITERS" --warmup "$((WARM + 3))" --windows "$WIN" --amp bf16 --channels-last \
    --compile --data random --eval-images 0 --out "$OUT/bench_compile.json"
fi
if want evalbench; then
  if [ "$DRY" = 1 ]; then root="$OUT/data"; n=(--num-train 32 --num-val 8 --eval-images 8); else
    root="$HOME/.cache/detlib"; n=(--eval-images 300); fi
  run_step evalbench 240 "$PY" tools/benchmark.py --device "$DEV" --model small --iters "$ITERS" --warmup "$WARM" \
    --windows 2 --batch 8 --amp bf16 --channels-last --data-root "$root" "${n[@]}" --out "$OUT/bench_small.json"
fi
if want predict && [ -e "$OUT/default_bf16/checkpoints/last.pt" ]; then
  imgs=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['data_files']['val'])" \
         "$OUT/default_bf16/run.json" 2>/dev/null | xargs -r dirname)
  if [ -n "$imgs" ] && [ -d "$imgs/val" ]; then imgs="$imgs/val"; fi
  run_step predict 120 "$PY" tools/predict.py --run "$OUT/default_bf16" --images "$imgs" --device "$DEV" \
    --out "$OUT/predict"
fi
if want summary; then
  "$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
lines = ["# GPU check", "", "```", (out / "summary.txt").read_text().strip() if (out / "summary.txt").exists() else "", "```", ""]
env = (out / "env.log").read_text() if (out / "env.log").exists() else ""
lines += ["## Environment", "", "```", env.strip(), "```", ""]
pf = load("preflight.json")
if pf:
    lines += ["versions: " + ", ".join(f"{k} {pf.get(k)}" for k in ("device", "python", "torch", "torchvision", "cuda", "cudnn")), ""]
    lines += ["## Preflight", "", "| amp | step s | images/s | peak MiB | syncs/step |", "|---|---:|---:|---:|---:|"]
    for r in pf["runs"]:
        if "error" in r:
            lines.append(f"| {r['amp']} | error: {r['error']} | | | |")
        else:
            lines.append(f"| {r['amp']} | {r['step_s']:.4f} | {r['images_per_s']:.2f} | {r['peak_memory_mib'] or 0:.0f} | {r['syncs_per_step']} |")
    lines.append("")
for name in ("default_bf16", "fp16_straight", "fp16_killed"):
    m = load(f"{name}/metrics.json")
    lines.append(f"- {name}: " + (", ".join(f"{k} {v:.4f}" for k, v in m.items() if v is not None) if m else "no metrics.json"))
a, b = load("fp16_straight/metrics.json"), load("fp16_killed/metrics.json")
if a and b:
    diffs = {k: (b[k] - a[k]) for k in a if a[k] is not None and b.get(k) is not None}
    lines.append(f"- resumed minus straight: max |diff| {max(map(abs, diffs.values()), default=0):.4f} ({diffs.get('AP', 0):+.4f} AP)")
t = load("gpu_tests.json")
if t:
    lines.append(f"- gpu tests recorded: {json.dumps(t)}")
lines.append("")
for name in ("bench_vs_fp32", "bench_same_precision", "bench_compile", "bench_small"):
    r = load(f"{name}.json")
    if not r:
        continue
    lines += [f"## {name}", "", f"ours {r['ours']['images_per_s']:.2f} img/s, torchvision {r['torchvision']['images_per_s']:.2f} img/s, "
              f"ratio {r['ratio']['images_per_s']:.3f}; peak MiB {r['ours']['peak_memory_mib']:.0f} vs {r['torchvision']['peak_memory_mib']:.0f}; "
              f"syncs/step {r['ours'].get('syncs_per_step')} vs {r['torchvision'].get('syncs_per_step')}; "
              f"phases ours {json.dumps({k: round(v, 4) for k, v in r['ours']['phases_s'].items()})}; tf32 {r['settings'].get('tf32')}", ""]
    if r.get("eval"):
        lines += [f"eval: {json.dumps(r['eval'])[:600]}", ""]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
fi
grep -q "rc=[1-9]" "$OUT/summary.txt" 2>/dev/null && grep -v "resume_killed" "$OUT/summary.txt" | grep -q "rc=[1-9]" && exit 1
exit 0
