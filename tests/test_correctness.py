"""The fair update stays correct under accumulation, several processes, mixed precision,
gradient checkpointing, interruption and non-finite steps (issue 3), with aspect-ratio buckets (issue 10).

Every equivalence is checked on the LoRA the script writes, against one reference run:
batch 2, 12 optimizer steps, --weighting fair with the exact solve every step (--fair_update_interval 1),
same seed and data. The data: 10 drawn people of 4 aspect ratios, which the tiny model's buckets (32^2
pixels, 4 px steps) hold as 5 (40x24), 3 (24x40) and 2 (32x32) images: the last global batch of two
buckets is filled with a repeat.
"""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    OFFLINE_ENV,
    REPO,
    assert_same_lora,
    lora_tensors,
    run_main,
    run_two_processes,
    three_objective_model,
)

import checkpoints
import fairhuman_utils as fh
import train_fairhuman_lora as train
from fairhuman_demo import read_scalars

STEPS = 12


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    import fairhuman_demo

    return fairhuman_demo.build_demo_dataset(str(tmp_path_factory.mktemp("data") / "mixed"), num_images=10)


def base_args(model, data, out, *extra):
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--learning_rate", "1e-3", "--seed", "5", "--report_to", "none", "--checkpointing_steps", "100",
            "--fair_update_interval", "1", "--save_precision", "fp32",  # compare the LoRAs as trained, not fp16 copies
            "--mask_dilation", "3",  # training pixels at 32 px (the default 8 is meant at 1024 px)
            *extra]  # exact MPD every step unless a test says otherwise
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def reference(tiny_sd, mixed_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference") / "run")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--max_train_steps", STEPS))
    return out


def test_accumulation_equals_the_larger_batch(reference, tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "accum")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 1, "--gradient_accumulation_steps", 2,
                        "--max_train_steps", STEPS))
    assert_same_lora(reference, out)


def test_accumulation_is_not_a_per_micro_batch_solve(reference, tiny_sd, mixed_dataset, tmp_path):
    """Guard: batch 1 without accumulation (a solve per example) must NOT match the reference."""
    out = str(tmp_path / "batch1")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 1, "--max_train_steps", 2 * STEPS))
    a, b = lora_tensors(reference), lora_tensors(out)
    assert max((a[k] - b[k]).abs().max() for k in a) > 1e-3


def test_gradient_checkpointing_gives_the_same_lora(reference, tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "ckpt")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--max_train_steps", STEPS,
                        "--gradient_checkpointing"))
    assert_same_lora(reference, out)


def test_two_processes_equal_one_process(reference, tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_two_processes(base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 1, "--max_train_steps", STEPS,
                                       "--checkpointing_steps", 6, "--report_to", "tensorboard"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "total batch = 2" in proc.stderr  # really two processes of batch 1
    assert "Aspect-ratio buckets: 3 of" in proc.stderr and "2 repeated examples per epoch" in proc.stderr
    assert_same_lora(reference, out)
    # checkpoints, logs and the card are written once
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-12", "checkpoint-6"]
    events = [f for _, _, files in os.walk(os.path.join(out, "logs")) for f in files if "tfevents" in f]
    assert len([e for e in events if not e.endswith((".1", ".2"))]) == 1
    assert proc.stderr.count("Saved the LoRA") == 1


def test_fp16_on_cpu_says_so_once_and_runs_fp32(reference, tiny_sd, mixed_dataset, tmp_path, caplog):
    out = str(tmp_path / "fp16")
    with caplog.at_level(logging.WARNING):
        run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--max_train_steps", STEPS,
                            "--mixed_precision", "fp16"))
    assert sum("fp16 mixed precision needs a GPU" in r.getMessage() for r in caplog.records) == 1
    assert_same_lora(reference, out, atol=0)


def test_bf16_keeps_lora_fp32_through_validation_and_resume(tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "bf16")
    common = base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--mixed_precision", "bf16",
                       "--checkpointing_steps", 1, "--validation_prompt", "a person", "--validation_steps", 1,
                       "--num_validation_images", 1, "--validation_inference_steps", 2, "--save_precision", "fp16")
    run_main(*common, "--max_train_steps", 2)
    run_main(*common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    # a checkpoint's LoRA file holds the parameters as they are: written after validations, before and after resume
    for folder in (os.path.join(out, "checkpoint-2"), os.path.join(out, "checkpoint-4")):
        tensors = lora_tensors(folder)
        assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    final = lora_tensors(out)  # the final file in --save_precision
    assert final.keys() == tensors.keys() and all(t.dtype == torch.float16 and torch.isfinite(t).all()
                                                  for t in final.values())
    key = next(iter(tensors))
    assert (lora_tensors(os.path.join(out, "checkpoint-2"))[key] != tensors[key]).any()


def test_sigkill_mid_training_then_resume_gives_the_same_lora(reference, tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_config.yaml"), os.path.join(REPO, "train_fairhuman_lora.py")]
    run = base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--checkpointing_steps", 2)
    proc = subprocess.Popen([*cmd, *run, "--max_train_steps", "400"], cwd=REPO, env=OFFLINE_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(out, "checkpoint-4", checkpoints.CHECKPOINT_MARKER)):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    latest = checkpoints.list_checkpoints(out)[-1][0]
    assert 4 <= latest < STEPS
    done = subprocess.run([*cmd, *run, "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest"], cwd=REPO,
                          env=OFFLINE_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    assert f"Resumed from {os.path.join(out, f'checkpoint-{latest}')}" in done.stderr
    assert_same_lora(reference, out)


def test_a_non_finite_step_is_skipped_and_counted(tiny_sd, mixed_dataset, tmp_path, monkeypatch, caplog):
    """Fault injection: the second micro-batch's losses are NaN."""
    calls = {"n": 0}
    real = fh.fairhuman_losses

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        return losses * float("nan") if calls["n"] == 2 else losses

    monkeypatch.setattr(train.fh, "fairhuman_losses", sometimes_nan)
    out = str(tmp_path / "nan")
    with caplog.at_level(logging.WARNING):
        run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--max_train_steps", 4,
                            "--report_to", "tensorboard"))
    assert any("step 2: non-finite loss or gradients, step skipped (1 in a row, 1 in all)" in r.getMessage()
               for r in caplog.records)
    assert read_scalars(out)["skipped_steps"] == [0, 1, 1, 1]
    assert all(torch.isfinite(t).all() for t in lora_tensors(out).values())


def test_many_non_finite_steps_in_a_row_stop_the_run(tiny_sd, mixed_dataset, tmp_path, monkeypatch):
    real = fh.fairhuman_losses
    monkeypatch.setattr(train.fh, "fairhuman_losses", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(train.TrainingStopped, match="3 optimizer steps in a row had non-finite.*--learning_rate"):
        run_main(*base_args(tiny_sd, mixed_dataset, str(tmp_path / "o"), "--max_train_steps", 10,
                            "--max_nonfinite_steps", 3))


# ---- fp16 loss scaling: the weights ignore the scale, overflow is skipped as the scaler skips it -------


def test_weights_do_not_change_with_the_loss_scale():
    params, losses = three_objective_model()
    grads = fh.ObjectiveGradients(params)
    results = []
    for scale in (1.0, 2.0**8, 2.0**16):
        grads.accumulate(losses() * scale)
        coefficients = grads.fair_update(2.0, grad_scale=scale).applied
        results.append((coefficients, [p.grad / scale for p in params]))
    for coefficients, unscaled in results[1:]:
        torch.testing.assert_close(coefficients, results[0][0], rtol=1e-6, atol=0)
        for a, b in zip(unscaled, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # on the scaled Gram the weights would be wrong by scale^(-4/3):
    grads.accumulate(losses() * 2.0**8)
    w_wrong = fh.solve_fair_weights(grads.gram())
    assert not torch.allclose(w_wrong * 3, results[0][0], rtol=1e-2)


def test_overflow_is_skipped_by_the_grad_scaler():
    params, losses = three_objective_model()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    grads = fh.ObjectiveGradients(params)
    overflowing = losses() * torch.tensor([1.0, float("inf"), 1.0])
    grads.accumulate(scaler.scale(overflowing))
    coefficients = grads.fair_update(2.0, grad_scale=scaler.get_scale()).applied
    assert torch.isnan(coefficients).all()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**9  # lowered, as for any overflow
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the step was skipped
    # and the next, finite step goes through with the new scale
    grads.accumulate(scaler.scale(losses()))
    grads.fair_update(2.0, grad_scale=scaler.get_scale())
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


# ---- the cheaper fair modes (issue 4) --------------------------------------------------------------


def test_batched_backward_gives_the_same_lora(reference, tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "batched")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--max_train_steps", STEPS,
                        "--fair_batched_backward"))
    assert_same_lora(reference, out)


@pytest.mark.parametrize("weights", ["reuse", "prediction"])
def test_fair_update_interval_logs_and_resumes_mid_period(weights, tiny_sd, mixed_dataset, tmp_path):
    common = ["--train_batch_size", 2, "--fair_update_interval", 4, "--fair_interval_weights", weights,
              "--report_to", "tensorboard", "--checkpointing_steps", 2]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    run_main(*base_args(tiny_sd, mixed_dataset, straight, *common, "--max_train_steps", 7))
    run_main(*base_args(tiny_sd, mixed_dataset, resumed, *common, "--max_train_steps", 6))  # ends mid-period
    run_main(*base_args(tiny_sd, mixed_dataset, resumed, *common, "--max_train_steps", 7,
                        "--resume_from_checkpoint", "latest"))
    assert_same_lora(straight, resumed, atol=1e-6)  # the coefficients between solves travel in the checkpoint
    w = read_scalars(straight)["weight/global"]
    assert all(v > 0 for v in w)
    if weights == "reuse":  # solved at steps 1 and 5, reused in between
        assert w[0] == w[1] == w[2] == w[3] and w[4] == w[5] == w[6] and w[4] != w[3]
    else:  # re-solved every step on the prediction-space Gram
        assert len(set(w[:4])) == 4


def test_fidelity_check_logs_cosine_and_error(tiny_sd, mixed_dataset, tmp_path):
    out = str(tmp_path / "fidelity")
    run_main(*base_args(tiny_sd, mixed_dataset, out, "--train_batch_size", 2, "--fair_update_interval", 4,
                        "--fair_fidelity_check", "--max_train_steps", 8, "--report_to", "tensorboard"))
    scalars = read_scalars(out)
    cosine, error = scalars["fidelity/update_cosine"], scalars["fidelity/weight_rel_error"]
    assert len(cosine) == 6 and all(-1 <= c <= 1 + 1e-9 for c in cosine) and all(e >= 0 for e in error)
    assert sum(c > 0.5 for c in cosine) >= 4
    # the applied (prediction-space) weights are compared with the exact ones solved alongside: close, not equal
    assert any(e > 1e-6 for e in error) and any(c < 1 - 1e-9 for c in cosine)
    ratios = [scalars[f"fidelity/weight_ratio_{name}"] for name in ("global", "hand", "face")]
    assert all(len(r) == 6 for r in ratios)
    assert all(r > 0 for r in ratios[0])  # the global objective is always present


# ---- bucketed batching through accelerate's own wrappers (issue 10) -------------------------------------


def test_bucket_batches_are_split_over_processes_and_micro_batches_the_same_way():
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    buckets = [[0, 3, 6], [1, 4, 7, 9], [2], [5, 8]]
    bucket_of = {row: b for b, rows in enumerate(buckets) for row in rows}

    def steps(batch_size, processes, accumulation, epoch, skip=0):
        """The keys every optimizer step trains on, as accelerate hands them to the processes."""
        sampler = train.BucketBatchSampler(buckets, batch_size, processes * accumulation, seed=7)
        shards = [BatchSamplerShard(sampler, processes, p) for p in range(processes)]
        if skip:
            shards = [SkipBatchSampler(shard, skip) for shard in shards]
        sampler.set_epoch(epoch)
        per_process = [list(shard) for shard in shards]
        assert len({len(batches) for batches in per_process}) == 1
        assert len(per_process[0]) == (sampler.global_batches_per_epoch * accumulation) - skip
        return [sorted(key for p in per_process for batch in p[i:i + accumulation] for key in batch)
                for i in range(0, len(per_process[0]), accumulation)]

    reference = steps(4, 1, 1, epoch=3)
    assert reference == steps(2, 2, 1, epoch=3) == steps(1, 2, 2, epoch=3) == steps(1, 1, 4, epoch=3)
    assert reference != steps(4, 1, 1, epoch=4)  # a new order every epoch
    assert steps(1, 2, 2, epoch=3, skip=2) == reference[1:]  # resume: skip_first_batches' sampler
    assert len(reference) == 1 + 1 + 1 + 1  # one global batch of 4 per bucket
    for keys in reference:
        assert len(keys) == 4 and len({bucket_of[row] for _, row, _ in keys}) == 1  # one bucket per step
        assert all(epoch == 3 for epoch, _, _ in keys)
    seen = [key for keys in reference for key in keys]
    assert {row for _, row, copy in seen if copy == 0} == set(range(10))  # every image, once as itself
    assert len(seen) == 16 and len(set(seen)) == 16  # 6 repeats, each with its own key (own random draws)
