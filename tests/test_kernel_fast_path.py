"""The eager fast path of ``BlockSparseLinear`` (no dispatcher) and activation fusion in SubNets.

The fast path must give what the op gives, and must step aside wherever something has to see the
op (dispatch / function modes such as FLOP counters, tracing, autograd). Fusion moves the ReLU /
GELU that a parent applies right after a converted Linear into the kernel's epilogue, only where
the parent then computes the same, and survives export / reload.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dipgo.kernels import BlockSparseLinear, native
from dipgo.kernels.bench import random_block_sparse
from dipgo.kernels.ops import block_sparse_linear, eager_fast_path_ok
from dipgo.postprocess.mask_subnet import activation_kind, export_mask_subnet, load_mask_subnet, to_kernels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def kernel() -> native.NativeKernel:
    k = native.load()
    if k is None:
        pytest.skip("native kernel unavailable here: there is no fast path to test")
    return k


class OpNames(TorchDispatchMode):
    """Records every op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer(act: str = "gelu") -> BlockSparseLinear:
    _, packed = random_block_sparse(96, 64, 0.5, (32, 32), seed=4)
    return BlockSparseLinear(packed, torch.randn(96), act)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_fast_path_equals_the_op(kernel, act):
    layer = _layer(act)
    x = torch.randn(2, 37, 64)
    with torch.inference_mode():
        fast = layer(x)
        op = block_sparse_linear(x, layer.values, layer.col_indices, layer.row_ptr, layer.bias, act)
    assert fast.shape == (2, 37, 96)
    assert torch.equal(fast, op)  # the same native kernel on the same data


def test_fast_path_steps_aside_for_dispatch_modes_and_autograd(kernel):
    layer = _layer()
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert eager_fast_path_ok(x)
        mode = OpNames()
        with mode:
            y = layer(x)
    assert any("dipgo.block_sparse_linear" in n for n in mode.names)  # the mode saw the op
    assert torch.equal(y, layer(x))
    grad_x = torch.randn(5, 64, requires_grad=True)
    assert not eager_fast_path_ok(grad_x)
    with torch.no_grad():
        assert eager_fast_path_ok(grad_x)
    assert not eager_fast_path_ok(x.double()) and not eager_fast_path_ok(x.to(torch.bfloat16))


def test_fast_path_refuses_swapped_buffers_instead_of_reading_out_of_bounds(kernel):
    layer = _layer("none")
    x = torch.randn(4, 64)
    ref = layer(x)
    layer.col_indices = layer.col_indices.long()  # int64 indices: the C side would misread them
    with pytest.raises(ValueError, match="int32"):
        layer(x)  # the op's checks run instead
    layer.col_indices = layer.col_indices.int()
    assert torch.equal(layer(x), ref)


def test_activation_kind_recognises_relu_and_exact_gelu_only():
    from transformers.activations import ACT2FN

    assert activation_kind(nn.ReLU()) == "relu"
    assert activation_kind(nn.GELU()) == "gelu"
    assert activation_kind(ACT2FN["gelu"]) == "gelu"
    assert activation_kind(nn.GELU(approximate="tanh")) is None
    assert activation_kind(ACT2FN["gelu_new"]) is None
    assert activation_kind(nn.SiLU()) is None
    assert activation_kind(nn.Identity()) is None


class Mlp(nn.Module):
    """timm's Mlp shape: fc1 -> act -> fc2."""

    def __init__(self, act: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 128), act or nn.GELU(), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GluMlp(Mlp):
    """fc1's output is split before the activation: fusing it into fc1 would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * self.act(b))


def _masks(model: nn.Module, names: list[str], sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    masks = {}
    for n in names:
        w = model.get_submodule(n).weight
        keep = torch.rand(w.shape[0] // 32, w.shape[1] // 32, generator=gen) >= sparsity
        keep[0, 0] = True
        masks[n] = keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
        with torch.no_grad():
            w.mul_(masks[n])
    return masks


def test_activation_after_fc1_is_fused_and_reloads(kernel, tmp_path: Path):
    torch.manual_seed(0)
    model = nn.Sequential(Mlp(), Mlp(nn.ReLU())).eval()
    masks = _masks(model, ["0.fc1", "0.fc2", "1.fc1"])
    x = torch.randn(7, 64)
    with torch.inference_mode():
        ref = model(x)
    kern = copy.deepcopy(model)
    report = to_kernels(kern, masks, (32, 32), force=True)
    assert report["0.fc1"]["fused_activation"] == "gelu" and report["1.fc1"]["fused_activation"] == "relu"
    assert report["0.fc2"]["fused_activation"] is None  # nothing follows fc2 inside the Mlp
    assert kern[0].fc1.activation == "gelu" and isinstance(kern[0].act, nn.Identity)
    assert kern[1].fc1.activation == "relu" and isinstance(kern[1].act, nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(kern(x), ref, rtol=1e-4, atol=1e-5)

    from dipgo.postprocess.plan import Plan

    plan = Plan(kind="mask", model="Sequential", blocks=list(masks), compute=[[True, True, True]], target=0.5,
                cost_ratio=0.5)
    export_mask_subnet(kern, plan, tmp_path / "sub")
    fresh = nn.Sequential(Mlp(), Mlp(nn.ReLU())).eval()
    loaded = load_mask_subnet(tmp_path / "sub", model=fresh)
    assert isinstance(loaded[0].act, nn.Identity) and loaded[0].fc1.activation == "gelu"
    with torch.inference_mode():
        assert torch.equal(loaded(x), kern(x))


def test_activation_is_not_fused_where_the_parent_does_not_apply_it_right_after(kernel):
    torch.manual_seed(0)
    model = GluMlp().eval()
    masks = _masks(model, ["fc1"])
    x = torch.randn(5, 64)
    with torch.inference_mode():
        ref = model(x)
    report = to_kernels(model, masks, (32, 32), force=True)
    assert report["fc1"]["converted"] and report["fc1"]["fused_activation"] is None
    assert isinstance(model.fc1, BlockSparseLinear) and model.fc1.activation == "none"
    assert isinstance(model.act, nn.GELU)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_shared_activation_module_is_not_fused(kernel):
    torch.manual_seed(0)
    shared = nn.GELU()
    model = nn.Sequential(Mlp(shared), Mlp(shared)).eval()
    masks = _masks(model, ["0.fc1"])
    report = to_kernels(model, masks, (32, 32), force=True)
    assert report["0.fc1"]["fused_activation"] is None and model[0].act is shared


def test_bert_intermediate_gelu_is_fused_in_a_transformers_model(kernel, tmp_path: Path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=128, vocab_size=100)).eval()
    names = [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]
    masks = _masks(model, names)
    ids = torch.randint(0, 100, (2, 9))
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state
    report = to_kernels(model, masks, (32, 32), force=True)
    assert all(report[n]["fused_activation"] == "gelu" for n in names)
    assert isinstance(model.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)


def test_decision_times_the_fused_kernel_against_dense_plus_activation(kernel, tmp_path, monkeypatch):
    from dipgo.kernels.decide import decide_layer

    monkeypatch.setenv("DIPGO_CACHE", str(tmp_path))
    layer = _layer("none")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}

    def timer(fns):
        for name, fn in fns.items():
            seen[name] = fn()
        return {name: (1.0 if name == "kernel" else 2.0) for name in fns}

    choice = decide_layer(layer.weight, layer.bias, 64, timer=timer, activation="gelu")
    assert choice.kernel and set(seen) >= {"kernel", "mkl"}
    dense = F.gelu(F.linear(x, layer.weight.to_dense(), layer.bias))
    for name in seen:  # every variant timed computes the layer *with* its activation
        torch.testing.assert_close(seen[name], dense, rtol=1e-4, atol=1e-5)
    # another activation is another cache entry, not a reuse of the GELU timing
    other = decide_layer(layer.weight, layer.bias, 64, timer=lambda fns: {n: 1.0 for n in fns}, activation="none")
    assert not other.cached and not other.kernel


def test_prepared_call_follows_swapped_and_reloaded_buffers(kernel):
    """The layer prepares its kernel call once per buffer set: replacing a buffer, loading a state
    dict with another block count, or copying new values in place must all be seen (no stale
    pointers), and the prepared call is rebuilt after native.reset() and never copied."""
    layer = _layer("relu")
    x = torch.randn(3, 5, 64)

    def op(m: BlockSparseLinear) -> torch.Tensor:
        return block_sparse_linear(x, m.values, m.col_indices, m.row_ptr, m.bias, m.activation)

    with torch.inference_mode():
        assert torch.equal(layer(x), op(layer))
        first = layer.__dict__["_eager_call"]
        assert layer(x) is not None and layer.__dict__["_eager_call"] is first  # reused while current
        _, other = random_block_sparse(96, 64, 0.75, (32, 32), seed=9)
        layer.load_state_dict({"values": other.values, "col_indices": other.col_indices,
                               "row_ptr": other.row_ptr, "bias": torch.randn(96)})
        assert layer.values.shape[0] == other.values.shape[0] != first.tensors[0].shape[0]
        assert torch.equal(layer(x), op(layer))
        layer.values.mul_(2.0)  # in place: same storage, new numbers
        assert torch.equal(layer(x), op(layer))
        layer.bias = None
        assert torch.equal(layer(x), op(layer))
        native.reset()
        try:
            y = layer(x)
            assert layer.__dict__["_eager_call"].generation == native._generation
            assert torch.equal(y, op(layer))
        finally:
            native.reset()
    clone = copy.deepcopy(layer)
    assert "_eager_call" not in clone.__dict__
    with torch.inference_mode():
        assert torch.equal(clone(x), layer(x))


def test_prepared_call_takes_strided_inputs(kernel):
    layer = _layer("gelu")
    base = torch.randn(6, 2, 130)
    for x in (base[:, 0, 1:65], base[..., ::2][..., :64], torch.randn(64, 11).t(), torch.randn(0, 64),
              torch.randn(4, 1, 64).expand(4, 3, 64)):
        with torch.inference_mode():
            y = layer(x)
            ref = block_sparse_linear(x, layer.values, layer.col_indices, layer.row_ptr, layer.bias, "gelu")
        assert y.shape == (*x.shape[:-1], 96) and torch.equal(y, ref)


def test_fast_path_is_off_when_the_kernel_is_disabled_after_a_reset(kernel, monkeypatch):
    layer = _layer("none")
    x = torch.randn(4, 64)
    with torch.inference_mode():
        ref = layer(x)
        monkeypatch.setenv("DIPGO_NATIVE_KERNELS", "0")
        native.reset()
        try:
            y = layer(x)  # the op's PyTorch path now
            assert layer.__dict__["_eager_call"] is None
        finally:
            monkeypatch.delenv("DIPGO_NATIVE_KERNELS")
            native.reset()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
