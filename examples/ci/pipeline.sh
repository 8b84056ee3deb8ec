#!/usr/bin/env bash
# The MLOps loop as one CI job: train -> register -> evaluate against the champion -> build and sign ->
# canary to the fleet -> wait on the rollout -> promote the alias. Any failing step fails the job:
#
#   exit 3  the candidate failed its evaluation gate (threshold, or worse than the champion)
#   exit 3  the rollout was rolled back (a health gate failed on the devices)   [rollout status --wait]
#   exit 4  the rollout halted or was aborted;  exit 5  it did not finish within ROLLOUT_TIMEOUT
#   exit 1  anything else (hub unreachable, refused, bad input)
#
# The champion alias moves only at the end, after the fleet's gates passed, and only if it still names
# the version this run compared with (--expect): two runs racing cannot overwrite each other's result.
#
# Needs EDGEFLEET_HUB and EDGEFLEET_TOKEN (an operator token) and `edgefleet` installed.
# Settings (environment, with defaults):
#   MODEL=churn  DEPLOYMENT=churn-edge  TARGET='*'  STRATEGY=canary:1  BAKE=10s  ROLLOUT_TIMEOUT=900
#   MIN_ACCURACY=0.8  TOLERANCE=0.01  COLLECT_PPM=10000  SEED=$GITHUB_RUN_NUMBER  TRAINER=auto
#   RELEASE_KEY=file (sign here when the hub does not hold the release key)  WORK=a temporary directory
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
EDGEFLEET="${EDGEFLEET:-edgefleet}"
MODEL="${MODEL:-churn}"
DEPLOYMENT="${DEPLOYMENT:-churn-edge}"
TARGET="${TARGET:-*}"
STRATEGY="${STRATEGY:-canary:1}"
BAKE="${BAKE:-10s}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-900}"
MIN_ACCURACY="${MIN_ACCURACY:-0.8}"
TOLERANCE="${TOLERANCE:-0.01}"
COLLECT_PPM="${COLLECT_PPM:-10000}"
SEED="${SEED:-${GITHUB_RUN_NUMBER:-$(date +%s)}}"
TRAINER="${TRAINER:-auto}"
WORK="${WORK:-$(mktemp -d)}"
RUN="${GITHUB_RUN_ID:-local-$SEED}"

ef() { "$EDGEFLEET" "$@"; }
field() { "$PYTHON" -c 'import json, sys; v = json.load(open(sys.argv[1]))[sys.argv[2]]; print("" if v is None else v)' "$1" "$2"; }
step() { echo; echo "==> $(date +%T) $*"; }
summary() { [ -n "${GITHUB_STEP_SUMMARY:-}" ] && echo "$*" >> "$GITHUB_STEP_SUMMARY" || true; }

step "train (seed $SEED)"
"$PYTHON" "$HERE/train.py" --out "$WORK" --seed "$SEED" --trainer "$TRAINER"

step "register"
ef model register "$MODEL" "$WORK/model.onnx" --baseline "$WORK/baseline.json" --training-run "$RUN" \
  --dataset "synthetic-seed-$SEED" --tag "trainer=$(field "$WORK/train.json" trainer)" --json > "$WORK/registered.json"
VERSION="$(field "$WORK/registered.json" version)"
echo "registered $MODEL:$VERSION"

# what the candidate is compared with now is what the promotion expects to replace at the end
CHAMPION="$(ef model alias get "$MODEL" champion 2>/dev/null || echo none)"
step "evaluate $MODEL:$VERSION (champion: $CHAMPION)"
set +e
ef model evaluate "$MODEL:$VERSION" --data "$WORK/eval.csv" --label y --metric accuracy --metric f1 --metric auc \
  --threshold "accuracy>=$MIN_ACCURACY" --against champion --tolerance "$TOLERANCE"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "$MODEL:$VERSION did not pass its evaluation (exit $rc); the champion stays $CHAMPION"
  summary "❌ $MODEL:$VERSION failed evaluation against champion $CHAMPION"
  exit "$rc"
fi

step "build and sign module $MODEL"
ef module build "$MODEL" --model "$MODEL:$VERSION" --sample "$WORK/sample.json" --collect-rate-ppm "$COLLECT_PPM" \
  --json > "$WORK/module.json"
MODULE="$MODEL:$(field "$WORK/module.json" version)"
if [ "$(field "$WORK/module.json" signed)" != "True" ]; then
  [ -n "${RELEASE_KEY:-}" ] || { echo "module $MODULE is unsigned and RELEASE_KEY is not set"; exit 1; }
  ef module sign "$MODULE" --key "$RELEASE_KEY"
fi
echo "built $MODULE (bundle $(field "$WORK/module.json" digest | cut -c1-12)…)"

step "deploy $MODULE to $DEPLOYMENT ($STRATEGY, bake $BAKE)"
ef deploy edge "$DEPLOYMENT" --module "$MODULE" --target "$TARGET" --strategy "$STRATEGY" --bake "$BAKE" \
  --gate max_install_failure_rate=0 --gate max_error_rate=0.05 --json > "$WORK/deployed.json"
ROLLOUT="$(field "$WORK/deployed.json" rollout)"

if [ -n "$ROLLOUT" ]; then
  step "wait for rollout $ROLLOUT"
  set +e
  ef rollout status "$DEPLOYMENT" --id "$ROLLOUT" --wait --timeout "$ROLLOUT_TIMEOUT"
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "rollout $ROLLOUT of $MODULE did not succeed (exit $rc); the champion stays $CHAMPION"
    summary "❌ $MODULE: rollout $ROLLOUT did not succeed (exit $rc); champion stays $CHAMPION"
    exit "$rc"
  fi
else
  echo "$DEPLOYMENT already runs $MODULE: nothing to roll out"
fi

step "promote $MODEL:$VERSION to champion"
ef model alias set "$MODEL" champion "$VERSION" --expect "$CHAMPION"
summary "✅ $MODEL:$VERSION is the champion (was $CHAMPION), running on $DEPLOYMENT as $MODULE"
