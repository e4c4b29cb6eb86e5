"""fairhuman_utils.FairUpdate: the object the training loop calls in place of accelerator.backward (issue 8).

Driven with a real (CPU) Accelerator on a small model whose "prediction" goes through three losses,
as the training loop drives it: per micro-batch ``no_sync`` + ``backward``, per optimizer step
``write_update``.
"""

import pytest
import torch

import fairhuman_utils as fh


class PredictionModel:
    """A small network, its prediction on a batch, and the three FairHuman losses of that prediction."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * 4 * 3 * 3))
        self.params = list(self.net.parameters())
        self.hand = torch.zeros(2, 1, 3, 3)
        self.hand[0, :, :2, :2] = 1
        self.face = torch.zeros(2, 1, 3, 3)
        self.face[1, :, 1:, 1:] = 1

    def batch(self, step):
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(4, 6, generator=generator)
        target = torch.randn(2, 4, 3, 3, generator=generator)
        pred = self.net(x).mean(0).view(2, 4, 3, 3)

        def loss_fn(p):
            return fh.fairhuman_losses(p, target, self.hand, self.face, local_loss_scale=5.0)

        return pred, loss_fn

    def grads(self):
        return [p.grad.detach().clone() for p in self.params]


def accelerator(accumulation=1):
    from accelerate import Accelerator

    return Accelerator(cpu=True, gradient_accumulation_steps=accumulation)


def run_steps(update, model, acc, steps, first_step=0):
    """Drive ``update`` as the training loop does; returns each step's logs and the .grad written."""
    history = []
    for step in range(first_step, first_step + steps):
        with update.no_sync(acc, model.net):
            pred, loss_fn = model.batch(step)
            losses = loss_fn(pred)
            update.backward(acc, losses, [True, True, True], loss_fn=loss_fn, model_pred=pred)
            logs = update.write_update(acc)
        history.append((logs, model.grads()))
        for p in model.params:
            p.grad = None
    return history


def test_global_and_equal_write_exactly_the_plain_gradients():
    acc = accelerator()
    for weighting, coefficients in (("global", [1.0, 0.0, 0.0]), ("equal", [1.0, 1.0, 1.0])):
        model = PredictionModel()
        update = fh.FairUpdate(model.params, weighting)
        assert not update.per_objective and update.gradients is None
        (logs, written), = run_steps(update, model, acc, 1)
        pred, loss_fn = model.batch(0)
        losses = loss_fn(pred)
        plain = torch.autograd.grad(losses[0] if weighting == "global" else losses.sum(), model.params)
        for a, b in zip(written, plain):
            assert torch.equal(a, b)  # bit for bit the plain diffusers update
        assert [logs[f"weight/{n}"] for n in fh.OBJECTIVES] == coefficients


def test_equal_with_static_region_weights_writes_the_weighted_sum():
    acc = accelerator()
    model = PredictionModel()
    update = fh.FairUpdate(model.params, "equal", region_weights=(0.07, 0.012))
    (logs, written), = run_steps(update, model, acc, 1)
    pred, loss_fn = model.batch(0)
    losses = loss_fn(pred)
    weighted = torch.autograd.grad(losses[0] + 0.07 * losses[1] + 0.012 * losses[2], model.params)
    for a, b in zip(written, weighted):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    assert [logs[f"weight/{n}"] for n in fh.OBJECTIVES] == pytest.approx([1.0, 0.07, 0.012])
    with pytest.raises(ValueError, match="static weights of weighting 'equal'"):
        fh.FairUpdate(model.params, "fair", region_weights=(2.0, 1.0))


def test_schedule_solves_every_interval_th_step():
    model = PredictionModel()
    update = fh.FairUpdate(model.params, "fair", update_interval=3)
    exact_steps = []
    for step, _ in enumerate(range(8)):
        exact_steps.append(update.exact_step)
        run_steps(update, model, accelerator(), 1, first_step=step)
    assert exact_steps == [True, False, False, True, False, False, True, False]
    assert update.step == 8
    assert fh.FairUpdate(model.params, "fair", update_interval=1).exact_step  # exact every step
    checked = fh.FairUpdate(model.params, "fair", update_interval=3, fidelity_check=True)
    run_steps(checked, model, accelerator(), 1)
    assert not checked.exact_step and checked.per_objective  # the fidelity check takes every step's rows


def test_no_sync_only_on_per_objective_steps():
    model = PredictionModel()
    acc = accelerator()
    calls = []
    acc.no_sync = lambda m: calls.append(m) or torch.enable_grad()  # records the request, does nothing
    update = fh.FairUpdate(model.params, "fair", update_interval=2)
    run_steps(update, model, acc, 4)  # enters update.no_sync once per step
    assert calls == [model.net, model.net]  # steps 0 and 2 solve exactly
    calls.clear()
    run_steps(fh.FairUpdate(model.params, "global"), model, acc, 2)
    assert calls == []  # one backward through accelerator.backward: DDP syncs as usual


def test_exact_step_writes_K_G_w():
    model = PredictionModel()
    update = fh.FairUpdate(model.params, "fair")
    (logs, written), = run_steps(update, model, accelerator(), 1)
    pred, loss_fn = model.batch(0)
    losses = loss_fn(pred)
    rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], model.params,
                                                                             retain_graph=True)])
                        for i in range(3)]).double()
    w = fh.solve_fair_weights(rows @ rows.T)
    expected = 3 * (w @ rows)
    combined = torch.cat([g.reshape(-1) for g in written]).double()
    assert (combined - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert [logs[f"weight/{n}"] for n in fh.OBJECTIVES] == pytest.approx((3 * w).tolist(), rel=1e-9)


@pytest.mark.parametrize("interval_weights", ["prediction", "reuse"])
def test_state_round_trip_mid_interval(interval_weights):
    """Save after step 5 of an interval of 4 (mid-interval), restore into a fresh object: the next steps'
    coefficients and updates are identical to an uninterrupted run."""
    acc = accelerator()
    straight_model = PredictionModel()
    straight = fh.FairUpdate(straight_model.params, "fair", update_interval=4, interval_weights=interval_weights)
    expected = run_steps(straight, straight_model, acc, 8)

    model = PredictionModel()
    first = fh.FairUpdate(model.params, "fair", update_interval=4, interval_weights=interval_weights)
    run_steps(first, model, acc, 5)
    state = first.state_dict()
    assert state["step"] == 5 and len(state["coefficients"]) == 3
    resumed = fh.FairUpdate(model.params, "fair", update_interval=4, interval_weights=interval_weights)
    resumed.load_state_dict(state)
    got = run_steps(resumed, model, acc, 3, first_step=5)
    for (logs_a, grads_a), (logs_b, grads_b) in zip(expected[5:], got):
        assert logs_a == logs_b
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # without the state a resumed run would solve exactly at once (no coefficients yet)
    assert fh.FairUpdate(model.params, "fair", update_interval=4).exact_step


def test_state_of_another_weighting_keeps_its_own_coefficients():
    model = PredictionModel()
    fair = fh.FairUpdate(model.params, "fair", update_interval=4)
    run_steps(fair, model, accelerator(), 2)
    equal = fh.FairUpdate(model.params, "equal")
    equal.load_state_dict(fair.state_dict())
    assert equal.step == 2 and equal.coefficients.tolist() == [1.0, 1.0, 1.0]
    fair_again = fh.FairUpdate(model.params, "fair", update_interval=4)
    fair_again.load_state_dict(equal.state_dict())
    assert fair_again.coefficients is None and fair_again.exact_step  # solves on its next step


def test_accumulation_sums_micro_batches_before_the_solve():
    """Two micro-batches of the same batch under accumulation 2 = one batch without accumulation."""
    one, two = PredictionModel(), PredictionModel()
    update_one = fh.FairUpdate(one.params, "fair")
    (logs_one, grads_one), = run_steps(update_one, one, accelerator(), 1)
    acc = accelerator(accumulation=2)
    update_two = fh.FairUpdate(two.params, "fair")
    for _ in range(2):
        pred, loss_fn = two.batch(0)
        update_two.backward(acc, loss_fn(pred), [True, True, True])
    logs_two = update_two.write_update(acc)
    assert logs_two == pytest.approx(logs_one, rel=1e-6)
    for a, b in zip(grads_one, two.grads()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("calibration", ["diagonal", "trace"])
def test_interval_steps_solve_on_the_calibrated_prediction_gram(calibration):
    """Exact step 0 sets one scale per objective, (G^T G)_ii / (V V^T)_ii ('diagonal') or the trace ratio
    for all ('trace'); step 1 solves on D^(1/2) V V^T D^(1/2) of its own batch; the fidelity check logs
    applied / exact weight per objective."""
    model = PredictionModel()
    update = fh.FairUpdate(model.params, "fair", update_interval=4, calibration=calibration, fidelity_check=True)
    history = run_steps(update, model, accelerator(), 2)
    pred, loss_fn = model.batch(0)
    losses = loss_fn(pred)
    rows = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], model.params,
                                                                             retain_graph=True)])
                        for i in range(3)]).double()
    exact, approx = rows @ rows.T, fh.prediction_space_gram(loss_fn, pred)
    if calibration == "diagonal":
        expected_scales = exact.diagonal() / approx.diagonal()
        assert expected_scales.max() > 1.05 * expected_scales.min()  # the objectives really differ here
    else:
        expected_scales = torch.full((3,), float(exact.trace() / approx.trace()), dtype=torch.float64)
    torch.testing.assert_close(update.gram_scale, expected_scales, rtol=1e-6, atol=0)
    pred1, loss_fn1 = model.batch(1)
    expected = fh.fair_coefficients(fh.calibrated_gram(fh.prediction_space_gram(loss_fn1, pred1), expected_scales))[1]
    logs = history[1][0]
    assert [logs[f"weight/{n}"] for n in fh.OBJECTIVES] == pytest.approx(expected.tolist(), rel=1e-6)
    ratios = [logs[f"fidelity/weight_ratio_{n}"] for n in fh.OBJECTIVES]
    assert all(r > 0 for r in ratios) and ratios != pytest.approx([1.0, 1.0, 1.0], abs=1e-9)
    with pytest.raises(ValueError, match="calibration"):
        fh.FairUpdate(model.params, "fair", calibration="nope")


# ---- lean buffers (issue 19): .grad is row 0, combination in place, region rows in bf16, nothing held between solves --


def reference_fair_update(params, losses, present):
    """The pre-issue-19 algorithm: a (K, P) float32 buffer, one backward per objective, a separate combined
    update ``buffer[0] * c_0 + sum_i c_i buffer[i]``. Returns the coefficients and the flat update."""
    rows = []
    for i in range(len(losses)):
        if present[i]:
            grads = torch.autograd.grad(losses[i], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        else:
            rows.append(torch.zeros(sum(p.numel() for p in params)))
    buffer = torch.stack(rows)
    gram = torch.zeros(3, 3, dtype=torch.float64)
    gram += buffer.double() @ buffer.double().T
    _, c = fh.fair_coefficients(gram)
    combined = buffer[0] * float(c[0])
    for row, ci in zip(buffer[1:], c[1:]):
        if float(ci) != 0:
            combined.add_(row, alpha=float(ci))
    return c, combined


@pytest.mark.parametrize("present", [[True, True, True], [True, False, True]])
def test_float32_rows_give_the_same_update_as_one_float32_buffer(present):
    model = PredictionModel(3)
    update = fh.FairUpdate(model.params, "fair")
    acc = accelerator()
    for step in range(3):
        pred, loss_fn = model.batch(step)
        expected_c, expected = reference_fair_update(model.params, loss_fn(pred), present)
        with update.no_sync(acc, model.net):
            pred, loss_fn = model.batch(step)
            update.backward(acc, loss_fn(pred), present)
            update.write_update(acc)
        written = torch.cat([p.grad.reshape(-1) for p in model.params])
        torch.testing.assert_close(written, expected, rtol=1e-6, atol=0)  # float32 rounding (Gram summed per parameter)
        torch.testing.assert_close(update.coefficients, expected_c, rtol=1e-12, atol=0)
        for p in model.params:
            p.grad = None


def test_grad_is_row_zero_and_no_rows_are_held_after_the_update():
    model = PredictionModel(4)
    update = fh.FairUpdate(model.params, "fair", row_dtype=torch.bfloat16, update_interval=2)
    acc = accelerator()
    pred, loss_fn = model.batch(0)
    with update.no_sync(acc, model.net):
        update.backward(acc, loss_fn(pred), [True, True, True], loss_fn=loss_fn, model_pred=pred)
    rows = update.gradients.rows
    assert {t.dtype for t in rows[0]} == {torch.float32} and {t.dtype for t in rows[1] + rows[2]} == {torch.bfloat16}
    assert all(p.grad is None for p in model.params)  # accumulated into the rows only
    row0 = [t.data_ptr() for t in rows[0]]
    del rows
    update.write_update(acc)
    assert update.gradients.rows is None  # dropped: nothing held until the next solve
    assert [p.grad.data_ptr() for p in model.params] == row0  # the update IS row 0, written in place
    for p in model.params:
        p.grad = None
    # a step between solves: one plain backward, no rows allocated at all
    pred, loss_fn = model.batch(1)
    update.backward(acc, loss_fn(pred), [True, True, True], loss_fn=loss_fn, model_pred=pred)
    assert update.gradients.rows is None and all(p.grad is not None for p in model.params)


def test_bfloat16_rows_solve_the_same_weights_to_bfloat16_rounding():
    """Same gradients, float32 vs bfloat16 region rows (micro-batches accumulated through the hook): the
    solved weights and the update agree to bf16 rounding (relative 2^-8 per number)."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = PredictionModel(5)
        update = fh.FairUpdate(model.params, "fair", row_dtype=dtype)
        acc = accelerator(accumulation=2)
        for micro in range(2):
            with acc.accumulate(model.net), update.no_sync(acc, model.net):
                pred, loss_fn = model.batch(micro)
                update.backward(acc, loss_fn(pred), [True, True, True])
        update.write_update(acc)
        results[dtype] = (update.coefficients.clone(), torch.cat([g.reshape(-1) for g in model.grads()]))
    (c32, u32), (c16, u16) = results[torch.float32], results[torch.bfloat16]
    weight_error = float(((c16 - c32).abs() / c32.abs()).max())
    update_error = float((u16 - u32).norm() / u32.norm())
    assert 0 < weight_error < 2**-8 and 0 < update_error < 2**-8
