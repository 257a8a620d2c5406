"""OWLoRA continual adapters: freezing, gradient projection, penalty, earlier tasks unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pathopeft.adapters as pa

TARGETS = r"net\.(0|2)"


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
    model.forward = lambda x: model.net(x)  # type: ignore[method-assign]
    return model


def train(model: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor, steps: int = 5) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle = pa.owlora.projection_hook(opt, model, name)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).square().mean() + 1e-3 * pa.owlora.orthogonality_penalty(model, name)
        loss.backward()
        opt.step()
    handle.remove()


def layers(model: nn.Module, name: str):
    return [(n, layer.adapters[name]) for n, layer in pa.adapted_layers(model) if name in layer.adapters]


def test_new_task_is_orthogonal_and_earlier_tasks_unchanged() -> None:
    model = make_model()
    x, y1, y2 = torch.randn(32, 24), torch.randn(32, 16), torch.randn(32, 16)
    pa.attach(model, "owlora", targets=TARGETS, name="task1", rank=3, protect_base=False)
    train(model, "task1", x, y1)
    task1_out = model(x).detach()
    task1_state = {k: v.clone() for k, v in model.state_dict().items()}

    pa.attach(model, "owlora", targets=TARGETS, name="task2", rank=3)
    assert all(not p.requires_grad for _, a in layers(model, "task1") for p in a.parameters())
    assert all(p.requires_grad for _, a in layers(model, "task2") for p in a.parameters())
    info = pa.trainable_parameters(model)
    assert info["trainable"] == info["per_adapter"]["task2"] == 3 * (24 + 32) + 3 + 3 * (32 + 16) + 3
    initial = {n: (a.A.detach().clone(), a.B.detach().clone()) for n, a in layers(model, "task2")}

    # one backward, explicit projection: ∂A_2 ⟂ rows(A_1), ∂B_2 ⟂ cols(B_1)
    train(model, "task2", x, y2, steps=1)  # B_2 starts at 0, so ∂A_2 is 0 before a first step
    (model(x) - y2).square().mean().backward()
    raw = {n: (a.A.grad.clone(), a.B.grad.clone()) for n, a in layers(model, "task2")}
    assert pa.owlora.project_gradients(model, "task2") == 2
    for n, a in layers(model, "task2"):
        earlier = dict(layers(model, "task1"))[n]
        q_rows = torch.linalg.qr(earlier.A.detach().T).Q
        q_cols = torch.linalg.qr(earlier.B.detach()).Q
        assert (a.A.grad @ earlier.A.detach().T).abs().max() < 1e-5 * raw[n][0].abs().max()
        assert (earlier.B.detach().T @ a.B.grad).abs().max() < 1e-5 * raw[n][1].abs().max()
        # and nothing but that component was removed
        torch.testing.assert_close(a.A.grad, raw[n][0] - raw[n][0] @ q_rows @ q_rows.T, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a.B.grad, raw[n][1] - q_cols @ q_cols.T @ raw[n][1], atol=1e-6, rtol=1e-4)
        assert a.A.grad.abs().sum() > 0 and a.B.grad.abs().sum() > 0
    for p in model.parameters():
        p.grad = None

    train(model, "task2", x, y2)
    for n, a in layers(model, "task2"):  # the accumulated updates stay in the complements
        earlier = dict(layers(model, "task1"))[n]
        assert (earlier.B.detach().T @ a.B.detach()).abs().max() < 1e-4
        moved_a = a.A.detach() - initial[n][0]
        assert moved_a.abs().max() > 1e-3
        assert (moved_a @ earlier.A.detach().T).abs().max() < 1e-4
    for key, value in task1_state.items():  # base and task 1 untouched
        assert torch.equal(model.state_dict()[key], value), key
    pa.set_active(model, ["task1"])
    assert torch.equal(model(x).detach(), task1_out)
    pa.set_active(model, ["task1", "task2"])
    assert not torch.allclose(model(x), task1_out)


def test_protect_base_for_the_first_task() -> None:
    model = make_model()
    weight = model.net[0].weight.detach().clone()
    pa.attach(model, "owlora", targets=r"net\.0", name="t1", rank=2, base_energy=0.6)
    adapter = model.net[0].adapters["t1"]
    s = torch.linalg.svdvals(weight.double())
    k = int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.6).sum()) + 1
    assert adapter.row_basis.shape == (24, k) and adapter.col_basis.shape == (32, k)
    u, _, vh = torch.linalg.svd(weight.double())
    torch.testing.assert_close(adapter.row_basis.double().abs(), vh[:k].T.abs(), atol=1e-5, rtol=1e-4)
    (model(torch.randn(8, 24)) ** 2).sum().backward()
    pa.owlora.project_gradients(model, "t1")
    assert (adapter.A.grad.double() @ vh[:k].T).abs().max() < 1e-5
    assert (u[:, :k].T @ adapter.B.grad.double()).abs().max() < 1e-5
    off = make_model()
    pa.attach(off, "owlora", targets=r"net\.0", name="t1", rank=2, protect_base=False)
    assert off.net[0].adapters["t1"].row_basis.shape == (24, 0)


def test_orthogonality_penalty_formula() -> None:
    model = make_model()
    pa.attach(model, "owlora", targets=TARGETS, name="t1", rank=4, ortho_lambda=0.5, protect_base=False)
    with torch.no_grad():
        for _, a in layers(model, "t1"):
            a.B.normal_()
    manual = sum(
        ((a.A @ a.A.T - torch.eye(4)).square().sum() + (a.B.T @ a.B - torch.eye(4)).square().sum()) / 16
        for _, a in layers(model, "t1")
    )
    torch.testing.assert_close(pa.owlora.orthogonality_penalty(model, "t1"), 0.5 * manual)
    torch.testing.assert_close(pa.owlora.orthogonality_penalty(model, "t1", lam=2.0), 2.0 * manual)
    torch.testing.assert_close(pa.regularization(model), 0.5 * manual)
    pa.owlora.orthogonality_penalty(model, "t1").backward()
    assert all(a.A.grad is not None for _, a in layers(model, "t1"))
    with pytest.raises(pa.AdapterError, match="no OWLoRA adapter named 'nope'"):
        pa.owlora.orthogonality_penalty(model, "nope")


def test_weighted_delta_and_save_load_refreshes_projection(tmp_path) -> None:
    model = make_model()
    x = torch.randn(5, 24)
    pa.attach(model, "owlora", targets=TARGETS, name="t1", rank=3, protect_base=False)
    with torch.no_grad():
        for _, a in layers(model, "t1"):
            a.B.normal_()
            a.w.uniform_(0.5, 1.5)
    layer = model.net[0]
    a = layer.adapters["t1"]
    torch.testing.assert_close(a.delta_weight(), a.B @ torch.diag(a.w) @ a.A)
    pa.attach(model, "owlora", targets=TARGETS, name="t2", rank=3)
    out = model(x).detach()
    pa.save(model, tmp_path / "t1", name="t1")
    pa.save(model, tmp_path / "t2", name="t2")
    fresh = make_model()
    assert pa.load(fresh, tmp_path / "t1") == "t1"
    assert pa.load(fresh, tmp_path / "t2", trainable=True) == "t2"
    assert torch.equal(fresh(x), out)
    restored = fresh.net[0].adapters["t2"]
    torch.testing.assert_close(restored.row_basis, model.net[0].adapters["t2"].row_basis)
    assert restored.row_basis.shape == (24, 3)


def _two_tasks(optimizer: str, mode: str) -> float:
    """Largest |B_1ᵀ B_2| after training task 2 with the given optimizer and projection mode."""
    model = make_model()
    x, y = torch.randn(32, 24), torch.randn(32, 16)
    pa.attach(model, "owlora", targets=r"net\.0", name="t1", rank=3, protect_base=False)
    with torch.no_grad():
        model.net[0].adapters["t1"].B.normal_()
    pa.attach(model, "owlora", targets=r"net\.0", name="t2", rank=3)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05) if optimizer == "sgd" else torch.optim.Adam(params, lr=0.05)
    if mode != "explicit":
        pa.owlora.projection_hook(opt, model, "t2", project_updates=mode == "hook+updates")
    for _ in range(4):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if mode == "explicit":
            pa.owlora.project_gradients(model, "t2")
        opt.step()
    layer = model.net[0]
    return float((layer.adapters["t1"].B.T @ layer.adapters["t2"].B).detach().abs().max())


def test_projection_with_sgd_and_adam() -> None:
    assert _two_tasks("sgd", "explicit") < 1e-5  # METHODS.md's gradient projection suffices for SGD
    assert _two_tasks("adam", "hook+updates") < 1e-5  # the hook's update projection covers Adam
    assert _two_tasks("adam", "hook") > 1e-3  # ... which projected gradients alone do not
