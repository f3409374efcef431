"""Synthetic driving scenes: ground-truth rules, rendering, determinism, splits, class balance."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kd.pipeline.common.dataset import load_image, load_records
from kd.pipeline.demo.synth import (
    ACTIONS,
    BY_CAPABILITY,
    QUESTIONS,
    Pedestrian,
    Scene,
    Vehicle,
    answer,
    exact_match,
    render,
    sample_scene,
    scene_records,
    split_sizes,
    synthesize,
)
from kd.pipeline.demo.synth.render import LAMPS, RGB, road_left, row_top


def _v(lane: int, row: str, colour: str = "red", kind: str = "car") -> Vehicle:
    return Vehicle(kind=kind, lane=lane, row=row, colour=colour)


def _answers(s: Scene) -> dict[str, str]:
    return {name: answer(name, s) for name in QUESTIONS}


# ---- ground truth on hand-built scenes -------------------------------------------------------

def test_empty_road():
    a = _answers(Scene(n_lanes=3, ego_lane=1))
    assert a == {"vehicle_count": "0", "light_colour": "none", "ahead_colour": "none",
                 "pedestrian_present": "no", "ego_lane": "middle", "left_safe": "yes",
                 "right_safe": "yes", "main_hazard": "none", "ego_action": "keep lane"}


@pytest.mark.parametrize("scene,action,hazard", [
    (Scene(3, 1, light="red"), "stop", "traffic light"),
    (Scene(3, 1, light="green", crosswalk=True, pedestrians=(Pedestrian(True, lane=2),)), "stop", "pedestrian"),
    # the crossing pedestrian outranks a yellow light and a blocking vehicle
    (Scene(2, 0, light="yellow", crosswalk=True, vehicles=(_v(0, "near"),),
           pedestrians=(Pedestrian(True, lane=0),)), "stop", "pedestrian"),
    (Scene(3, 1, light="yellow", vehicles=(_v(1, "near"),)), "slow down", "traffic light"),
    (Scene(3, 1, light="green", pedestrians=(Pedestrian(False, row="near"),)), "keep lane", "none"),
    (Scene(3, 1, vehicles=(_v(1, "far"),)), "keep lane", "none"),  # far ahead does not block
    (Scene(3, 1, vehicles=(_v(1, "near"),)), "change left", "vehicle ahead"),
    (Scene(3, 1, vehicles=(_v(1, "near"), _v(0, "far"))), "change left", "vehicle ahead"),
    (Scene(3, 1, vehicles=(_v(1, "near"), _v(0, "beside"))), "change right", "vehicle ahead"),
    (Scene(3, 1, vehicles=(_v(1, "near"), _v(0, "behind"), _v(2, "near"))), "slow down", "vehicle ahead"),
    (Scene(3, 0, vehicles=(_v(0, "near"),)), "change right", "vehicle ahead"),  # no lane on the left
    (Scene(2, 1, vehicles=(_v(1, "near"), _v(0, "near", kind="truck"))), "slow down", "vehicle ahead"),
])
def test_action_and_hazard_rules(scene: Scene, action: str, hazard: str):
    assert answer("ego_action", scene) == action
    assert answer("main_hazard", scene) == hazard


def test_lane_change_safety_and_perception():
    s = Scene(3, 1, light="green", vehicles=(_v(0, "far", "blue"), _v(1, "far", "white"), _v(2, "behind")))
    a = _answers(s)
    assert (a["left_safe"], a["right_safe"]) == ("yes", "no")
    assert (a["vehicle_count"], a["ahead_colour"], a["light_colour"]) == ("3", "white", "green")
    s = Scene(3, 1, vehicles=(_v(1, "near", "black"), _v(1, "far", "white")))
    assert answer("ahead_colour", s) == "black"  # the nearest one
    assert answer("ego_lane", Scene(2, 0)) == "left" and answer("ego_lane", Scene(2, 1)) == "right"
    assert answer("ego_lane", Scene(3, 2)) == "right"
    assert answer("left_safe", Scene(2, 0)) == "no" and answer("right_safe", Scene(2, 1)) == "no"
    assert answer("pedestrian_present", Scene(2, 0, pedestrians=(Pedestrian(False, row="behind"),))) == "yes"


@pytest.mark.parametrize("kw", [
    dict(n_lanes=4, ego_lane=0),
    dict(n_lanes=2, ego_lane=2),
    dict(n_lanes=2, ego_lane=0, vehicles=(_v(0, "beside"),)),       # on the ego car
    dict(n_lanes=2, ego_lane=0, vehicles=(_v(1, "far"), _v(1, "far", "blue"))),
    dict(n_lanes=2, ego_lane=0, vehicles=(Vehicle("car", 1, "far", "green"),)),
    dict(n_lanes=2, ego_lane=0, pedestrians=(Pedestrian(True, 0),)),  # crossing without crosswalk
    dict(n_lanes=2, ego_lane=0, light="blue"),
])
def test_scene_rejects_inconsistent(kw):
    with pytest.raises(ValueError):
        Scene(**kw)


def test_exact_match():
    assert exact_match("  Change Left. ", "change left")
    assert exact_match("change   left", "change left")
    assert exact_match("YES", "yes") and not exact_match("yes", "no")
    assert not exact_match("left", "change left")


def test_sample_scene_hits_requested_action():
    rng = np.random.default_rng(0)
    for a in ACTIONS:
        assert answer("ego_action", sample_scene(rng, a)) == a


# ---- rendering --------------------------------------------------------------------------------

def test_render_shows_each_object_in_its_colour():
    s = Scene(3, 1, light="yellow", crosswalk=True,
              vehicles=(_v(0, "far", "blue"), _v(1, "near", "black", "truck"), _v(2, "behind", "white")),
              pedestrians=(Pedestrian(True, lane=2), Pedestrian(False, row="beside")))
    im = render(s)
    assert im.mode == "RGB" and im.size == (64, 64)
    px = np.asarray(im)
    left = road_left(3)

    def centre(lane: int, row: str) -> tuple:
        return tuple(px[row_top(row) + 6, left + 16 * lane + 8])

    assert centre(0, "far") == RGB["blue"]
    assert centre(1, "near") == RGB["black"]
    assert centre(2, "behind") == RGB["white"]
    assert centre(1, "beside") == RGB["ego"]
    assert centre(0, "near") == RGB["road"]
    right = left + 48
    assert tuple(px[1 + 5 + 1, right + 3]) == LAMPS["yellow"]  # middle lamp lit
    assert tuple(px[2, right + 3]) == RGB["lamp_off"]
    colours = {tuple(c) for c in px.reshape(-1, 3)}
    assert RGB["pedestrian"] in colours and RGB["crosswalk"] in colours
    assert np.array_equal(px, np.asarray(render(s)))  # deterministic


# ---- writer -----------------------------------------------------------------------------------

def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_synthesize_deterministic_and_valid(tmp_path: Path):
    t = time.perf_counter()
    paths = synthesize(tmp_path / "a", n=60, seed=7)
    elapsed = time.perf_counter() - t
    synthesize(tmp_path / "b", n=60, seed=7)
    synthesize(tmp_path / "c", n=60, seed=8)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb  # byte-identical
    assert fa["train.jsonl"] != fc["train.jsonl"]
    assert len([k for k in fa if k.startswith("images/")]) == 60
    assert elapsed < 5, elapsed

    assert set(paths) == {"train", "val", "test"}
    records = {split: load_records(p) for split, p in paths.items()}
    assert {s: len(r) for s, r in records.items()} == {"train": 144, "val": 18, "test": 18}
    all_recs = [r for rs in records.values() for r in rs]
    assert len({r.id for r in all_recs}) == len(all_recs)
    for split, rs in records.items():
        assert {r.meta["split"] for r in rs} == {split}
    images = {s: {p for r in rs for p in r.images} for s, rs in records.items()}
    assert not (images["train"] & images["val"]) and not (images["train"] & images["test"])
    assert not (images["val"] & images["test"])
    assert Counter(r.capability for r in all_recs) == {"perception": 60, "reasoning": 60, "planning": 60}
    for r in all_recs:
        q = QUESTIONS[r.meta["question"]]
        assert r.capability == q.capability and r.answer in q.answers and r.prompt == q.prompt()
        assert len(r.answer.split()) <= 2
    manifest = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert manifest["seed"] == 7 and manifest["n_scenes"] == 60


def test_records_match_rendered_scene(tmp_path: Path):
    paths = synthesize(tmp_path, n=12, seed=3)
    for r in load_records(paths["train"]):
        i = r.meta["scene"]
        recs, scene = scene_records(i, 3, f"images/{i:06d}.png", "train")
        assert {x["id"]: x["answer"] for x in recs}[r.id] == r.answer
        assert np.array_equal(np.asarray(render(scene)), np.asarray(load_image(r.images[0])))


def test_scene_independent_of_n(tmp_path: Path):
    synthesize(tmp_path / "small", n=10, seed=1)
    synthesize(tmp_path / "big", n=30, seed=1)
    for i in range(10):
        name = f"images/{i:06d}.png"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()


def test_split_sizes_and_stale_files(tmp_path: Path):
    assert split_sizes(100, (0.8, 0.1, 0.1)) == {"train": 80, "val": 10, "test": 10}
    assert split_sizes(7, (0.8, 0.1, 0.1)) == {"train": 6, "val": 0, "test": 1}
    assert split_sizes(5, (1, 1, 1)) == {"train": 2, "val": 1, "test": 2}
    assert sum(split_sizes(997, (0.7, 0.2, 0.1)).values()) == 997
    with pytest.raises(ValueError):
        split_sizes(10, (0.5, -0.1, 0.6))
    synthesize(tmp_path, n=20, seed=0)
    assert (tmp_path / "val.jsonl").exists()
    paths = synthesize(tmp_path, n=1, seed=0)
    assert set(paths) == {"train"} and not (tmp_path / "val.jsonl").exists()
    assert len(load_records(paths["train"])) == 3
    with pytest.raises(ValueError):
        synthesize(tmp_path, n=0)


# ---- class balance ----------------------------------------------------------------------------

def test_class_balance(capsys):
    """Majority-class guessing stays near chance: <= 45% for multi-class questions, <= 53% for yes/no.

    Measured over the scene distribution that ``synthesize`` draws (each question is asked on a
    fixed cycle of scenes, independent of the scene's content, so records follow the same shares).
    """
    counts = {name: Counter() for name in QUESTIONS}
    for i in range(2500):
        _, scene = scene_records(i, 0, "x.png", "train")
        for name in QUESTIONS:
            counts[name][answer(name, scene)] += 1
    lines = []
    for name, c in counts.items():
        n = sum(c.values())
        share = {a: c[a] / n for a in QUESTIONS[name].answers}
        lines.append(f"{name:20s} " + " ".join(f"{a}={v:.2f}" for a, v in share.items()))
        limit = 0.53 if len(QUESTIONS[name].answers) == 2 else 0.45
        assert max(share.values()) <= limit, (name, share)
        assert min(share.values()) >= 0.05, (name, share)  # every answer actually occurs
    with capsys.disabled():
        print("\nanswer shares over 2500 scenes:\n" + "\n".join(lines))
    assert set(BY_CAPABILITY) == {"perception", "reasoning", "planning"}
