"""trainers.models (built-in configs, checkpoint loading, width heads) and trainers.export
(export, report)."""

from __future__ import annotations

import json
import math
import uuid
from itertools import pairwise
from pathlib import Path

import open_clip
import pytest
import torch

from trainers.errors import InputError
from trainers.export import export_student, model_report, parameter_counts
from trainers.models import (
    CONFIG_DIR,
    DistillStudent,
    LoadedModel,
    build_student,
    builtin_model_names,
    embed_dim_of,
    load_model,
    read_state_dict,
    register_builtin_configs,
)

EXPECTED_NAMES = [
    "conaclip-student-m",
    "conaclip-student-s",
    "conaclip-student-xs",
    "conaclip-teacher",
]
# Only these keys appear in the shipped configs, so the hand formulas below cover them all: the
# students' image towers are ViTs, the teacher's a timm ResNet-10-T.
VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
TIMM_VISION_KEYS = {
    "image_size",
    "timm_model_name",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _block_params(width: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    attention = 3 * width * width + 3 * width + width * width + width  # in_proj, out_proj
    mlp = width * hidden + hidden + hidden * width + width  # c_fc, c_proj
    norms = 2 * 2 * width  # ln_1, ln_2
    return attention + mlp + norms


def _basic_block_params(c_in: int, c_out: int) -> int:
    """A timm ResNet BasicBlock: two 3x3 convolutions (no bias) with BatchNorm (weight + bias
    each), and where the width changes, the avg-down shortcut's 1x1 convolution + BatchNorm."""
    convs = 9 * c_in * c_out + 9 * c_out * c_out + 2 * 2 * c_out
    shortcut = c_in * c_out + 2 * c_out if c_in != c_out else 0
    return convs + shortcut


def _resnet10t_params() -> int:
    """timm's resnet10t without its classifier: a tiered deep stem (3x3 convolutions 3 -> 24
    -> 32 -> 64, BatchNorm after each) and one BasicBlock per stage at 64, 128, 256, 512."""
    stem = 9 * 3 * 24 + 2 * 24 + 9 * 24 * 32 + 2 * 32 + 9 * 32 * 64 + 2 * 64
    widths = [64, 64, 128, 256, 512]
    return stem + sum(_basic_block_params(a, b) for a, b in pairwise(widths))


def _vit_image_params(vision: dict, embed: int) -> int:
    w, patch = vision["width"], vision["patch_size"]
    grid = vision["image_size"] // patch
    return (
        3 * patch * patch * w  # conv1, no bias
        + w  # class embedding
        + (grid * grid + 1) * w  # positional embedding
        + 2 * w  # ln_pre
        + vision["layers"] * _block_params(w, vision["mlp_ratio"])
        + 2 * w  # ln_post
        + w * embed  # proj
    )


def _hand_counts(cfg: dict) -> dict[str, int]:
    embed, vision, text = cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in vision:
        assert vision["timm_model_name"] == "resnet10t", "only resnet10t is worked by hand"
        image = _resnet10t_params() + 512 * embed  # trunk + linear projection, no bias
    else:
        image = _vit_image_params(vision, embed)
    tw = text["width"]
    token_embedding = text["vocab_size"] * tw
    text_params = (
        token_embedding
        + text["context_length"] * tw
        + text["layers"] * _block_params(tw, text["mlp_ratio"])
        + 2 * tw  # ln_final
        + tw * embed  # text_projection
    )
    total = image + text_params + 1  # + logit_scale
    return {
        "image": image,
        "text": text_params,
        "token_embedding": token_embedding,
        "total": total,
        "total_excl_token_embedding": total - token_embedding,
    }


@pytest.fixture(scope="module")
def built() -> dict[str, LoadedModel]:
    torch.manual_seed(0)
    return {name: load_model(name) for name in builtin_model_names()}


def test_builtin_names_and_idempotent_registration() -> None:
    assert builtin_model_names() == EXPECTED_NAMES
    register_builtin_configs()
    # open_clip keeps its search path in a module list; a second call must not extend it.
    paths_before = list(open_clip.factory._MODEL_CONFIG_PATHS)
    register_builtin_configs()
    assert paths_before == open_clip.factory._MODEL_CONFIG_PATHS
    assert set(EXPECTED_NAMES) <= set(open_clip.list_models())


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_config_matches_builtin_setting(name: str) -> None:
    cfg = _config(name)
    assert set(cfg) == {"embed_dim", "vision_cfg", "text_cfg"}
    timm = name == "conaclip-teacher"
    assert set(cfg["vision_cfg"]) == (TIMM_VISION_KEYS if timm else VISION_KEYS)
    assert set(cfg["text_cfg"]) == TEXT_KEYS
    assert cfg["vision_cfg"]["image_size"] == 64
    assert cfg["text_cfg"]["context_length"] == 32
    assert cfg["text_cfg"]["vocab_size"] == 49408


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_parameter_counts_match_hand_formula(built: dict[str, LoadedModel], name: str) -> None:
    model, cfg = built[name].model, _config(name)
    hand = _hand_counts(cfg)
    counts = parameter_counts(model)
    for key, value in hand.items():
        assert counts[key] == value, key
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # One block on its own against the formula, so a compensating error elsewhere cannot hide.
    if "timm_model_name" in cfg["vision_cfg"]:
        last_block = model.visual.trunk.layer4[0]
        assert sum(p.numel() for p in last_block.parameters()) == _basic_block_params(256, 512)
    else:
        vision_block = model.visual.transformer.resblocks[0]
        w = cfg["vision_cfg"]["width"]
        assert sum(p.numel() for p in vision_block.parameters()) == 12 * w * w + 13 * w
    assert embed_dim_of(model) == cfg["embed_dim"]


def test_hand_formula_on_a_known_size() -> None:
    # Teacher: timm resnet10t + text w192 L4, context 32, embed 256: worked by hand, stem 648 +
    # 48 + 6,912 + 64 + 18,432 + 128 = 26,232; stages 73,984 + 230,144 + 919,040 + 3,673,088;
    # trunk 4,922,488 (timm's 5.44M less its 513,000-parameter classifier) + 131,072 projection
    # = 5,053,560; text 9,486,336 tokens + 6,144 positions + 1,779,456 blocks + 384 norm +
    # 49,152 projection = 11,321,472; + 1 logit scale.
    assert _hand_counts(_config("conaclip-teacher"))["total"] == 16_375_033
    # The former ViT teacher (w192 L4 image tower at 64x64, patch 8): 36,864 patch conv + 192
    # class + 12,480 positions + 2 x 384 norms + 4 x 444,864 blocks + 49,152 projection.
    vit = {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "mlp_ratio": 4.0}
    assert _vit_image_params(vit, 256) == 1_878_912


def test_model_sizes(built: dict[str, LoadedModel]) -> None:
    excl = {n: parameter_counts(built[n].model)["total_excl_token_embedding"] for n in built}
    assert excl["conaclip-student-xs"] < 2_000_000
    assert (
        excl["conaclip-student-xs"]
        < excl["conaclip-student-s"]
        < excl["conaclip-student-m"]
        < excl["conaclip-teacher"]
    )
    assert embed_dim_of(built["conaclip-student-xs"].model) < embed_dim_of(
        built["conaclip-teacher"].model
    )


def test_tokenizer_and_transforms_follow_config(built: dict[str, LoadedModel]) -> None:
    loaded = built["conaclip-student-xs"]
    tokens = loaded.tokenizer(["a red circle left of a blue square"])
    assert tokens.shape == (1, 32)
    assert tokens[0, 0].item() == 49406  # CLIP BPE start-of-text
    from PIL import Image

    image = loaded.preprocess_eval(Image.new("RGB", (100, 80), (255, 0, 0)))
    assert image.shape == (3, 64, 64)
    # Pure red normalised with open_clip's OpenAI mean/std: (1 - 0.48145466) / 0.26862954.
    assert image[0, 32, 32].item() == pytest.approx((1 - 0.48145466) / 0.26862954, abs=1e-4)


def _batch(loaded: LoadedModel, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=generator)
    captions = [f"{k} green triangles above a yellow circle" for k in range(n)]
    return images, loaded.tokenizer(captions)


def test_head_exists_exactly_when_widths_differ() -> None:
    torch.manual_seed(0)
    narrow, _ = build_student("conaclip-student-xs", teacher_embed_dim=256)
    assert isinstance(narrow.teacher_head, torch.nn.Linear)
    assert narrow.teacher_head.weight.shape == (256, 128)
    assert narrow.teacher_head.bias is None
    same, _ = build_student("conaclip-student-s", teacher_embed_dim=256)
    assert isinstance(same.teacher_head, torch.nn.Identity)
    assert same.logit_scale is same.clip.logit_scale
    no_teacher, _ = build_student("conaclip-student-xs", teacher_embed_dim=None)
    assert isinstance(no_teacher.teacher_head, torch.nn.Identity)
    assert same.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_encode_outputs_unit_norm_and_head_is_isometric_at_init() -> None:
    torch.manual_seed(0)
    student, loaded = build_student("conaclip-student-xs", teacher_embed_dim=256)
    student.eval()
    images, tokens = _batch(loaded)
    out = student.encode(images, tokens)
    assert out["image"].shape == (6, 128)
    assert out["text_to_teacher"].shape == (6, 256)
    for key, value in out.items():
        torch.testing.assert_close(value.norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0, msg=key)
    # The student's own embeddings, computed independently of the wrapper.
    with torch.no_grad():
        expected = loaded.model.encode_image(images, normalize=True)
    torch.testing.assert_close(out["image"].detach(), expected, atol=1e-6, rtol=0)
    # Orthogonal init: cosine similarities survive the head unchanged, within a tower and,
    # since both towers share the head, between image and text.
    own = torch.cat([out["image"], out["text"]]).detach()
    mapped = torch.cat([out["image_to_teacher"], out["text_to_teacher"]]).detach()
    torch.testing.assert_close(mapped @ mapped.T, own @ own.T, atol=1e-5, rtol=0)
    # One head maps both towers: the same matrix, applied to each.
    head = student.teacher_head.weight.detach()
    torch.testing.assert_close(
        out["text_to_teacher"].detach(),
        torch.nn.functional.normalize(out["text"].detach() @ head.T, dim=-1),
        atol=1e-6,
        rtol=0,
    )
    # The head is trained through the teacher-space outputs of both towers.
    (out["image_to_teacher"][:, 0].sum() + out["text_to_teacher"][:, 1].sum()).backward()
    assert student.teacher_head.weight.grad is not None
    assert student.teacher_head.weight.grad.abs().sum() > 0


def test_identity_head_returns_student_embeddings() -> None:
    torch.manual_seed(0)
    student, loaded = build_student("conaclip-student-s", teacher_embed_dim=256)
    out = student(*_batch(loaded))
    assert out["image_to_teacher"] is out["image"]
    assert out["text_to_teacher"] is out["text"]


def test_export_round_trip_through_open_clip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student, loaded = build_student("conaclip-student-xs", teacher_embed_dim=256)
    with torch.no_grad():  # move away from the init so a fresh build cannot match by accident
        for parameter in student.clip.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    name = f"exported-xs-{uuid.uuid4().hex[:8]}"
    weights = export_student(student, tmp_path, name)

    assert weights == tmp_path / f"{name}.pt"
    assert json.loads((tmp_path / f"{name}.json").read_text()) == _config("conaclip-student-xs")
    state = torch.load(weights, weights_only=True)
    assert not any("head" in key for key in state)
    assert set(state) == set(student.clip.state_dict())

    open_clip.add_model_config(tmp_path)
    reloaded = open_clip.create_model(name, pretrained=str(weights)).eval()
    student.eval()
    images, tokens = _batch(loaded)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_image(images), student.clip.encode_image(images), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            reloaded.encode_text(tokens), student.clip.encode_text(tokens), atol=1e-6, rtol=0
        )
    # Our own loader reads the export back too (an open_clip name plus a local checkpoint).
    again = load_model(name, checkpoint=weights).model
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


def test_export_of_bare_clip_needs_config(tmp_path: Path, built: dict[str, LoadedModel]) -> None:
    model = built["conaclip-student-xs"].model
    with pytest.raises(ValueError, match="model_cfg"):
        export_student(model, tmp_path, "bare")
    path = export_student(model, tmp_path, "bare", model_cfg=built["conaclip-student-xs"].model_cfg)
    assert path.is_file()
    with pytest.raises(InputError, match="plain file stem"):
        export_student(model, tmp_path, "../escape", model_cfg={})


class _RunsCode:
    """Pickles to a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _RunsCode(marker)}}, path)
    with pytest.raises(InputError, match=r"weights_only=True") as caught:
        load_model("conaclip-student-xs", checkpoint=path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    # The payload is live: a plain torch.load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_layouts_load_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = load_model("conaclip-student-xs").model
    state = source.state_dict()
    layouts = {
        "plain.pt": state,
        "wrapped.pt": {"state_dict": state, "epoch": 3},
        "ddp.pt": {"model": {f"module.{k}": v for k, v in state.items()}, "step": 10},
    }
    for filename, content in layouts.items():
        torch.save(content, tmp_path / filename)
        torch.manual_seed(4)  # a different init, so equality means the weights were loaded
        loaded = load_model("conaclip-student-xs", checkpoint=tmp_path / filename)
        assert loaded.checkpoint == tmp_path / filename
        for key, value in loaded.model.state_dict().items():
            assert torch.equal(value, state[key]), (filename, key)
    assert set(read_state_dict(tmp_path / "ddp.pt")) == set(state)


def test_checkpoint_of_other_architecture_is_refused(tmp_path: Path) -> None:
    torch.save(load_model("conaclip-student-s").model.state_dict(), tmp_path / "s.pt")
    # s has one block more per tower than xs: 12 tensors per block x 2 towers are unexpected.
    expected = r"does not fit this model: unexpected 24 .*; wrong shape \d+"
    with pytest.raises(InputError, match=expected):
        load_model("conaclip-student-xs", checkpoint=tmp_path / "s.pt")


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="expected a state dict"):
        load_model("conaclip-student-xs", checkpoint=tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"garbage\.pt: not loadable"):
        load_model("conaclip-student-xs", checkpoint=tmp_path / "garbage.pt")


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(InputError, match="unknown model 'conaclip-studnet-xs'") as caught:
        load_model("conaclip-studnet-xs")
    assert "close matches: conaclip-student-xs" in str(caught.value)
    with pytest.raises(InputError, match="nothing is downloaded"):
        load_model("hf-hub:org/some-clip")


def test_open_clip_name_needs_a_local_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'ViT-B/32' needs a local checkpoint .*nothing is"):
        load_model("ViT-B/32")
    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match=f"checkpoint file {missing} not found"):
        load_model("ViT-B-32", checkpoint=missing)


def test_model_report_sizes_and_throughput(built: dict[str, LoadedModel]) -> None:
    model = built["conaclip-student-xs"].model
    model.train()
    report = model_report(model, batch_size=4, iters=1)
    numel = report["params_total"]
    # torch.save adds a small, size-independent overhead (zip headers, pickled key names).
    assert 0 < report["size_fp32_bytes"] - 4 * numel < 100_000
    assert 0 < report["size_fp16_bytes"] - 2 * numel < 100_000
    assert report["images_per_s"] > 0 and math.isfinite(report["images_per_s"])
    assert report["texts_per_s"] > 0 and math.isfinite(report["texts_per_s"])
    assert report["params_image"] + report["params_text"] + report["params_other"] == numel
    assert model.training  # mode restored after the eval-mode timing


def test_report_of_student_counts_the_clip_only() -> None:
    torch.manual_seed(0)
    student, loaded = build_student("conaclip-student-xs", teacher_embed_dim=256)
    assert parameter_counts(student) == parameter_counts(loaded.model)
    assert isinstance(student, DistillStudent)
    assert embed_dim_of(student) == 128


def test_building_a_model_does_not_warn_about_random_init(caplog) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        load_model("conaclip-student-xs")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    # Other warnings still pass: the filter is gone once the model is built.
    with caplog.at_level(logging.WARNING):
        logging.warning("No pretrained weights loaded for model 'x' (a caller's own warning)")
    assert any("a caller's own warning" in r.getMessage() for r in caplog.records)
