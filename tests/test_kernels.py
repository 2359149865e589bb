"""Block-sparse linear kernels: every backend against the pure-PyTorch reference, the fake
implementation, the Triton kernel in the interpreter, the module and its saved form."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dipgo.kernels import (
    BlockSparseLinear,
    BlockSparseWeight,
    block_mask_from_scores,
    block_sparse_linear,
    estimated_speedup,
    kernel_speedup_expected,
    native,
)
from dipgo.kernels.bench import random_block_sparse
from dipgo.kernels.ops import block_sparse_linear_op
from dipgo.kernels.reference import reference_block_sparse_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ACTS = ("none", "relu", "gelu")


def _reference64(x, packed: BlockSparseWeight, bias, activation):
    """The reference in float64, so that it is the more exact side of every comparison."""
    return reference_block_sparse_linear(
        x.double(), packed.values.double(), packed.col_indices, packed.row_ptr,
        None if bias is None else bias.double(), activation,
    )


def assert_matches_reference(x, packed, bias, activation):
    y = block_sparse_linear(x, packed.values, packed.col_indices, packed.row_ptr, bias, activation)
    ref = _reference64(x, packed, bias, activation)
    assert y.shape == ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


# (out, in, block) x sparsity: every block height, block columns from 1 to 64, ragged row counts.
LAYERS = [(96, 64, (32, 16)), (128, 96, (16, 32)), (192, 128, (64, 8)), (64, 48, (32, 1)), (64, 256, (16, 64))]


@pytest.mark.parametrize("out_f,in_f,block", LAYERS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_cpu_op_matches_reference(out_f, in_f, block, sparsity):
    _, packed = random_block_sparse(out_f, in_f, sparsity, block, seed=out_f + in_f)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(out_f, generator=gen)
    for tokens in (1, 7, 37):  # below, at and past the micro-kernel's row tiles
        x = torch.randn(tokens, in_f, generator=gen)
        for act in ACTS:
            assert_matches_reference(x, packed, bias, act)
    assert_matches_reference(torch.randn(300, in_f, generator=gen), packed, None, "gelu")  # several row chunks, no bias


@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (2, 1, 5, 64)])
def test_cpu_op_batch_dims(shape):
    _, packed = random_block_sparse(96, 64, 0.6, (32, 16))
    x = torch.randn(*shape)
    for bias in (None, torch.randn(96)):
        assert_matches_reference(x, packed, bias, "relu")


def test_cpu_op_strided_input_and_empty():
    _, packed = random_block_sparse(64, 64, 0.5, (16, 16))
    x = torch.randn(64, 10).t()  # (10, 64), rows not contiguous
    assert_matches_reference(x, packed, torch.randn(64), "gelu")
    x = torch.randn(20, 128)[:, ::2]  # (20, 64), unit stride broken along K
    assert_matches_reference(x, packed, None, "none")
    assert block_sparse_linear(torch.randn(0, 64), packed.values, packed.col_indices, packed.row_ptr).shape == (0, 64)


def test_gelu_epilogue_over_a_wide_range():
    """The native gelu uses its own erf/exp approximations: check them far into both tails."""
    eye = BlockSparseWeight.from_dense(torch.eye(32), torch.ones(1, 1, dtype=torch.bool))
    x = torch.linspace(-30, 30, 32 * 500).view(-1, 32)
    y = block_sparse_linear(x, eye.values, eye.col_indices, eye.row_ptr, None, "gelu")
    torch.testing.assert_close(y.double(), F.gelu(x.double()), rtol=1e-5, atol=1e-6)


def test_fallback_without_native_kernel(monkeypatch):
    monkeypatch.setenv("DIPGO_NATIVE_KERNELS", "0")
    assert native.load() is None
    x = torch.randn(2, 9, 64)
    for block in ((32, 32), (32, 16)):  # torch's CPU BSR matmul takes square blocks; the other is the reference
        _, packed = random_block_sparse(96, 64, 0.5, block)
        for act in ACTS:
            assert_matches_reference(x, packed, torch.randn(96), act)
        assert_matches_reference(x.double(), packed.to(torch.float64), None, "gelu")
        with torch.inference_mode():  # the BSR tensor is built inside the call, so this works
            assert_matches_reference(x, packed, None, "relu")


def test_native_kernel_is_built_here():
    """This machine has g++: the fast path must really be in use (or the benchmarks mean nothing)."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the native CPU kernel cannot be built")
    kernel = native.load()
    assert kernel is not None and kernel.path.is_file()


def test_native_kernel_builds_from_scratch(tmp_path):
    cxx = native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on this machine: the native CPU kernel cannot be built")
    path = native.build(cxx, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".so"
    assert native.build(cxx, tmp_path) == path  # cached: same key, no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_missing_compiler_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert native.load() is None
        _, packed = random_block_sparse(64, 64, 0.5, (32, 32))
        assert_matches_reference(torch.randn(5, 64), packed, torch.randn(64), "gelu")
    finally:
        native.reset()


def test_native_kernel_refuses_bad_indices():
    _, packed = random_block_sparse(64, 64, 0.5, (32, 16))
    bad_cols = packed.col_indices.clone()
    bad_cols[0] = 99
    if native.load() is None:
        pytest.skip("native kernel unavailable")
    with pytest.raises(ValueError, match="out of range"):
        block_sparse_linear(torch.randn(3, 64), packed.values, bad_cols, packed.row_ptr)


def test_op_refuses_mismatched_inputs():
    _, packed = random_block_sparse(64, 64, 0.5, (32, 16))
    v, c, r = packed.values, packed.col_indices, packed.row_ptr
    with pytest.raises(ValueError, match="dividing the input features"):
        block_sparse_linear(torch.randn(3, 72), v, c, r)
    with pytest.raises(ValueError, match="share one dtype"):
        block_sparse_linear(torch.randn(3, 64, dtype=torch.float64), v, c, r)
    with pytest.raises(ValueError, match="bias must have shape"):
        block_sparse_linear(torch.randn(3, 64), v, c, r, torch.randn(63))
    with pytest.raises(ValueError, match="activation 'tanh'"):
        block_sparse_linear(torch.randn(3, 64), v, c, r, None, "tanh")


def test_opcheck_and_fake_tensors():
    _, packed = random_block_sparse(64, 96, 0.5, (32, 32))
    v, c, r = packed.values, packed.col_indices, packed.row_ptr
    for args in [
        (torch.randn(5, 96), v, c, r, torch.randn(64), "gelu"),
        (torch.randn(2, 3, 96), v, c, r, None, "relu"),
    ]:
        torch.library.opcheck(block_sparse_linear_op, args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = torch.empty(4, 7, 96)
        fv, fc, fr = (mode.from_tensor(t) for t in (v, c, r))
        y = torch.ops.dipgo.block_sparse_linear(fx, fv, fc, fr, None, "none")
    assert y.shape == (4, 7, 64) and y.dtype == torch.float32


_TRITON_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from dipgo.kernels import triton_kernels as tk
    from dipgo.kernels.bench import random_block_sparse
    from dipgo.kernels.ops import _cuda_impl
    from dipgo.kernels.reference import reference_block_sparse_linear
    assert tk.interpreting(), "TRITON_INTERPRET=1 did not reach triton"
    errors = []
    cases = [(64, 64, (32, 16), 0.5, 5), (96, 128, (16, 32), 0.7, 33), (128, 64, (64, 16), 0.0, 70)]
    for out_f, in_f, block, sparsity, tokens in cases:
        _, p = random_block_sparse(out_f, in_f, sparsity, block, seed=tokens)
        x, bias = torch.randn(tokens, in_f), torch.randn(out_f)
        for act in ("none", "relu", "gelu"):
            for b in (bias, None):
                ref = reference_block_sparse_linear(x.double(), p.values.double(), p.col_indices, p.row_ptr,
                                                    None if b is None else b.double(), act)
                y = tk.triton_block_sparse_linear(x, p.values, p.col_indices, p.row_ptr, b, act)
                errors.append((ref - y.double()).abs().max().item())
        # the op's CUDA implementation (batch dims, dispatch) runs the same kernel here
        y = _cuda_impl(x.view(1, tokens, in_f), p.values, p.col_indices, p.row_ptr, bias, "gelu")
        ref = reference_block_sparse_linear(x.double(), p.values.double(), p.col_indices, p.row_ptr,
                                            bias.double(), "gelu")
        errors.append((ref - y[0].double()).abs().max().item())
    print(json.dumps({"max_err": max(errors), "n": len(errors)}))
    """
)


def test_triton_kernel_in_interpreter():
    """triton 3.x picks the interpreter when ``@triton.jit`` runs (at import), so the kernel is
    checked in a fresh interpreter with TRITON_INTERPRET=1 set before any import."""
    pytest.importorskip("triton", reason="triton is not installed, so there is no GPU kernel to check")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "InterpreterError" in proc.stderr and "not supported" in proc.stderr:
        pytest.skip(f"triton's interpreter cannot run the kernel: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 * 7 and result["max_err"] < 1e-4


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_triton_kernel_compiles_for_cuda():
    """No GPU here: compile the kernel ahead of time to a CUDA binary (sm_80 and sm_90), which
    checks what the interpreter does not (types, tl.dot shapes and precisions, lowering)."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    from dipgo.kernels.triton_kernels import _block_sparse_linear_kernel

    for dtype, precision, arch, block in (("fp16", None, 80, (64, 16)), ("fp32", "ieee", 90, (32, 32))):
        sig = {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "cols_ptr": "*i32", "row_ptr_ptr": "*i32",
               "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "T": "i32", "stride_xm": "i32", "stride_ym": "i32",
               "HAS_BIAS": "constexpr", "ACT": "constexpr", "PRECISION": "constexpr", "BM": "constexpr",
               "BN": "constexpr", "BK": "constexpr"}
        const = {"HAS_BIAS": True, "ACT": 2, "PRECISION": precision, "BM": 64, "BN": block[0], "BK": block[1]}
        src = ASTSource(fn=_block_sparse_linear_kernel, signature=sig,
                        constexprs={(list(sig).index(k),): v for k, v in const.items()})
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        except RuntimeError as exc:
            if "ptxas" in str(exc).lower():
                pytest.skip(f"triton's CUDA toolchain (ptxas) is unavailable: {exc}")
            raise
        assert "cubin" in compiled.asm


# --- layout and module ----------------------------------------------------------------------------


def test_layout_round_trip_and_masks():
    w = torch.randn(64, 96)
    mask = block_mask_from_scores(torch.rand(2, 6), 0.5)
    assert int(mask.sum()) == 6
    packed = BlockSparseWeight.from_dense(w, mask)
    assert packed.block == (32, 16) and packed.nnz_blocks == 6 and packed.density == 0.5
    assert torch.equal(packed.block_mask(), mask)
    expected = w * mask.repeat_interleave(32, 0).repeat_interleave(16, 1)
    assert torch.equal(packed.to_dense(), expected)


def _linear(out_f=96, in_f=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("act", ACTS)
def test_module_from_dense_to_dense(act):
    lin = _linear()
    mod = BlockSparseLinear.from_dense(lin, sparsity=0.5, block=(32, 16), activation=act)
    assert mod.density == 0.5 and mod.block == (32, 16)
    dense = mod.to_dense()
    kept = mod.weight.block_mask().repeat_interleave(32, 0).repeat_interleave(16, 1)
    assert torch.equal(dense.weight, lin.weight.detach() * kept)
    assert torch.equal(dense.bias, lin.bias)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        ref = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu}[act](dense(x))
        torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-5)
    # the dropped blocks are the ones with the smallest L2 norm
    norms = lin.weight.detach().reshape(3, 32, 4, 16).pow(2).sum(dim=(1, 3))
    assert norms[mod.weight.block_mask()].min() >= norms[~mod.weight.block_mask()].max()


def test_module_from_element_mask_and_block_inputs():
    lin = _linear(bias=False)
    elem = torch.rand(96, 64) > 0.3  # unstructured: kept blocks hold zeros, stored exactly
    elem[:32] = False  # the whole first block row is empty
    mod = BlockSparseLinear.from_dense(lin, elem, block=(16, 16))
    assert torch.equal(mod.to_dense().weight, lin.weight.detach() * elem)
    assert mod.bias is None and int(mod.row_ptr[2]) == 0
    block_mask = torch.zeros(6, 4, dtype=torch.bool)
    block_mask[::2, 1] = True
    assert BlockSparseLinear.from_dense(lin, block_mask, block=(16, 16)).weight.nnz_blocks == 3
    scores = torch.arange(24.0).view(6, 4)
    mod = BlockSparseLinear.from_dense(lin, scores, sparsity=0.75, block=(16, 16))
    assert mod.weight.block_mask().flatten().nonzero().flatten().tolist() == list(range(18, 24))


def test_module_with_every_block_dropped():
    lin = _linear()
    mod = BlockSparseLinear.from_dense(lin, torch.zeros(96, 64, dtype=torch.bool), activation="relu")
    assert mod.weight.nnz_blocks == 0 and mod.values.shape == (0, 32, 32)
    torch.testing.assert_close(mod(torch.randn(3, 64)), F.relu(lin.bias.detach()).expand(3, 96))


def test_module_state_dict_round_trip():
    a = BlockSparseLinear.from_dense(_linear(seed=1), sparsity=0.5, block=(32, 16), activation="gelu")
    b = BlockSparseLinear.from_dense(_linear(seed=2), sparsity=0.9, block=(32, 16), activation="gelu")
    assert a.values.shape != b.values.shape
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert set(a.state_dict()) == {"values", "col_indices", "row_ptr", "bias"}


def test_module_save_load_safetensors(tmp_path):
    mod = BlockSparseLinear.from_dense(_linear(), sparsity=0.7, block=(32, 32), activation="relu")
    stem = mod.save(tmp_path / "blocks.0.fc1")
    assert (tmp_path / "blocks.0.fc1.safetensors").is_file() and (tmp_path / "blocks.0.fc1.json").is_file()
    config = json.loads((tmp_path / "blocks.0.fc1.json").read_text())
    assert config["block"] == [32, 32] and config["activation"] == "relu" and config["nnz_blocks"] == mod.weight.nnz_blocks
    back = BlockSparseLinear.load(stem)
    for name, t in mod.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)
    x = torch.randn(6, 64)
    torch.testing.assert_close(back(x), mod(x), rtol=0, atol=0)
    config["version"] = 99
    (tmp_path / "blocks.0.fc1.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version"):
        BlockSparseLinear.load(stem)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        BlockSparseLinear.load(tmp_path / "missing")


# --- bad input: one sentence naming the layer and what is accepted -------------------------------


@pytest.mark.parametrize(
    "out_f,in_f,kwargs,match",
    [
        (32, 16, {"block": (32, 32), "sparsity": 0.5}, r"Linear\(16 -> 32\).*larger than the weight.*accepted"),
        (64, 100, {"block": (32, 32), "sparsity": 0.5}, r"Linear\(100 -> 64\).*in_features 100 is not divisible.*accepted"),
        (48, 64, {"block": (32, 16), "sparsity": 0.5}, r"Linear\(64 -> 48\).*out_features 48 is not divisible.*accepted"),
        (64, 64, {"block": (8, 16), "sparsity": 0.5}, r"Linear\(64 -> 64\).*block rows 8 not supported; accepted"),
        (64, 64, {"block": (32, 16), "sparsity": 1.0}, r"Linear\(64 -> 64\).*sparsity 1.0 is outside \[0, 1\)"),
        (64, 64, {"block": (32, 16), "sparsity": -0.1}, r"Linear\(64 -> 64\).*sparsity -0.1 is outside \[0, 1\)"),
        (64, 64, {"block": (32, 16)}, r"Linear\(64 -> 64\).*need a sparsity"),
    ],
)
def test_bad_input_refused(out_f, in_f, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        BlockSparseLinear.from_dense(nn.Linear(in_f, out_f), **kwargs)
    assert "\n" not in str(info.value)


def test_bad_mask_shape_refused():
    with pytest.raises(ValueError, match=r"Linear\(64 -> 64\).*not understood; accepted"):
        BlockSparseLinear.from_dense(nn.Linear(64, 64), torch.ones(3, 3, dtype=torch.bool), block=(32, 16))


# --- heuristic and benchmark ----------------------------------------------------------------------


def test_kernel_speedup_expected_is_cheap_and_monotone():
    shape = (3072, 768)
    speeds = [estimated_speedup(shape, s, tokens=256) for s in (0.0, 0.5, 0.7, 0.9)]
    assert speeds == sorted(speeds)
    assert not kernel_speedup_expected((32, 32), 0.5, (32, 32), tokens=1)  # tiny: call overhead dominates
    if native.load() is not None and native.has_avx512():
        assert kernel_speedup_expected(shape, 0.5, (32, 32), tokens=256)
    with pytest.raises(ValueError, match="sparsity"):
        kernel_speedup_expected(shape, 1.5, (32, 32))


def test_bench_script_smoke(tmp_path):
    import runpy

    out = tmp_path / "k.json"
    argv = ["--tokens", "8", "--shapes", "64x96", "--sparsities", "0.5", "--runs", "1", "--rounds", "1",
            "--threads", "1", "--out", str(out)]
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_kernels.py"))
    assert script["main"](argv) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["tokens"] == 8 and row["max_abs_err"] < 1e-4 and row["target"] == 1.5
    assert payload["machine"]["threads"] == 1 and payload["machine"]["torch"] == torch.__version__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_sparse_linear_on_cuda_matches_the_reference():
    """The op's CUDA kernel (fp32, batch dims, bias, activation) against the float64 reference."""
    for out_f, in_f, block, sparsity, tokens in [(64, 64, (32, 16), 0.5, 5), (128, 96, (16, 32), 0.7, 33)]:
        _, p = random_block_sparse(out_f, in_f, sparsity, block, seed=tokens)
        x, bias = torch.randn(2, tokens, in_f), torch.randn(out_f)
        ref = reference_block_sparse_linear(x.double(), p.values.double(), p.col_indices, p.row_ptr,
                                            bias.double(), "gelu")
        cuda = [t.cuda() for t in (x, p.values, p.col_indices, p.row_ptr, bias)]
        y = block_sparse_linear_op(*cuda, "gelu")
        assert y.device.type == "cuda" and y.shape == (2, tokens, out_f)
        assert (y.double().cpu() - ref).abs().max().item() < 1e-3


# --- measured kernel-or-dense decisions -----------------------------------------------------------


def _fake_timer(kernel_s: float, mkl_s: float, onednn_s: float, calls: list[set[str]]):
    def timer(fns):
        calls.append(set(fns))
        for fn in fns.values():  # every variant must really be callable on this layer
            fn()
        table = {"kernel": kernel_s, "mkl": mkl_s, "onednn": onednn_s}
        return {n: table[n] for n in fns}

    return timer


def _layer(sparsity=0.7, seed=0):
    _, packed = random_block_sparse(256, 512, sparsity, (32, 32), seed=seed)
    return packed, torch.randn(256)


@pytest.fixture
def decision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIPGO_CACHE", str(tmp_path))
    if native.load() is None:
        pytest.skip("native kernel unavailable: every decision is 'dense' without timing")
    return tmp_path


def test_decision_follows_the_fastest_dense_path(decision_cache):
    from dipgo.kernels.decide import decide_layer

    packed, bias = _layer()
    calls: list[set[str]] = []
    slower = decide_layer(packed, bias, 256, timer=_fake_timer(2.0, 3.0, 1.9, calls), use_cache=False)
    assert not slower.kernel and slower.dense_path == "onednn" and slower.ratio == pytest.approx(0.95)
    assert "dense" in slower.reason and "0.95x vs onednn" in slower.reason
    faster = decide_layer(packed, bias, 256, timer=_fake_timer(1.0, 3.0, 2.5, calls), use_cache=False)
    assert faster.kernel and faster.dense_path == "onednn" and faster.ratio == pytest.approx(2.5)
    marginal = decide_layer(packed, bias, 256, timer=_fake_timer(1.0, 1.05, 1.2, calls), use_cache=False)
    assert not marginal.kernel and marginal.dense_path == "mkl"  # 1.05x < the 1.1x noise margin
    assert all({"kernel", "mkl"} <= c for c in calls)


def test_decision_cache_is_keyed_by_machine(decision_cache, monkeypatch):
    from dipgo.kernels import decide

    packed, bias = _layer()
    calls: list[set[str]] = []
    first = decide.decide_layer(packed, bias, 256, timer=_fake_timer(1.0, 2.0, 2.0, calls))
    again = decide.decide_layer(packed, bias, 256, timer=_fake_timer(9.0, 2.0, 2.0, calls))
    assert len(calls) == 1 and not first.cached and again.cached and again.kernel and again.ratio == 2.0
    other_tokens = decide.decide_layer(packed, bias, 64, timer=_fake_timer(9.0, 2.0, 2.0, calls))
    assert len(calls) == 2 and not other_tokens.kernel  # another token count is another layer entry
    other_mask, _ = _layer(seed=3)
    decide.decide_layer(other_mask, bias, 256, timer=_fake_timer(1.0, 2.0, 2.0, calls))
    assert len(calls) == 3  # same density, other kept blocks: timed again
    files = list((decision_cache / decide.CACHE_SUBDIR).glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"]["threads"] == torch.get_num_threads()
    key = decide.machine_key(native.load())
    for field, value in (("threads", key["threads"] + 1), ("torch", "0.0"), ("isa", "other"), ("cpu", "other")):
        changed = {**key, field: value}
        monkeypatch.setattr(decide, "machine_key", lambda kernel, changed=changed: changed)
        miss = decide.decide_layer(packed, bias, 256, timer=_fake_timer(9.0, 2.0, 2.0, calls))
        assert not miss.cached and not miss.kernel, field
    assert len(calls) == 7 and len(list((decision_cache / decide.CACHE_SUBDIR).glob("*.json"))) == 5


def test_decision_without_native_kernel_is_dense(monkeypatch, tmp_path):
    from dipgo.kernels.decide import decide_layer

    monkeypatch.setenv("DIPGO_CACHE", str(tmp_path))
    monkeypatch.setenv("DIPGO_NATIVE_KERNELS", "0")
    packed, bias = _layer(0.9)
    choice = decide_layer(packed, bias, 256, timer=lambda fns: pytest.fail("must not time"))
    assert not choice.kernel and "unavailable" in choice.reason


def test_to_kernels_converts_only_layers_measured_faster(decision_cache, monkeypatch):
    from dipgo.kernels import decide
    from dipgo.postprocess.mask_subnet import conversion_lines, to_kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))
    masks = {}
    for name in ("0", "2"):
        lin = model.get_submodule(name)
        _, packed = random_block_sparse(lin.out_features, lin.in_features, 0.7, (32, 32))
        masks[name] = packed.to_dense() != 0
    monkeypatch.setattr(decide, "estimated_speedup", lambda *a, **k: 1.0)
    speeds = {256: 1.0, 512: 5.0}  # by out_features: layer 0 measures faster, layer 2 slower

    def timer(fns):
        out_f = fns["kernel"]().shape[-1]
        return {n: speeds[out_f] if n == "kernel" else 2.0 for n in fns}

    x = torch.randn(3, 512)
    with torch.no_grad():
        for name, m in masks.items():
            model.get_submodule(name).weight.mul_(m)
        ref = model(x)
    report = to_kernels(model, masks, (32, 32), tokens=128, timer=timer)
    assert isinstance(model[0], BlockSparseLinear) and isinstance(model[2], nn.Linear)
    assert report["0"]["converted"] and report["0"]["ratio"] == 2.0
    assert not report["2"]["converted"] and report["2"]["ratio"] == pytest.approx(0.4)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    lines = conversion_lines(report)
    assert "kernel" in lines[0] and "2.00x" in lines[0] and "dense" in lines[1] and "0.40x" in lines[1]


# --- ISA builds and failures ----------------------------------------------------------------------


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_each_isa_build_matches_reference(isa, monkeypatch):
    """Both register-tile shapes, wherever the CPU can run them and the compiler target them."""
    if not native.cpu_can_run(isa):
        pytest.skip(f"this CPU lacks {', '.join(native.ISA_CPU_FLAGS[isa])}: the {isa} build cannot run here")
    cxx = native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on this machine: the native CPU kernel cannot be built")
    monkeypatch.setenv(native.ISA_ENV, isa)
    kernel = native.load()
    assert kernel is not None and kernel.isa == isa and f"_{isa}_" in kernel.path.name
    gen = torch.Generator().manual_seed(2)
    # K = 1024 and 2048: x rows a multiple of 4 KB apart
    for out_f, in_f, block in LAYERS + [(128, 96, (64, 32)), (96, 1024, (32, 32)), (64, 2048, (16, 64))]:
        _, packed = random_block_sparse(out_f, in_f, 0.5, block, seed=in_f)
        bias = torch.randn(out_f, generator=gen)
        for tokens in (1, 5, 13, 37, 300):  # every remainder tile of the 6-, 8- and 14-row tiles
            for act in ACTS:
                assert_matches_reference(torch.randn(tokens, in_f, generator=gen), packed, bias, act)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_streaming_stores_and_small_row_chunks_match_reference(isa, monkeypatch):
    """Outputs over half the L3 are streamed and row chunks shrink to fit L2: force both on
    small shapes (the thresholds come from this machine's caches) and compare to the reference."""
    if not native.cpu_can_run(isa) or native._compiler() is None:
        pytest.skip(f"the {isa} build cannot be built or run here")
    monkeypatch.setenv(native.ISA_ENV, isa)
    kernel = native.load()
    assert kernel is not None and kernel.isa == isa
    monkeypatch.setattr(native, "L3_BYTES", 0)  # every output streamed
    monkeypatch.setattr(native, "L2_BYTES", 4 * 1024 * 4)  # chunks of one tile for K >= 1024
    assert kernel.row_chunk(300, 3, 32, 2, 1024) == kernel.tile_rows[32]
    gen = torch.Generator().manual_seed(3)
    for out_f, in_f, block in [(96, 64, (32, 16)), (96, 1024, (32, 32)), (64, 2048, (16, 64)), (128, 96, (64, 8))]:
        _, packed = random_block_sparse(out_f, in_f, 0.5, block, seed=in_f + 1)
        bias = torch.randn(out_f, generator=gen)
        for tokens in (1, 13, 300):
            for act in ACTS:
                assert_matches_reference(torch.randn(tokens, in_f, generator=gen), packed, bias, act)
        # a y whose rows are not vector-aligned (a column slice of a wider buffer) is stored plainly
        x = torch.randn(37, in_f, generator=gen)
        wide = torch.full((37, out_f + 3), float("nan"))
        out = wide[:, 3:]
        kernel.forward(x, packed.values, packed.col_indices, packed.row_ptr, bias, "relu", out)
        torch.testing.assert_close(out.double(), _reference64(x, packed, bias, "relu"), rtol=1e-4, atol=1e-5)
        assert wide[:, :3].isnan().all()


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_chunk_packing_loop_matches_reference_and_the_in_place_loop(isa, monkeypatch):
    """Sparse weights over many row chunks take the loop that packs each chunk of x first (on the
    builds that have it): it must agree with the float64 reference and, bit for bit, with the
    in-place loop on the same tiles (the per-output sums run in the same order)."""
    if not native.cpu_can_run(isa) or native._compiler() is None:
        pytest.skip(f"the {isa} build cannot be built or run here")
    monkeypatch.setenv(native.ISA_ENV, isa)
    kernel = native.load()
    assert kernel is not None and kernel.isa == isa
    monkeypatch.setattr(native, "L2_BYTES", 4 * 1024 * 4)  # chunks of one or two tiles
    gen = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    packed_loops = 0
    try:
        for out_f, in_f, block in [(96, 1024, (32, 32)), (64, 512, (16, 32)), (128, 512, (64, 16)), (96, 320, (32, 8))]:
            _, packed = random_block_sparse(out_f, in_f, 0.8, block, seed=in_f + 7)
            bias = torch.randn(out_f, generator=gen)
            for tokens in (61, 203):  # ragged last chunk and last tile
                x = torch.randn(tokens, in_f, generator=gen)
                for act in ACTS:
                    outs, loops = [], []
                    for n in (1, 2):  # 8-15 chunks pack on one thread only: both loops, same tiles
                        torch.set_num_threads(n)
                        loops.append(kernel.packs_chunks(x, packed.values, out_f))
                        out = torch.empty(tokens, out_f)
                        kernel.forward(x, packed.values, packed.col_indices, packed.row_ptr, bias, act, out)
                        torch.testing.assert_close(out.double(), _reference64(x, packed, bias, act), rtol=1e-4, atol=1e-5)
                        outs.append(out)
                    assert torch.equal(outs[0], outs[1])
                    packed_loops += sum(loops)
    finally:
        torch.set_num_threads(threads)
    assert packed_loops > 0  # the packing loop really ran


def test_avx2_build_has_no_avx512_instructions(tmp_path):
    """The forced AVX2 build must really be AVX2 code (no zmm register anywhere)."""
    cxx, objdump = native._compiler(), shutil.which("objdump")
    if cxx is None or objdump is None:
        pytest.skip("needs a C++ compiler and objdump")
    path = native.build(cxx, tmp_path, "avx2")
    asm = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "vfmadd231ps" in asm and "%ymm" in asm and "%zmm" not in asm


def test_prefetchw_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    """The output-line prefetch asks for write intent (PREFETCHW) only on CPUs that list it."""
    cxx, objdump = native._compiler(), shutil.which("objdump")
    if cxx is None or objdump is None or not native.cpu_can_run("avx2"):
        pytest.skip("needs a C++ compiler, objdump and an AVX2 CPU")
    flags = native.cpu_flags()
    for has in (True, False):
        fake = flags | {native.PREFETCHW_FLAG} if has else flags - {native.PREFETCHW_FLAG}
        monkeypatch.setattr(native, "cpu_flags", lambda fake=fake: fake)
        assert ("-mprfchw" in native.isa_flags("avx2")) == has and "-mprfchw" not in native.isa_flags("portable")
        path = native.build(cxx, tmp_path / str(has), "avx2")
        asm = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True, check=True).stdout
        assert ("\tprefetchw " in asm) == has  # the mnemonic (the file's path, printed too, holds the word)


def test_avx512_build_compiles_to_zmm_code_where_the_compiler_targets_it(tmp_path):
    """On an AVX2-only machine the AVX-512 build cannot run, but it can still be compiled and
    checked to be AVX-512 code (the tile shape it was written for)."""
    cxx, objdump = native._compiler(), shutil.which("objdump")
    if cxx is None or objdump is None:
        pytest.skip("needs a C++ compiler and objdump")
    try:
        path = native.build(cxx, tmp_path, "avx512")
    except RuntimeError as exc:
        pytest.skip(f"this compiler cannot target AVX-512: {exc}")
    asm = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "vfmadd231ps" in asm and "%zmm" in asm


def test_isa_cache_key_differs_by_isa_and_cpu(monkeypatch):
    cxx = native._compiler() or "g++"
    keys = {native.build_key(cxx, isa) for isa in native.ISA_FLAGS}
    assert len(keys) == len(native.ISA_FLAGS)
    key = native.build_key(cxx, "avx2")
    monkeypatch.setattr(native, "_cpu_tag", lambda: "model name : some other CPU")
    assert native.build_key(cxx, "avx2") != key


@pytest.mark.parametrize("value,match", [
    ("bogus", r"DIPGO_KERNEL_ISA='bogus' is not an ISA the kernel has; accepted: auto, avx512, avx2, portable"),
])
def test_bad_isa_warns_once_and_subnets_stay_dense(value, match, monkeypatch, tmp_path):
    from dipgo.kernels.decide import decide_layer

    monkeypatch.setenv(native.ISA_ENV, value)
    monkeypatch.setenv("DIPGO_CACHE", str(tmp_path))
    native.reset()
    with pytest.warns(RuntimeWarning, match=match) as record:
        assert native.load() is None
    assert len(record) == 1 and "\n" not in str(record[0].message) and "dense" in str(record[0].message)
    packed, bias = _layer(0.9)
    assert not decide_layer(packed, bias, 256, timer=lambda fns: pytest.fail("must not time")).kernel


def test_isa_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma"}))
    monkeypatch.setenv(native.ISA_ENV, "avx512")
    with pytest.raises(native.KernelUnavailable, match="needs CPU features this CPU lacks.*avx512f"):
        native.requested_isa()
    monkeypatch.delenv(native.ISA_ENV)
    if native.platform.machine().lower() in ("x86_64", "amd64"):
        assert native.native_isa() == "avx2"


def test_compiler_that_cannot_target_the_isa_warns(monkeypatch, tmp_path):
    """A compiler that fails (here: a script that rejects every -march) gives one warning sentence
    naming the reason, and no kernel."""
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo \"error: bad value for -march= switch\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("DIPGO_KERNEL_CACHE", str(tmp_path / "cache"))
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not build the \w+ kernel \(error: bad value for -march") as rec:
            assert native.load() is None
        assert len(rec) == 1 and "\n" not in str(rec[0].message)
    finally:
        native.reset()


def test_nonexistent_compiler_warns(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found \(/nonexistent/c\+\+"):
            assert native.load() is None
    finally:
        native.reset()
