"""MACs, latency and fidelity measurement: fast checks on tiny inputs (no timings asserted
beyond generous sanity bounds on a sleep)."""

from __future__ import annotations

import math
import time

import pytest
import timm
import torch
from torch import nn

from dipgo.measure.fidelity import (
    classifier_accuracy,
    classifier_features,
    cosine_fidelity,
    frechet_distance,
    image_fidelity,
    psnr,
    ssim,
)
from dipgo.measure.latency import (
    LatencyResult,
    compare_latency,
    cuda_peak_mb,
    measure_latency,
    peak_rss_mb,
    speedup,
)
from dipgo.measure.macs import block_macs, count_macs, model_macs

# --- MACs ---------------------------------------------------------------------------------------


def test_linear_macs() -> None:
    assert model_macs(nn.Linear(8, 16), torch.randn(4, 8)) == 4 * 8 * 16


def test_conv_macs() -> None:
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    # every output pixel (8x8) of every output channel (4) sums 3 channels x 3x3 taps
    assert model_macs(conv, torch.randn(1, 3, 8, 8)) == 8 * 8 * 4 * 3 * 3 * 3


def test_block_macs_split_by_child_name() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    total, per_block = block_macs(model, ["0", "1", "2", "missing"], torch.randn(2, 8))
    assert per_block == {"0": 2 * 8 * 16, "1": 0.0, "2": 2 * 16 * 4, "missing": 0.0}
    assert sum(per_block.values()) <= total
    assert total == 2 * 8 * 16 + 2 * 16 * 4


def test_count_macs_root_is_empty_name() -> None:
    model = nn.Sequential(nn.Linear(8, 16))
    total, per_module = count_macs(lambda: model(torch.randn(1, 8)))
    assert per_module[""] == total == 8 * 16


# --- latency ------------------------------------------------------------------------------------


def test_sleep_median_in_range() -> None:
    result = measure_latency(lambda: time.sleep(0.005), warmup=1, runs=5)
    # a busy shared machine can only make a sleep longer, never shorter
    assert 0.005 <= result.median_s < 0.1
    assert result.min_s <= result.median_s
    assert len(result.times_s) == result.runs == 5
    assert result.device == "cpu"


def test_runs_and_warmup_honoured() -> None:
    calls: list[bool] = []
    result = measure_latency(lambda: calls.append(torch.is_inference_mode_enabled()), warmup=3, runs=4)
    assert len(calls) == 7 and all(calls)  # every call under inference_mode
    assert (result.warmup, result.runs) == (3, 4)


def test_threads_recorded_and_restored() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    result = measure_latency(lambda: seen.append(torch.get_num_threads()), warmup=0, runs=2, threads=1)
    assert result.threads == 1 and seen == [1, 1]
    assert torch.get_num_threads() == before


def test_threads_restored_on_error() -> None:
    before = torch.get_num_threads()

    def boom() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        measure_latency(boom, threads=1)
    assert torch.get_num_threads() == before


def test_compare_latency_interleaves_and_rotates() -> None:
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    results = compare_latency(fns, warmup=1, runs=2, rounds=2)
    warm, timed = order[:3], order[3:]
    assert warm == ["a", "b", "c"]
    assert timed == list("abcabc") + list("bcabca")
    assert {n: r.runs for n, r in results.items()} == {"a": 4, "b": 4, "c": 4}


def test_speedup_and_to_dict() -> None:
    slow = LatencyResult.from_times([0.2, 0.2, 0.4], warmup=0, threads=1, device="cpu")
    fast = LatencyResult.from_times([0.1, 0.1, 0.3], warmup=0, threads=1, device="cpu")
    assert speedup(slow, fast) == pytest.approx(2.0)
    d = slow.to_dict()
    assert d["median_s"] == 0.2 and d["times_s"] == [0.2, 0.2, 0.4] and d["std_s"] > 0


def test_bad_counts_rejected() -> None:
    with pytest.raises(ValueError):
        measure_latency(lambda: None, runs=0)


def test_memory_helpers() -> None:
    assert peak_rss_mb() > 1.0
    peak = cuda_peak_mb()
    assert peak is None if not torch.cuda.is_available() else peak >= 0


# --- fidelity -----------------------------------------------------------------------------------


def _images(seed: int = 0, shape: tuple[int, ...] = (4, 1, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_psnr_identical_is_inf_and_falls_with_noise() -> None:
    x = _images()
    assert psnr(x, x) == math.inf
    g = torch.Generator().manual_seed(1)
    noisy = [psnr(x + s * torch.randn(x.shape, generator=g), x) for s in (0.01, 0.1, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]
    assert noisy[1] == pytest.approx(10 * math.log10(4 / 0.01), abs=0.5)  # range 2, sigma 0.1


@pytest.mark.parametrize("shape", [(4, 1, 16, 16), (2, 3, 8, 8), (2, 1, 6, 10)])
def test_ssim_identical_is_one(shape: tuple[int, ...]) -> None:
    x = _images(shape=shape)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    assert ssim(_images(seed=3, shape=shape), x) < 0.5


def test_image_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        psnr(_images(), _images(shape=(4, 1, 8, 8)))


def test_frechet_same_gaussian_small_shifted_is_squared_shift() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 8, generator=g), torch.randn(20000, 8, generator=g)
    assert frechet_distance(a, b) < 0.02
    shift = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])  # ||shift||^2 = 2.25
    assert frechet_distance(a, b + shift) == pytest.approx(2.25, abs=0.05)


def test_frechet_scaled_gaussian_matches_closed_form() -> None:
    # N(0, I) vs N(0, 4 I) in D dims: D * (1 + 4 - 2 * 2) = D
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 4, generator=g), 2 * torch.randn(20000, 4, generator=g)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_frechet_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))


@pytest.fixture(scope="module")
def timm_classifier() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1, pretrained=False).train()


def test_classifier_features_timm(timm_classifier: nn.Module) -> None:
    images = _images(shape=(5, 1, 16, 16))
    feats, logits = classifier_features(timm_classifier, images, batch_size=2)
    assert feats.shape == (5, timm_classifier.num_features) and logits.shape == (5, 10)
    assert timm_classifier.training  # mode restored
    with torch.no_grad():
        expected = timm_classifier.eval()(images)
    timm_classifier.train()
    torch.testing.assert_close(logits, expected)


def test_classifier_features_plain_module_uses_last_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    images = _images(shape=(3, 1, 16, 16))
    feats, logits = classifier_features(model, images)
    assert feats.shape == (3, 32) and logits.shape == (3, 10)
    torch.testing.assert_close(feats, model[:3](images).detach())


def test_classifier_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert classifier_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_cosine_fidelity() -> None:
    emb = torch.randn(6, 16)
    assert cosine_fidelity(emb, emb) == pytest.approx(1.0)
    assert cosine_fidelity(-emb, emb) == pytest.approx(-1.0)


def test_image_fidelity_keys(timm_classifier: nn.Module) -> None:
    ref = _images(shape=(8, 1, 16, 16))
    samples = (ref + 0.05 * torch.randn(ref.shape)).clamp(-1, 1)
    labels = torch.randint(0, 10, (8,))
    assert set(image_fidelity(samples, ref)) == {"psnr", "ssim"}
    out = image_fidelity(samples, ref, classifier=timm_classifier, labels=labels)
    assert set(out) == {"psnr", "ssim", "fd", "agreement", "accuracy", "accuracy_reference"}
    real, _ = classifier_features(timm_classifier, _images(seed=5, shape=(8, 1, 16, 16)))
    out = image_fidelity(samples, ref, classifier=timm_classifier, real_features=real)
    assert {"fd", "fd_reference"} <= set(out) and out["fd_reference"] >= 0
    same = image_fidelity(ref, ref, classifier=timm_classifier, real_features=real)
    assert same["fd"] == pytest.approx(same["fd_reference"]) and same["agreement"] == 1.0
