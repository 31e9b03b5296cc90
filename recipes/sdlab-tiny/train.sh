#!/usr/bin/env bash
# Retrain sdlab-tiny from scratch: data -> VAE -> text tower -> assemble -> VAE decoder -> U-Net (three runs)
# -> v2 (VAE decoder, then U-Net + text tower on data v2) -> v2.1 / v2.2 / v2.3 (the same on data v3, v4, v5)
# -> v2.4 (data v5 again, then data v6) -> v2.5 (data v8: more everyday names)
# -> the four-step adapter (lcd_lora.toml, shipped) -> four-step distillation of the whole U-Net (lcd.toml).
# Every stage is resumable: run this script again and finished stages are skipped, the unfinished one goes
# on from its newest run checkpoint (--resume latest). A U-Net run ends at its config's max_steps, or
# earlier with Ctrl-C / SIGINT (it writes a checkpoint first); each later run (unet_continue.toml, then
# unet_emoji.toml) starts from the previous run's final EMA weights, so it begins only once that run has
# finished. Then export (README.md).
#
#   bash recipes/sdlab-tiny/train.sh                       # CPU, all defaults
#   NPROC=1 TRAIN_ARGS="--device cuda --num-workers 12" UNET_ARGS="--mixed-precision bf16" \
#       bash recipes/sdlab-tiny/train.sh                   # a GPU
#
# Environment: RUN (default runs/sdlab-tiny), COUNT (training images, default 40000), SDLAB (the sdlab
# command), TRAIN_ARGS (options for every training stage), UNET_ARGS (more options for the U-Net runs),
# NPROC (U-Net processes under torchrun, default 2: one per CPU core; the global batch stays 32),
# UNET_SECONDS (stop the U-Net runs after this long) or UNET_DEADLINE (stop them at this Unix time).
set -euo pipefail
RECIPE="$(cd "$(dirname "$0")" && pwd)"
RUN="${RUN:-runs/sdlab-tiny}"
COUNT="${COUNT:-40000}"
SDLAB="${SDLAB:-sdlab}"
NPROC="${NPROC:-2}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
UNET_ARGS="${UNET_ARGS:-}"
paths=(--model "$RUN/init.safetensors" --data-dir "$RUN/data")
# caption wording of every dataset: a fifth paraphrased; size / position / background left unsaid in some
CAPTIONS="--paraphrase-prob 0.2 --omit-size 0.2 --omit-position 0.2 --omit-background 0.1"

echo "== $(date +%T) data: $COUNT images"
[ -f "$RUN/data/metadata.jsonl" ] || python -m sdlab.tiny.datasets.build "$RUN/data" --count "$COUNT" --seed 0 $CAPTIONS

echo "== $(date +%T) initial bundle (random weights)"
[ -f "$RUN/init.safetensors" ] || $SDLAB new-model "$RUN/init.safetensors" --family sdlab-tiny --seed 0 --dtype fp32

echo "== $(date +%T) VAE"
[ -f "$RUN/vae/final.safetensors" ] || $SDLAB train --config "$RECIPE/vae.toml" "${paths[@]}" \
    --output-dir "$RUN/vae" --resume latest --no-progress $TRAIN_ARGS

echo "== $(date +%T) text tower"
[ -f "$RUN/text/final.safetensors" ] || $SDLAB train --config "$RECIPE/text.toml" "${paths[@]}" \
    --output-dir "$RUN/text" --resume latest --no-progress $TRAIN_ARGS

echo "== $(date +%T) assemble"
[ -f "$RUN/assembled.safetensors" ] || python -m sdlab.tiny.assemble assemble "$RUN/init.safetensors" \
    "$RUN/assembled.safetensors" --vae "$RUN/vae/final.safetensors" --text "$RUN/text/final.safetensors" --data "$RUN/data"

echo "== $(date +%T) VAE decoder (encoder frozen: the U-Net's latents do not change)"
[ -f "$RUN/vae-decoder/final.safetensors" ] || $SDLAB train --config "$RECIPE/vae_decoder.toml" \
    --model "$RUN/assembled.safetensors" --data-dir "$RUN/data" --output-dir "$RUN/vae-decoder" --resume latest \
    --no-progress $TRAIN_ARGS

if [ -z "${UNET_DEADLINE:-}" ] && [ -n "${UNET_SECONDS:-}" ]; then UNET_DEADLINE=$(($(date +%s) + UNET_SECONDS)); fi

# run_unet CONFIG MODEL DATA OUTDIR [options]: one U-Net run under torchrun, stopped by SIGINT at
# UNET_DEADLINE. Returns 0 when it finished (OUTDIR/final.safetensors written), 1 when it stopped early.
run_unet() {
    local config=$1 model=$2 data=$3 out=$4 limit=() status=0
    shift 4
    [ -f "$out/final.safetensors" ] && return 0
    if [ -n "${UNET_DEADLINE:-}" ]; then
        local left=$((UNET_DEADLINE - $(date +%s)))
        [ "$left" -gt 0 ] || return 1
        limit=(timeout -s INT "$left")
    fi
    "${limit[@]}" torchrun --standalone --nproc_per_node="$NPROC" -m sdlab.train.cli --config "$RECIPE/$config" \
        --model "$model" --data-dir "$data" --output-dir "$out" --batch-size $((32 / NPROC)) \
        --resume latest --no-progress "$@" $TRAIN_ARGS $UNET_ARGS || status=$?
    echo "== $(date +%T) U-Net run $out stopped (status $status)"
    # 130: stopped by SIGINT after writing a checkpoint; 124: timeout's own status
    [ "$status" = 0 ] || [ "$status" = 130 ] || [ "$status" = 124 ] || exit "$status"
    [ -f "$out/final.safetensors" ]
}

# build_v3_data DIR COUNT SEED EMOJI_FRACTION PLURAL_PROB [options]: a data set with data v3's wording
# (paraphrases, free phrasing, left-out size / position / background drawn at their defaults); skipped when built.
# Options given after PLURAL_PROB win over these (the last of a repeated option counts).
build_v3_data() {
    local out=$1 count=$2 seed=$3 emoji=$4 plural=$5
    shift 5
    [ -f "$out/metadata.jsonl" ] && return 0
    python -m sdlab.tiny.datasets.build "$out" --count "$count" --seed "$seed" --emoji-fraction "$emoji" \
        --paraphrase-prob 0.2 --free-prob 0.5 --plural-prob "$plural" \
        --omit-size 0.4 --omit-position 0.4 --omit-background 0.15 --unsaid-defaults "$@"
}

echo "== $(date +%T) U-Net, first run"
run_unet unet.toml "$RUN/assembled.safetensors" "$RUN/data" "$RUN/unet" || exit 0
echo "== $(date +%T) U-Net, second run from the first's EMA weights"
run_unet unet_continue.toml "$RUN/unet/final-ema.safetensors" "$RUN/data" "$RUN/unet2" \
    --cache-dir "$RUN/unet/latent_cache" || exit 0
echo "== $(date +%T) U-Net, third run from the second's EMA weights, with 20000 more emoji images"
[ -f "$RUN/data-emoji/metadata.jsonl" ] || python -m sdlab.tiny.datasets.build "$RUN/data-emoji" --count 20000 --seed 1 \
    --kind emoji $CAPTIONS
[ -f "$RUN/data-mix/metadata.jsonl" ] || python -m sdlab.train.combine "$RUN/data-mix" "$RUN/data" "$RUN/data-emoji"
run_unet unet_emoji.toml "$RUN/unet2/final-ema.safetensors" "$RUN/data-mix" "$RUN/unet3" \
    --cache-dir "$RUN/unet/latent_cache" || exit 0
echo "== $(date +%T) v2: data v2 (every named colour as a background, free phrasing, plurals)"
[ -f "$RUN/data-v2/metadata.jsonl" ] || python -m sdlab.tiny.datasets.build "$RUN/data-v2" --count "$COUNT" --seed 3 \
    --emoji-fraction 0.6 --paraphrase-prob 0.2 --free-prob 0.45 --plural-prob 0.08 \
    --omit-size 0.2 --omit-position 0.2 --omit-background 0.1
echo "== $(date +%T) v2: the VAE decoder again on data v2, from the first decoder (encoder frozen)"
[ -f "$RUN/delivered-base.safetensors" ] || python -m sdlab.tiny.assemble assemble "$RUN/assembled.safetensors" \
    "$RUN/delivered-base.safetensors" --vae "$RUN/vae-decoder/final.safetensors" --data "$RUN/data"
[ -f "$RUN/vae-decoder-v2/final.safetensors" ] || $SDLAB train --config "$RECIPE/vae_decoder_v2.toml" \
    --model "$RUN/delivered-base.safetensors" --data-dir "$RUN/data-v2" --output-dir "$RUN/vae-decoder-v2" \
    --resume latest --no-progress $TRAIN_ARGS
echo "== $(date +%T) v2: U-Net and text tower fine-tuned on data v2, from the third run's EMA weights"
run_unet unet_v2.toml "$RUN/unet3/final-ema.safetensors" "$RUN/data-v2" "$RUN/unet4" || exit 0
echo "== $(date +%T) v2.1: data v3 (what a caption leaves out is drawn at its default: large, center, white)"
build_v3_data "$RUN/data-v3" "$COUNT" 5 0.65 0.08
echo "== $(date +%T) v2.1: U-Net and text tower fine-tuned on data v3, from the v2 EMA weights"
run_unet unet_v3.toml "$RUN/unet4/final-ema.safetensors" "$RUN/data-v3" "$RUN/unet5" || exit 0
echo "== $(date +%T) v2.2: data v4 (data v3 on a new seed, colours sometimes spelt grey / violet / navy / ...)"
build_v3_data "$RUN/data-v4" "$COUNT" 6 0.65 0.08 --synonym-prob 0.3
echo "== $(date +%T) v2.2: U-Net and text tower fine-tuned on data v4, from the v2.1 EMA weights"
run_unet unet_v4.toml "$RUN/unet5/final-ema.safetensors" "$RUN/data-v4" "$RUN/unet6" || exit 0
echo "== $(date +%T) v2.3: data v5 (60000 pictures, three in four emoji, data v4's wording on a new seed)"
build_v3_data "$RUN/data-v5" 60000 7 0.75 0.08 --synonym-prob 0.3
echo "== $(date +%T) v2.3: U-Net and text tower fine-tuned on data v5, from the v2.2 EMA weights"
run_unet unet_v5.toml "$RUN/unet6/final-ema.safetensors" "$RUN/data-v5" "$RUN/unet7" || exit 0
echo "== $(date +%T) v2.4: U-Net and text tower fine-tuned again on data v5 (a new seed), from the v2.3 EMA weights"
run_unet unet_v6.toml "$RUN/unet7/final-ema.safetensors" "$RUN/data-v5" "$RUN/unet8" \
    --cache-dir "$RUN/unet7/latent_cache" || exit 0
echo "== $(date +%T) v2.4: data v6 (60000 new pictures, four in five emoji, one scene in eight with copies)"
build_v3_data "$RUN/data-v6" 60000 9 0.8 0.12 --synonym-prob 0.3
echo "== $(date +%T) v2.4: U-Net and text tower fine-tuned on data v6, from the first v2.4 run's EMA weights"
run_unet unet_v7.toml "$RUN/unet8/final-ema.safetensors" "$RUN/data-v6" "$RUN/unet9" || exit 0
echo "== $(date +%T) v2.5: data v8 (60000 new pictures, one scene in seven with copies, more everyday names)"
build_v3_data "$RUN/data-v8" 60000 11 0.8 0.15 --synonym-prob 0.3 --free-prob 0.65 --alias-prob 0.9
echo "== $(date +%T) v2.5: U-Net and text tower fine-tuned on data v8, from the v2.4 EMA weights"
run_unet unet_v8.toml "$RUN/unet9/final-ema.safetensors" "$RUN/data-v8" "$RUN/unet10" || exit 0
echo "== $(date +%T) four-step adapter (LCM-LoRA, rank 32), teacher = the v2.5 EMA weights (its LoRA off)"
run_unet lcd_lora.toml "$RUN/unet10/final-ema.safetensors" "$RUN/data-v8" "$RUN/lcd-lora" \
    --cache-dir "$RUN/unet10/latent_cache" || exit 0
echo "== $(date +%T) latent consistency distillation for four steps, teacher = the v2.4 EMA weights"
run_unet lcd.toml "$RUN/unet9/final-ema.safetensors" "$RUN/data-v6" "$RUN/lcd" \
    --cache-dir "$RUN/unet9/latent_cache" || exit 0
echo "== $(date +%T) U-Net finished"
