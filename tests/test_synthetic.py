"""The shapes-world generator: scenes, captions that describe them, pixels, shards.

Captions are checked by a reader written here from the vocabulary's meaning (not from the
module's tables), so a wrong synonym or a relation stated backwards fails.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.errors import InputError
from trainers.shapes_world import (
    Scene,
    SceneObject,
    perturb_scene,
    render_caption,
    render_captions,
    render_image,
    sample_scene,
    true_relations,
)
from trainers.synth_shards import synthesize

COLOUR = {
    "red": "red", "scarlet": "red", "orange": "orange", "yellow": "yellow", "golden": "yellow",
    "green": "green", "emerald": "green", "blue": "blue", "azure": "blue", "purple": "purple",
    "violet": "purple", "white": "white", "ivory": "white", "black": "black", "ebony": "black",
}  # fmt: skip
SHAPE = {
    "circle": "circle", "disc": "circle", "square": "square", "box": "square",
    "triangle": "triangle", "star": "star", "cross": "cross", "plus": "cross",
    "diamond": "diamond", "rhombus": "diamond",
}  # fmt: skip
SIZE = {
    "small": 0, "little": 0, "tiny": 0, "medium": 1, "medium-sized": 1, "mid-sized": 1,
    "large": 2, "big": 2, "huge": 2,
}  # fmt: skip
SIZE_NAMES = ("small", "medium", "large")


def _left(a, b):
    return b.x - a.x > 0.1


def _above(a, b):
    return b.y - a.y > 0.1


def _larger(a, b):
    return SIZE_NAMES.index(a.size) > SIZE_NAMES.index(b.size)


# phrase -> (predicate(subject, reference), whether "it"/"its" points back)
RELATION = {
    "to the left of": (_left, False), "on the left of": (_left, False), "left of": (_left, False),
    "to the right of": (lambda a, b: _left(b, a), False),
    "on the right of": (lambda a, b: _left(b, a), False),
    "right of": (lambda a, b: _left(b, a), False),
    "on top of": (_above, False), "above": (_above, False), "over": (_above, False),
    "below": (lambda a, b: _above(b, a), False), "under": (lambda a, b: _above(b, a), False),
    "beneath": (lambda a, b: _above(b, a), False),
    "larger than": (_larger, False), "bigger than": (_larger, False),
    "smaller than": (lambda a, b: _larger(b, a), False),
    "to its left": (_left, True), "on its left": (_left, True),
    "to its right": (lambda a, b: _left(b, a), True),
    "on its right": (lambda a, b: _left(b, a), True),
    "above it": (_above, True), "over it": (_above, True),
    "below it": (lambda a, b: _above(b, a), True), "under it": (lambda a, b: _above(b, a), True),
    "larger than it": (_larger, True), "bigger than it": (_larger, True),
    "smaller than it": (lambda a, b: _larger(b, a), True),
}  # fmt: skip
REGION = {  # phrase -> (row, column) of the grid of thirds
    "in the top left": (0, 0), "in the upper left corner": (0, 0), "at the top left": (0, 0),
    "at the top": (0, 1), "in the top middle": (0, 1), "near the top edge": (0, 1),
    "in the top right": (0, 2), "in the upper right corner": (0, 2), "at the top right": (0, 2),
    "on the left": (1, 0), "at the left side": (1, 0), "in the middle left": (1, 0),
    "in the center": (1, 1), "in the middle": (1, 1), "in the centre": (1, 1),
    "on the right": (1, 2), "at the right side": (1, 2), "in the middle right": (1, 2),
    "in the bottom left": (2, 0), "in the lower left corner": (2, 0), "at the bottom left": (2, 0),
    "at the bottom": (2, 1), "in the bottom middle": (2, 1), "near the bottom edge": (2, 1),
    "in the bottom right": (2, 2), "in the lower right corner": (2, 2),
    "at the bottom right": (2, 2),
}  # fmt: skip
BACKGROUND = {
    "plain": "plain", "gradient": "gradient", "shaded": "gradient", "striped": "striped",
    "checkered": "checkered", "checked": "checkered", "speckled": "speckled",
    "mottled": "speckled",
}  # fmt: skip
TONE = {"dark": "dark", "light": "light", "pale": "light"}


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


MENTION_RE = re.compile(
    rf"\b(?:({_alternation(SIZE)}) )?({_alternation(COLOUR)}) ({_alternation(SHAPE)})\b"
)
RELATION_RE = re.compile(rf"\b({_alternation(RELATION)})\b")
REGION_RE = re.compile(rf"\b({_alternation(REGION)})\b(?! of)")  # not "on the left of"
BACKGROUND_RE = re.compile(
    rf"\bon an? (?:({_alternation(TONE)}) )?({_alternation(BACKGROUND)}) background\b"
)


def read_caption(caption: str, scene: Scene) -> list[str]:
    """Every way ``caption`` misdescribes ``scene`` (empty when it is right)."""
    problems = []
    by_name = {(o.colour, o.shape): o for o in scene.objects}
    mentions = []
    for match in MENTION_RE.finditer(caption):
        name = (COLOUR[match.group(2)], SHAPE[match.group(3)])
        if name not in by_name:
            problems.append(f"mentions {name} not in the scene")
            continue
        if match.group(1) and SIZE_NAMES[SIZE[match.group(1)]] != by_name[name].size:
            problems.append(f"wrong size word {match.group(1)!r} for {name}")
        mentions.append((match.start(), match.end(), by_name[name]))
    if {(m[2].colour, m[2].shape) for m in mentions} != set(by_name):
        problems.append("does not mention every object")
    for match in RELATION_RE.finditer(caption):
        holds, points_back = RELATION[match.group(1)]
        before = [m[2] for m in mentions if m[1] <= match.start()]
        after = [m[2] for m in mentions if m[0] >= match.end()]
        subject = before[-1] if before else None
        reference = (
            (before[-2] if len(before) > 1 else None) if points_back else next(iter(after), None)
        )
        if subject is None or reference is None or not holds(subject, reference):
            problems.append(f"false relation: {match.group(1)!r}")
    for match in REGION_RE.finditer(caption):
        obj = scene.objects[0]
        if len(scene.objects) != 1 or REGION[match.group(1)] != (int(obj.y * 3), int(obj.x * 3)):
            problems.append(f"wrong position {match.group(1)!r}")
    for match in BACKGROUND_RE.finditer(caption):
        tone, pattern = match.group(1), match.group(2)
        if (tone and TONE[tone] != scene.tone) or BACKGROUND[pattern] != scene.background:
            problems.append(f"wrong background {match.group(0)!r}")
    return problems


def test_captions_describe_their_scene_and_use_every_construction():
    rng = np.random.default_rng(7)
    seen = []
    for _ in range(300):
        scene = sample_scene(rng)
        for caption in render_captions(scene, rng, 5):
            assert read_caption(caption, scene) == [], caption
            seen.append(caption)
    text = "\n".join(seen)
    for phrase in (*RELATION, "which is", "three shapes", "two shapes", "background", " its "):
        assert phrase in text, f"never used: {phrase!r}"
    for phrase in REGION:
        assert phrase in text, f"never used: {phrase!r}"
    assert " an " in text and " a orange" not in text and " a ivory" not in text


def test_reader_rejects_a_reversed_relation():
    # The reader above is what the caption test trusts: it must catch a backwards statement.
    scene = _two(SceneObject("circle", "red", "small", 0.2, 0.5, 0.16), "square", "blue", 0.8, 0.5)
    assert read_caption("a red circle to the left of a blue square", scene) == []
    assert read_caption("blue square, red circle on its left", scene) == []
    assert read_caption("a red circle to the right of a blue square", scene) != []
    assert read_caption("blue square, red circle on its right", scene) != []
    assert read_caption("a blue circle to the left of a red square", scene) != []


def _two(first: SceneObject, shape: str, colour: str, x: float, y: float, size="large") -> Scene:
    scale = {"small": 0.16, "medium": 0.24, "large": 0.34}[size]
    return Scene((first, SceneObject(shape, colour, size, x, y, scale)), "plain", "dark")


def test_true_relations_of_a_hand_built_scene():
    small_left_low = SceneObject("circle", "red", "small", 0.2, 0.7, 0.16)
    scene = _two(small_left_low, "square", "blue", 0.8, 0.2)
    assert true_relations(scene) == [
        (0, "left_of", 1),
        (0, "below", 1),
        (0, "smaller_than", 1),
        (1, "right_of", 0),
        (1, "above", 0),
        (1, "larger_than", 0),
    ]
    # 0.1 apart horizontally is under the 0.15 margin: no left/right claim.
    close = _two(SceneObject("star", "red", "large", 0.45, 0.2, 0.34), "star", "blue", 0.55, 0.8)
    assert true_relations(close) == [(0, "above", 1), (1, "below", 0)]


def test_scenes_are_valid_and_varied():
    rng = np.random.default_rng(0)
    counts = {1: 0, 2: 0, 3: 0}
    shared = 0
    for _ in range(400):
        scene = sample_scene(rng)
        objects = scene.objects
        counts[len(objects)] += 1
        assert len({(o.colour, o.shape) for o in objects}) == len(objects)
        for o in objects:
            assert o.scale / 2 <= o.x <= 1 - o.scale / 2 and o.scale / 2 <= o.y <= 1 - o.scale / 2
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= 0.2  # some spatial relation holds
        if len(objects) > 1:
            shared += len({o.colour for o in objects}) < len(objects)
            shared += len({o.shape for o in objects}) < len(objects)
    assert all(c > 60 for c in counts.values()), counts
    assert shared > 80  # objects sharing a colour or a shape make binding matter


def test_perturbation_keeps_the_words_but_changes_the_binding():
    rng = np.random.default_rng(1)
    rebound = 0
    for _ in range(300):
        scene = sample_scene(rng)
        edited = perturb_scene(scene, rng)
        assert edited != scene
        bag = (sorted(o.colour for o in scene.objects), sorted(o.shape for o in scene.objects))
        bag_edit = (
            sorted(o.colour for o in edited.objects),
            sorted(o.shape for o in edited.objects),
        )
        pairs = {(o.colour, o.shape) for o in scene.objects}
        pairs_edit = {(o.colour, o.shape) for o in edited.objects}
        rebound += len(scene.objects) > 1 and bag == bag_edit and pairs != pairs_edit
    assert rebound > 20


def test_eval_captions_of_one_image_differ():
    rng = np.random.default_rng(3)
    for _ in range(50):
        captions = render_captions(sample_scene(rng), rng, 5)
        assert len(set(captions)) == 5


def test_rendered_pixels_show_the_scene():
    scene = Scene(
        (
            SceneObject("square", "red", "large", 0.7, 0.7, 0.34),
            SceneObject("circle", "blue", "large", 0.25, 0.25, 0.34),
        ),
        "plain",
        "light",
    )
    image = np.asarray(render_image(scene, 64, np.random.default_rng(0)), dtype=float)
    assert image.shape == (64, 64, 3)
    red = image[42:48, 42:48].mean(axis=(0, 1))  # around (0.7, 0.7) * 64
    blue = image[14:18, 14:18].mean(axis=(0, 1))
    corner = image[60:, :4].mean(axis=(0, 1))
    assert red[0] > red[1] + 100 and red[0] > red[2] + 100, red
    assert blue[2] > blue[0] + 100 and blue[2] > blue[1] + 60, blue
    # light tone: a pale, low-saturation background
    assert corner.min() > 130 and corner.max() - corner.min() < 80, corner


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_synthesize_writes_img2dataset_shards(tmp_path):
    result = synthesize(
        tmp_path, train_samples=1001, eval_images=7, image_size=48, workers=1, progress=False
    )
    assert [p.name for p in result.train_shards] == ["00000.tar", "00001.tar"]
    assert [p.name for p in result.eval_shards] == ["00000.tar"]
    assert (result.train_samples, result.eval_images, result.eval_captions) == (1001, 7, 35)

    first, second = _members(result.train_shards[0]), _members(result.train_shards[1])
    assert len(first) == 3000 and sorted(second) == [
        "00001000.jpg",
        "00001000.json",
        "00001000.txt",
    ]
    assert {name.split(".")[0] for name in first} == {f"{k:08d}" for k in range(1000)}
    stats = json.loads((tmp_path / "train" / "00001_stats.json").read_text())
    assert (stats["count"], stats["successes"]) == (1, 1)
    assert json.loads((tmp_path / "synth.json").read_text())["complete"] is True

    meta = json.loads(second["00001000.json"])
    assert meta["caption"] == second["00001000.txt"].decode() and "captions" not in meta
    scene = _scene_from_json(meta["scene"])
    assert read_caption(meta["caption"], scene) == []
    image = Image.open(io.BytesIO(second["00001000.jpg"]))
    assert (image.format, image.size, image.mode) == ("JPEG", (48, 48), "RGB")

    evals = _members(result.eval_shards[0])
    for k in range(7):
        meta = json.loads(evals[f"{k:08d}.json"])
        assert len(set(meta["captions"])) == 5
        assert evals[f"{k:08d}.txt"].decode() == meta["captions"][0]
        for caption in meta["captions"]:
            assert read_caption(caption, _scene_from_json(meta["scene"])) == []


def _scene_from_json(data: dict) -> Scene:
    return Scene(tuple(SceneObject(**o) for o in data["objects"]), data["background"], data["tone"])


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    kwargs = dict(train_samples=40, eval_images=10, samples_per_shard=16, progress=False)
    one = synthesize(tmp_path / "one", seed=5, workers=1, **kwargs)
    two = synthesize(tmp_path / "two", seed=5, workers=2, **kwargs)
    other = synthesize(tmp_path / "other", seed=6, workers=1, **kwargs)
    assert len(one.train_shards) == 3
    for a, b, c in zip(one.train_shards + one.eval_shards, two.train_shards + two.eval_shards,
                       other.train_shards + other.eval_shards, strict=True):  # fmt: skip
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_rerun_replaces_its_own_shards_and_refuses_foreign_ones(tmp_path):
    synthesize(
        tmp_path / "set", train_samples=30, eval_images=5, samples_per_shard=10, progress=False
    )
    smaller = synthesize(
        tmp_path / "set", train_samples=12, eval_images=5, samples_per_shard=10, progress=False
    )
    assert sorted(p.name for p in (tmp_path / "set" / "train").glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
    ]
    assert len(smaller.train_shards) == 2

    (tmp_path / "foreign" / "train").mkdir(parents=True)
    (tmp_path / "foreign" / "train" / "mine.tar").write_bytes(b"")
    with pytest.raises(InputError, match=r"mine\.tar"):
        synthesize(tmp_path / "foreign", train_samples=5, eval_images=5, progress=False)
    assert (tmp_path / "foreign" / "train" / "mine.tar").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 8),
        ("train_samples", 0),
        ("eval_images", -1),
        ("samples_per_shard", 0),
        ("seed", -1),
    ],
)
def test_bad_arguments_name_the_field(tmp_path, field, value):
    kwargs = dict(train_samples=5, eval_images=5, progress=False)
    kwargs[field] = value
    with pytest.raises(InputError, match=field):
        synthesize(tmp_path, **kwargs)
    assert not (tmp_path / "synth.json").exists()


def test_builtin_data_reuses_a_complete_set(tmp_path):
    from orchestrator.assets import ensure_builtin_data
    from orchestrator.config import Workspace

    workspace = Workspace(home=tmp_path)
    first = ensure_builtin_data(workspace, train_samples=20, eval_images=5)
    shard = Path(first.train) / "00000.tar"
    stamp = shard.stat().st_mtime_ns
    again = ensure_builtin_data(workspace, train_samples=20, eval_images=5)
    assert again == first
    assert shard.stat().st_mtime_ns == stamp
    changed = ensure_builtin_data(workspace, train_samples=20, eval_images=5, seed=1)
    assert changed != first and (Path(changed.train) / "00000.tar").read_bytes() != b""


def test_caption_is_deterministic_for_a_generator_state():
    scene = sample_scene(np.random.default_rng(11))
    assert render_caption(scene, np.random.default_rng(4)) == render_caption(
        scene, np.random.default_rng(4)
    )


def _colour_shape_bag(caption: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    named = dict.fromkeys(
        (COLOUR[m.group(2)], SHAPE[m.group(3)]) for m in MENTION_RE.finditer(caption)
    )
    return tuple(sorted(c for c, _ in named)), tuple(sorted(s for _, s in named))


def test_eval_set_has_headroom_beyond_colour_and_shape_words(tmp_path):
    """On the default 1k-image eval set, expected text->image R@1 of two ideal readers (ties
    broken at random): one that checks everything a caption says stays clearly below 100 (the
    captions leave some images indistinguishable), one that only knows which colours and
    shapes are present is far below it (binding, relations, size and position decide)."""
    result = synthesize(tmp_path, train_samples=1, eval_images=1000, workers=1, progress=False)
    scenes, captions = [], []
    with tarfile.open(result.eval_shards[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                meta = json.loads(tar.extractfile(member).read())
                scenes.append(_scene_from_json(meta["scene"]))
                captions += [(c, len(scenes) - 1) for c in meta["captions"]]
    bags: dict[tuple, list[int]] = {}
    for index, scene in enumerate(scenes):
        key = (
            tuple(sorted(o.colour for o in scene.objects)),
            tuple(sorted(o.shape for o in scene.objects)),
        )
        bags.setdefault(key, []).append(index)
    bag_r1, full_r1 = [], []
    for caption, owner in captions:
        candidates = bags[_colour_shape_bag(caption)]
        assert owner in candidates
        matching = [i for i in candidates if not read_caption(caption, scenes[i])]
        assert owner in matching
        bag_r1.append(1 / len(candidates))
        full_r1.append(1 / len(matching))
    full, bag = 100 * np.mean(full_r1), 100 * np.mean(bag_r1)
    assert 80 < full < 97, full
    assert bag < full - 20, (bag, full)
