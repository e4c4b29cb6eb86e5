#!/usr/bin/env bash
# The embedded default: set up .venv (if missing; and the detector extra if missing), build tiny SD, SDXL, FLUX.1,
# SD3, Z-Image, Qwen-Image, FLUX.2 klein and Chroma models and a small drawn-people dataset offline, and train a FairHuman LoRA on one of them on the CPU.
#   bash demo.sh                 # tiny SD (default), into demo_output/
#   FAMILY=flux bash demo.sh     # or: bash demo.sh --family flux ; families: sd, sdxl, flux, sd3, zimage, qwenimage,
#                                # flux2klein, chroma (demo_output-flux/ ...)
# Output: LoRA, checkpoints, mask previews, model card, a sample image. Other arguments go to the training script.
set -euo pipefail
cd "$(dirname "$0")"
FAMILY="${FAMILY:-sd}"
if [ "${1:-}" = "--family" ]; then FAMILY="$2"; shift 2; fi
case "$FAMILY" in
  sd|sdxl) extra=() ;;
  flux|sd3|chroma) extra=(--max_sequence_length 32) ;;  # the tiny T5 reads characters: 32 tokens hold the demo captions
  zimage|qwenimage|flux2klein) extra=(--max_sequence_length 256) ;;  # the tiny Qwen tokenizer reads bytes (and the template)
  *) echo "error: FAMILY must be sd, sdxl, flux, sd3, zimage, qwenimage, flux2klein or chroma, got '$FAMILY'" >&2; exit 2 ;;
esac
OUT=demo_output
[ "$FAMILY" = sd ] || OUT="demo_output-$FAMILY"  # its own folder: a run resumes only its own family's checkpoints
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
fi
# The detector extra (prepare_fairhuman_dataset.py --input_dir, evaluate_fairhuman.py and their tests), as
# .ci/run installs it: --no-deps, see requirements-prepare.txt. With it, `pytest tests -q` skips nothing.
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("mediapipe") is None)'; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-prepare.txt
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -d "demo_assets/tiny-$FAMILY" ] || .venv/bin/python fairhuman_demo.py --output_dir demo_assets --families "$FAMILY"
.venv/bin/accelerate launch --config_file accelerate_config.yaml train_fairhuman_lora.py \
  --pretrained_model_name_or_path "demo_assets/tiny-$FAMILY" \
  --train_data_dir demo_assets/demo_dataset \
  --output_dir "$OUT" \
  --resolution 64 --mask_dilation 2 --random_flip \
  --train_batch_size 2 --max_train_steps 40 --learning_rate 1e-3 \
  --checkpointing_steps 20 --checkpoints_total_limit 2 \
  --use_8bit_adam --seed 42 --save_mask_previews 4 \
  --validation_prompt "a photo of a person waving 2 hands" --num_validation_images 1 \
  --validation_steps 20 --validation_inference_steps 10 --resume_from_checkpoint latest ${extra[@]+"${extra[@]}"} "$@"
case "$FAMILY" in
  zimage|qwenimage) echo "LoRA ($FAMILY): $OUT/pytorch_lora_weights.safetensors (diffusers and ComfyUI), card: $OUT/README.md, previews: $OUT/mask_previews/" ;;
  *) echo "LoRA ($FAMILY): $OUT/pytorch_lora_weights.safetensors (diffusers), $OUT/$OUT.safetensors (ComfyUI$([ "$FAMILY" = sd ] || [ "$FAMILY" = sdxl ] && echo /A1111/Forge)), card: $OUT/README.md, previews: $OUT/mask_previews/" ;;
esac
