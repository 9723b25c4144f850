#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one command (one H100: about 9 minutes).
#
#   bash benchmarks/gpu_suite.sh fetch-wheels   # here, once: wheels of the packages the GPU image
#                                               # lacks (grain, tfds, librosa, ...) into
#                                               # build/gpu_wheels (pip download, about 20 MB)
#   bash benchmarks/gpu_suite.sh run            # on the GPU host, with build/gpu_wheels
#                                               # copied along (within 10 minutes)
#   SUITE_SMOKE=1 bash benchmarks/gpu_suite.sh run     # any machine: every section at toy sizes
#   SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh run   # print the commands only
#
# Results: $OUT when set, else SUITE_OUT (default build/gpu_suite), receives
# suite.log (everything printed) and suite.json (every section's JSON record, its exit status and
# seconds), rewritten after each section so a run cut short still returns what it measured.
# Sections run in priority order, each limited to the time left of SUITE_BUDGET_S (default 560 s);
# a section that would start with less than SUITE_MIN_SECTION_S (45 s) left is skipped and listed.
# SUITE_SECTIONS="base tiny ..." runs only those (e.g. the skipped ones, in a second call).
# Other knobs: SUITE_PYTHON (default: .venv/bin/python if present, else python3),
# SUITE_ATTENTION (default cudnn; xla in smoke runs), SUITE_DTYPE (default bfloat16).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-run}
WHEELS=build/gpu_wheels
if [[ -n "${SUITE_PYTHON:-}" ]]; then PY=$SUITE_PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

# Distributions present in the target CUDA image (Python 3.12, jax 0.11.2) that the
# project's requirements need; everything else the requirements pull in is fetched as a wheel.
IMAGE_HAS="absl-py attrs certifi charset-normalizer chex click cloudpickle contourpy cycler
etils flax fonttools fsspec humanize idna jax jaxlib joblib kiwisolver lazy-loader llvmlite
matplotlib ml-dtypes msgpack numba numpy opt-einsum optax orbax-checkpoint packaging pillow
protobuf psutil pyarrow pyparsing python-dateutil pyyaml requests rich scikit-learn scipy
simplejson six tensorstore threadpoolctl toolz tqdm treescope typing-extensions urllib3 wrapt
zipp markdown-it-py mdurl pygments"

fetch_wheels() {
  # Resolves the requirements' dependency closure from the installed environment (so versions
  # match what the tests ran with) and downloads cp312 x86-64 wheels of what the image lacks.
  mkdir -p "$WHEELS"
  local missing
  missing=$("$PY" - "$IMAGE_HAS" <<'EOF'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {norm(n) for n in sys.argv[1].split()}
roots = [Requirement(line.strip()).name for line in open("requirements.txt")
         if line.strip() and not line.startswith("#") and not line.startswith("pytest")]
versions, stack = {}, list(roots)
while stack:
  name = norm(stack.pop())
  if name in versions or name in image or name.startswith("jax"):
    continue
  dist = md.distribution(name)
  versions[name] = dist.version
  for spec in dist.requires or []:
    req = Requirement(spec)
    if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12"}):
      stack.append(req.name)
print("\n".join(f"{n}=={v}" for n, v in sorted(versions.items())))
EOF
) || { echo "could not resolve the requirements from $PY's environment" >&2; return 1; }
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
                   --platform manylinux1_x86_64)
  local spec
  for spec in $missing; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d "$WHEELS" "$spec" 2>/dev/null \
      || "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$spec" \
      || { echo "no wheel for $spec" >&2; return 1; }
  done
  echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS:"
  ls "$WHEELS"
}

if [[ $MODE == fetch-wheels ]]; then
  fetch_wheels
  exit
elif [[ $MODE != run ]]; then
  echo "usage: $0 [run|fetch-wheels]" >&2
  exit 2
fi

SMOKE=${SUITE_SMOKE:-0}
DRY_RUN=${SUITE_DRY_RUN:-0}
BUDGET=${SUITE_BUDGET_S:-560}
MIN_SECTION=${SUITE_MIN_SECTION_S:-45}
OUT_DIR=${OUT:-${SUITE_OUT:-build/gpu_suite}}
DTYPE=${SUITE_DTYPE:-bfloat16}
ATTENTION=${SUITE_ATTENTION:-cudnn}
WORK=$(mktemp -d)
STATUS=$WORK/status.tsv
: >"$STATUS"
if [[ $DRY_RUN == 1 ]]; then
  LOG=/dev/null
else
  mkdir -p "$OUT_DIR"
  LOG=$OUT_DIR/suite.log
  : >"$LOG"
fi
export PYTHONUNBUFFERED=1
# The largest-batch search should see (almost) the whole card, not JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

# The wheels are for the GPU image's Python 3.12; an environment with the packages keeps its own.
if [[ $DRY_RUN != 1 ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1 \
    && ! "$PY" -c "import grain, tensorflow_datasets, librosa, ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/suite_site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/suite_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

TRAIN=("$PY" benchmarks/train_step.py)
EMBED=("$PY" benchmarks/embed.py)
if [[ $SMOKE == 1 ]]; then
  # Toy sizes: one block each, width 64; bfloat16 works on CPUs but cuDNN attention does not.
  ATTENTION=${SUITE_ATTENTION:-xla}
  MICRO=(--config.model.depth=1 --config.model.decoder_depth=1 --config.model.width=64
         --config.model.num_heads=2 --config.model.decoder_width=64
         --config.model.decoder_num_heads=2)
  TIMING=(--steps=2 --windows=1 --warmup=1 --matmul_size=256 --memory_gb=1)
  SWEEP_BASE=2,4; SWEEP_TINY=2,4; SWEEP_LARGE=2,4; ONE=2; TINY_ONE=2; BREAKDOWN=2
  EMBED_CLIPS=2; EMBED_REPEATS=1
  INPUT=(--num_workers=2 --batch_size=8 --batches=5 --warmup_batches=1)
  LOGMEL=(--clip_seconds=2 --batch=2 --repeats=1)
else
  MICRO=()
  TIMING=(--steps=10 --windows=3 --warmup=3)
  SWEEP_BASE=128,256,512,1024; SWEEP_TINY=256,1024; SWEEP_LARGE=128,256; ONE=512; TINY_ONE=256
  BREAKDOWN=512
  EMBED_CLIPS=32,128; EMBED_REPEATS=5
  INPUT=(--num_workers=16 --batch_size=256 --batches=100 --warmup_batches=10)
  LOGMEL=(--batch=256 --repeats=5)
fi
MODEL=(--dtype="$DTYPE" --config.model.attention_impl="$ATTENTION" "${MICRO[@]}")

selected() {
  [[ -z "${SUITE_SECTIONS:-}" ]] || [[ " $SUITE_SECTIONS " == *" $1 "* ]]
}

merge() {
  # suite.json: {"sections": {name: record}, "status": [{name, rc, seconds}], ...}.
  "$PY" - "$WORK" "$OUT_DIR/suite.json" "$BUDGET" "$SMOKE" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
status = [dict(zip(("name", "rc", "seconds"), line.split("\t")))
          for line in (work / "status.tsv").read_text().splitlines() if line]
sections = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
out.write_text(json.dumps({"budget_s": int(sys.argv[3]), "smoke": sys.argv[4] == "1",
                           "status": status, "sections": sections}, indent=1))
EOF
}

# section NAME [VAR=VALUE ...] COMMAND...: runs COMMAND (with the environment assignments), its
# JSON going to $WORK/NAME.json through the `{json}` placeholder.
section() {
  local name=$1; shift
  selected "$name" || return 0
  local left=$((BUDGET - SECONDS))
  local args=("${@//\{json\}/$WORK/$name.json}")
  echo "== $name: ${args[*]}" | tee -a "$LOG"
  [[ $DRY_RUN == 1 ]] && return 0
  if ((left < MIN_SECTION)); then
    echo "-- $name skipped: ${left}s of the budget left" | tee -a "$LOG"
    printf '%s\tskipped\t0\n' "$name" >>"$STATUS"
    merge
    return 0
  fi
  local start=$SECONDS
  timeout --kill-after=15 "$left" env "${args[@]}" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STATUS"
  merge
}

if [[ $DRY_RUN != 1 ]]; then
  {
    echo "suite: smoke=$SMOKE budget=${BUDGET}s python=$PY dtype=$DTYPE attention=$ATTENTION"
    date -u
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    fi
    "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
                                               'optax', optax.__version__, jax.devices())"
    "$PY" -c "import audiomaepp.train.loop, audiomaepp.hear_api" \
      || echo "IMPORT FAILED: were the wheels in $WHEELS copied along?"
  } 2>&1 | tee -a "$LOG"
fi

# 1. Base: the MFU headline, batch sweep, optimiser share and the largest batch.
section base "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" --batch_size=$SWEEP_BASE \
  "${TIMING[@]}" --measure_peak --breakdown_batch=$BREAKDOWN --max_batch --output={json}
# 2-3. Tiny and Large: throughput and the largest batch of each size.
section tiny "${TRAIN[@]}" --config=configs/tiny.py "${MODEL[@]}" --batch_size=$SWEEP_TINY \
  "${TIMING[@]}" --max_batch --output={json}
section large "${TRAIN[@]}" --config=configs/large.py "${MODEL[@]}" --batch_size=$SWEEP_LARGE \
  "${TIMING[@]}" --max_batch --output={json}
# 4. Can the host feed the step? Grain with 0 and all workers on the synthetic corpus.
section input_pipeline "$PY" benchmarks/input_pipeline.py "${INPUT[@]}" --output_json={json}
# 5. HEAR embeddings of 10-s clips.
section embed "${EMBED[@]}" --config=configs/base.py "${MODEL[@]}" --clips=$EMBED_CLIPS \
  --repeats=$EMBED_REPEATS --output={json}
# 6. Levers, one at a time against `base` at batch $ONE (command buffers: `tiny` at $TINY_ONE,
# where kernel launches weigh most); docs/performance.md has the predictions.
section lever_xla_attention "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" \
  --config.model.attention_impl=xla --batch_size=$ONE "${TIMING[@]}" --output={json}
section lever_remat "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" \
  --config.model.remat=full --batch_size=$ONE "${TIMING[@]}" --output={json}
section lever_remat_dots "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" \
  --config.model.remat=dots --batch_size=$ONE "${TIMING[@]}" --output={json}
section lever_no_triton_gemm XLA_FLAGS=--xla_gpu_enable_triton_gemm=false \
  "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" --batch_size=$ONE "${TIMING[@]}" \
  --output={json}
section lever_no_command_buffer XLA_FLAGS=--xla_gpu_enable_command_buffer= \
  "${TRAIN[@]}" --config=configs/tiny.py "${MODEL[@]}" --batch_size=$TINY_ONE "${TIMING[@]}" \
  --output={json}
section lever_latency_hiding XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true \
  "${TRAIN[@]}" --config=configs/base.py "${MODEL[@]}" --batch_size=$ONE "${TIMING[@]}" \
  --output={json}
# 7. Log-mel on the GPU.
section logmel "$PY" benchmarks/logmel.py "${LOGMEL[@]}" --output_json={json}

[[ $DRY_RUN == 1 ]] || echo "suite done in $SECONDS s: $OUT_DIR/suite.json" | tee -a "$LOG"
rm -rf "$WORK"
