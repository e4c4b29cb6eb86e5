#!/usr/bin/env bash
# The embedded default: set up .venv (if missing; and the detector extra if missing), build a tiny SD model and a
# small drawn-people dataset offline, and train a FairHuman LoRA on it on the CPU. Output: demo_output/ (LoRA,
# checkpoints, mask previews, model card, a sample image). Extra arguments go to the script.
set -euo pipefail
cd "$(dirname "$0")"
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
[ -d demo_assets/tiny-sd ] || .venv/bin/python fairhuman_demo.py --output_dir demo_assets
.venv/bin/accelerate launch --config_file accelerate_config.yaml train_fairhuman_lora.py \
  --pretrained_model_name_or_path demo_assets/tiny-sd \
  --train_data_dir demo_assets/demo_dataset \
  --output_dir demo_output \
  --resolution 64 --mask_dilation 2 --random_flip \
  --train_batch_size 2 --max_train_steps 40 --learning_rate 1e-3 \
  --checkpointing_steps 20 --checkpoints_total_limit 2 \
  --use_8bit_adam --seed 42 --save_mask_previews 4 \
  --validation_prompt "a photo of a person waving 2 hands" --num_validation_images 1 \
  --validation_steps 20 --validation_inference_steps 10 --resume_from_checkpoint latest "$@"
echo "LoRA: demo_output/pytorch_lora_weights.safetensors (diffusers), demo_output/demo_output.safetensors (ComfyUI/A1111/Forge), card: demo_output/README.md, previews: demo_output/mask_previews/"
