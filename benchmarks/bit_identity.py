"""Byte-identity of the files a run writes, across two versions of the code.

Not a test: a refactoring check. It trains a fixed set of configurations (SD, SDXL, FLUX.1, SD3; exact,
interval, accumulation, resume, kohya + flip, K = 3 regions, both caches) on tiny models built ONCE (so both
versions train the same weights), and writes a manifest: the sha256 of every LoRA file, model card and
checkpoint file. Run it on each version of the code and compare the manifests:

    python benchmarks/bit_identity.py --assets /tmp/bitid/assets --out /tmp/bitid/before.json   # old tree
    python benchmarks/bit_identity.py --assets /tmp/bitid/assets --out /tmp/bitid/after.json    # new tree
    python benchmarks/bit_identity.py --compare /tmp/bitid/before.json /tmp/bitid/after.json

--repo names the tree whose training script runs (default: this one). The assets folder is built by this
tree's fairhuman_demo.py if it does not exist yet; pass the same folder to both runs.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMON = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "3",
          "--mask_dilation", "1"]
FLOW = ["--max_sequence_length", "32"]

# name -> (family, flags, resume_to): with resume_to the run stops at --max_train_steps and resumes to resume_to.
CONFIGS = {
    "sd_exact": ("sd", ["--max_train_steps", "4"], None),
    "sd_interval_accum_flip": ("sd", ["--max_train_steps", "6", "--fair_update_interval", "3",
                                      "--gradient_accumulation_steps", "2", "--random_flip"], None),
    "sd_kohya_flip": ("sd", ["--max_train_steps", "4", "--save_lora_format", "kohya", "--random_flip"], None),
    "sd_regions3": ("sd", ["--max_train_steps", "4", "--region", "hand=hand_boxes", "--region", "face=face_boxes",
                           "--region", "shoe=shoe_boxes"], None),
    "sdxl_exact": ("sdxl", ["--max_train_steps", "4"], None),
    "sdxl_resume": ("sdxl", ["--max_train_steps", "4", "--snr_gamma", "5", "--checkpointing_steps", "2"], 6),
    "flux_exact": ("flux", FLOW + ["--max_train_steps", "4"], None),
    "flux_cache_interval": ("flux", FLOW + ["--max_train_steps", "4", "--fair_update_interval", "2",
                                            "--cache_latents", "--cache_text_embeddings"], None),
    "sd3_resume": ("sd3", FLOW + ["--max_train_steps", "2", "--checkpointing_steps", "2"], 4),
    "sd3_accum": ("sd3", FLOW + ["--max_train_steps", "3", "--gradient_accumulation_steps", "2"], None),
}


def build_assets(assets: str) -> None:
    if os.path.isdir(os.path.join(assets, "demo_dataset")):
        return
    subprocess.run([sys.executable, os.path.join(HERE, "fairhuman_demo.py"), "--output_dir", assets,
                    "--families", "sd,sdxl,flux,sd3", "--num_images", "8", "--shoes"], check=True)


def run(repo: str, assets: str, work: str, name: str) -> dict:
    family, flags, resume_to = CONFIGS[name]
    out = os.path.join(work, name)
    base = [sys.executable, os.path.join(repo, "train_fairhuman_lora.py"),
            "--pretrained_model_name_or_path", os.path.join(assets, f"tiny-{family}"),
            "--train_data_dir", os.path.join(assets, "demo_dataset"), "--output_dir", out, *COMMON, *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(base, check=True, cwd=repo, env=env, stdout=subprocess.DEVNULL)
    if resume_to is not None:
        subprocess.run(base + ["--max_train_steps", str(resume_to), "--resume_from_checkpoint", "latest"],
                       check=True, cwd=repo, env=env, stdout=subprocess.DEVNULL)
    hashes = {}
    for root, _, files in os.walk(out):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), out)
            if rel.startswith("logs") or "events.out" in f:
                continue  # TensorBoard logs carry wall-clock times
            with open(os.path.join(root, f), "rb") as fh:
                hashes[rel] = hashlib.sha256(fh.read()).hexdigest()
    return hashes


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    bad = 0
    print("| configuration | files | identical | differing |")
    print("| --- | --- | --- | --- |")
    for name in a:
        fa, fb = a[name], b.get(name, {})
        same = [f for f in fa if fb.get(f) == fa[f]]
        diff = sorted(set(fa) ^ set(fb) | {f for f in fa if f in fb and fb[f] != fa[f]})
        bad += len(diff)
        print(f"| {name} | {len(fa)} | {len(same)} | {', '.join(diff) or '-'} |")
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default="/tmp/bitid/assets")
    p.add_argument("--repo", default=HERE)
    p.add_argument("--out")
    p.add_argument("--work", default=None, help="Where the runs write (default: beside --out).")
    p.add_argument("--only", default=None, help="Comma-separated configuration names.")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    build_assets(args.assets)
    work = args.work or os.path.splitext(args.out)[0] + "-runs"
    names = args.only.split(",") if args.only else list(CONFIGS)
    manifest = {}
    for name in names:
        t = time.time()
        manifest[name] = run(os.path.abspath(args.repo), os.path.abspath(args.assets), work, name)
        print(f"{name}: {len(manifest[name])} files, {time.time() - t:.0f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
