#!/usr/bin/env bash
# The embeddings benchmark on a GPU machine (issue 33 item 7): one short, timeout-bounded command for a
# lent `device` machine, run from the repository root. The machine has no network, so the venv must be
# there already with the `latents` extra and bench/requirements.txt's no-deps lines (clip-retrieval,
# all-clip, clip-anytorch); the script checks that first rather than letting pip fail offline.
# Whatever it writes goes to $OUT (the device tool brings it back): the bench's log, RESULTS.md's new
# entry, and nvidia-smi's view of the card.
#   EMB_IMAGES (4096)  images rendered and embedded, per side and round
#   EMB_DEDUP  (1000000) vectors for dedup's cost, measured after the embeddings, on its own budget
#   EMB_LIMIT  (300)   seconds for the embeddings part; DEDUP_LIMIT (200) for dedup's
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/work/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# find_spec only: clip_retrieval's package __init__ needs its web back end, which the bench never imports
"$PY" - <<'PYEOF' || { echo "gpu_embeddings: the venv lacks what the bench needs (above)"; exit 2; }
import importlib.util, torch
missing = [m for m in ("open_clip", "all_clip", "clip", "clip_retrieval") if importlib.util.find_spec(m) is None]
assert not missing, f"not installed: {missing} (bench/requirements.txt, installed with --no-deps)"
assert torch.cuda.is_available(), "torch sees no GPU"
PYEOF
cp bench/RESULTS.md "$OUT/RESULTS.before.md"
timeout --signal=INT --kill-after=20 "${EMB_LIMIT:-300}" "$PY" -m bench --only embeddings --device cuda \
  --embeddings-images "${EMB_IMAGES:-4096}" --embeddings-rounds 3 --embeddings-dedup 0 2>&1 | tee "$OUT/embeddings.log"
echo "embeddings rc=${PIPESTATUS[0]}" | tee -a "$OUT/embeddings.log"
diff bench/RESULTS.md "$OUT/RESULTS.before.md" | sed -n 's/^< //p' > "$OUT/RESULTS.new.md"
# dedup's cost alone: one JSON line (seconds, duplicates, planted pairs found); peak memory from time -v
timeout --kill-after=10 "${DEDUP_LIMIT:-200}" /usr/bin/time -v "$PY" -m bench.embeddings_bench dedup "${EMB_DEDUP:-1000000}" \
  > "$OUT/dedup.json" 2> "$OUT/dedup.time.txt"
echo "dedup rc=$? $(cat "$OUT/dedup.json") $(grep 'Maximum resident' "$OUT/dedup.time.txt")"
