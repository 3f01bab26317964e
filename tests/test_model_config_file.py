"""An architecture of the user's own: an open_clip model config ``NAME.json`` passed where a
model name goes (``--teacher path/NAME.json``), registered in every process that builds it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import open_clip
import pytest
import torch

from trainers.errors import InputError
from trainers.models import CONFIG_DIR, embed_dim_of, load_model, register_config_file
from trainers.run_config import load_distill_config

REPO = Path(__file__).resolve().parents[1]


def _own_config() -> dict:
    """student-xs's towers at a joint width (64) and context length (24) no built-in has."""
    config = json.loads((CONFIG_DIR / "conaclip-student-xs.json").read_text())
    config["embed_dim"] = 64
    config["text_cfg"]["context_length"] = 24
    return config


def _write(tmp_path: Path, config: dict | str, stem: str | None = None) -> Path:
    path = tmp_path / f"{stem or 'own-' + uuid.uuid4().hex[:8]}.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def _weights_for(config_path: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    name = register_config_file(config_path)
    torch.manual_seed(11)
    state = open_clip.create_model(name, pretrained=None).state_dict()
    checkpoint = tmp_path / "own.pt"
    torch.save(state, checkpoint)
    return checkpoint, state


def test_config_file_loads_its_architecture_and_the_checkpoint(tmp_path: Path) -> None:
    path = _write(tmp_path, _own_config())
    checkpoint, state = _weights_for(path, tmp_path)
    torch.manual_seed(12)  # another init, so equality below means the file's weights were loaded
    loaded = load_model(str(path), checkpoint)
    assert loaded.name == path.stem
    assert loaded.model_cfg == _own_config()
    assert embed_dim_of(loaded.model) == 64
    assert loaded.model.context_length == 24
    assert loaded.tokenizer(["a red circle"]).shape == (1, 24)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Registering the same file again is a no-op, not a second search-path entry.
    assert register_config_file(path) == path.stem


def test_a_fresh_process_builds_the_same_model_from_the_path(tmp_path: Path) -> None:
    """A Ray worker is a fresh interpreter: the path alone must bring the architecture."""
    path = _write(tmp_path, _own_config())
    checkpoint, _ = _weights_for(path, tmp_path)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import trainers.torchvision_compat as c; c.ensure_torchvision_importable()\n"
        "from trainers.models import load_model\n"
        f"m = load_model({str(path)!r}, {str(checkpoint)!r}).model.eval()\n"
        f"x = torch.load({str(tmp_path / 'images.pt')!r})\n"
        f"torch.save(m.encode_image(x, normalize=True), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    here = load_model(str(path), checkpoint).model.eval()
    with torch.inference_mode():
        expected = here.encode_image(images, normalize=True)
    got = torch.load(tmp_path / "out.pt")
    assert got.shape == (2, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_config_file_errors_name_the_file_and_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(InputError, match=f"model config {missing} not found"):
        load_model(str(missing), tmp_path / "w.pt")
    broken = _write(tmp_path, "{not json")
    with pytest.raises(InputError, match=rf"{broken}: not readable as JSON"):
        load_model(str(broken), tmp_path / "w.pt")
    no_text = {k: v for k, v in _own_config().items() if k != "text_cfg"}
    with pytest.raises(InputError, match=r"field text_cfg: expected an object"):
        load_model(str(_write(tmp_path, no_text)), tmp_path / "w.pt")
    with pytest.raises(InputError, match=r"field embed_dim: expected an integer"):
        load_model(str(_write(tmp_path, {**_own_config(), "embed_dim": "64"})), None)
    # Registering this file would replace open_clip's own ViT-B-32 in this process.
    clash = _write(tmp_path, _own_config(), stem="ViT-B-32")
    with pytest.raises(InputError, match=r"already has an architecture 'ViT-B-32' .*rename"):
        load_model(str(clash), tmp_path / "w.pt")
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512
    with pytest.raises(InputError, match=r"needs a local checkpoint"):
        load_model(str(_write(tmp_path, _own_config())))


def test_run_config_makes_relative_paths_absolute(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path, _own_config(), stem="mine")
    monkeypatch.chdir(tmp_path)
    cfg = load_distill_config({"teacher": "mine.json"})
    assert cfg.teacher == str(tmp_path.resolve() / "mine.json")
    assert load_distill_config({"teacher": "conaclip-teacher"}).teacher == "conaclip-teacher"
    with pytest.raises(InputError, match=r"flags: teacher: model config file .*gone\.json not"):
        load_distill_config({"teacher": "gone.json"}, source="flags")
    # The teacher's weights and the other files a worker reads are anchored the same way.
    cfg = load_distill_config(
        {"teacher_checkpoint": "w/own.pt", "train_shards": "d/{0..1}.tar", "eval_cache": "c"}
    )
    assert cfg.teacher_checkpoint == str(tmp_path / "w" / "own.pt")
    assert cfg.train_shards == str(tmp_path / "d" / "{0..1}.tar")
    assert cfg.eval_cache == str(tmp_path / "c")
    assert cfg.teacher_cache is None and cfg.eval_shards == ""
