"""A small DriveLM-nuScenes-format dataset written by kd itself, to try ``kd data import drivelm`` on.

DriveLM's real files need nuScenes (~300 GB, behind a licence), so tests and walk-throughs use
this stand-in with the same shape: ``OUT/drivelm/drivelm_example.json`` nests scenes, key frames,
``QA`` lists per task (perception, prediction, planning, behavior; every QA with ``Q``, ``A``,
``C``, ``con_up``, ``con_down``, ``cluster``, ``layer``), ``key_object_infos`` and six camera
paths of the form ``../nuscenes/samples/CAM_FRONT/<frame_token>.jpg``, relative to the JSON's
folder, as in DriveLM.

Each key frame is one synthetic scene of ``kd.pipeline.demo.synth`` (its questions and
rule-based answers); the six camera images are views cut out of its top-down render: the upper
half ahead (front; left and right quarters for the front corners), the lower half turned around
(back). Same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kd.pipeline.importers.drivelm import CAMERAS

from .synth import BY_CAPABILITY, QUESTIONS, Scene, answer, render, sample_scene
from .synth.render import SIZE, road_left, row_top

_HALF = SIZE // 2
# Crop box (left, upper, right, lower) of the top-down render, and whether the view looks backwards.
_VIEWS = {
    "CAM_FRONT": ((0, 0, SIZE, _HALF), False),
    "CAM_FRONT_LEFT": ((0, 0, _HALF, _HALF), False),
    "CAM_FRONT_RIGHT": ((_HALF, 0, SIZE, _HALF), False),
    "CAM_BACK": ((0, _HALF, SIZE, SIZE), True),
    "CAM_BACK_LEFT": ((_HALF, _HALF, SIZE, SIZE), True),
    "CAM_BACK_RIGHT": ((0, _HALF, _HALF, SIZE), True),
}
BEHAVIOR_Q = "Will the ego vehicle keep moving? Answer with one of: yes, no."


def _token(*parts: Any) -> str:
    """A nuScenes-style 32-hex token, derived from ``parts`` (stable across runs)."""
    return hashlib.md5("-".join(map(str, parts)).encode()).hexdigest()


def camera_views(scene: Scene) -> dict[str, Image.Image]:
    """The six camera images of ``scene``, ``SIZE`` x ``SIZE`` each, in ``CAMERAS`` order."""
    top = render(scene)
    views = {}
    for cam in CAMERAS:
        box, backwards = _VIEWS[cam]
        view = top.crop(box)
        if backwards:
            view = view.rotate(180)
        views[cam] = view.resize((SIZE, SIZE), Image.NEAREST)
    return views


def _objects(scene: Scene) -> dict[str, dict[str, Any]]:
    out = {}
    for j, v in enumerate(scene.vehicles, start=1):
        x0 = road_left(scene.n_lanes) + 16 * v.lane + (2 if v.kind == "truck" else 4)
        y0 = row_top(v.row)
        w, h = (12, 13) if v.kind == "truck" else (8, 11)
        cam = "CAM_BACK" if v.row == "behind" else "CAM_FRONT"
        out[f"<c{j},{cam},{x0 + w / 2:.1f},{y0 + h / 2:.1f}>"] = {
            "Category": "Vehicle", "Status": "Moving", "Visual_description": f"{v.colour.capitalize()} {v.kind}.",
            "2d_bbox": [float(x0), float(y0), float(x0 + w), float(y0 + h)]}
    return out


def _qa(q: str, a: str) -> dict[str, Any]:
    return {"Q": q, "A": a, "C": None, "con_up": None, "con_down": None, "cluster": None, "layer": None}


def _frame_qa(scene: Scene, k: int) -> dict[str, list[dict[str, Any]]]:
    per, rea = BY_CAPABILITY["perception"], BY_CAPABILITY["reasoning"]
    action = answer("ego_action", scene)
    return {
        "perception": [_qa(q.prompt(), answer(q.name, scene)) for q in (per[k % len(per)], per[(k + 1) % len(per)])],
        "prediction": [_qa(rea[k % len(rea)].prompt(), answer(rea[k % len(rea)].name, scene))],
        "planning": [_qa(QUESTIONS["ego_action"].prompt(), action)],
        "behavior": [_qa(BEHAVIOR_Q, "no" if action == "stop" else "yes")],
    }


def write_drivelm_example(out_dir: str | Path, n_scenes: int = 2, frames_per_scene: int = 2,
                          seed: int = 0) -> Path:
    """Write the example under ``out_dir``; return the JSON file's path (5 QAs per key frame)."""
    if n_scenes < 1 or frames_per_scene < 1:
        raise ValueError(f"need at least one scene and one frame, got {n_scenes} x {frames_per_scene}")
    out = Path(out_dir)
    json_dir = out / "drivelm"
    json_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    for s in range(n_scenes):
        scene_token = _token(seed, "scene", s)
        frames: dict[str, Any] = {}
        description = None
        for f in range(frames_per_scene):
            scene = sample_scene(np.random.default_rng([seed, s, f]))
            frame_token = _token(seed, "frame", s, f)
            paths = {}
            for cam, view in camera_views(scene).items():
                rel = Path("nuscenes", "samples", cam, f"{frame_token}.jpg")
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                view.save(out / rel, format="JPEG", quality=95)
                paths[cam] = f"../{rel.as_posix()}"
            frames[frame_token] = {"key_object_infos": _objects(scene), "QA": _frame_qa(scene, s + f),
                                   "image_paths": paths}
            if description is None:
                description = (f"The ego vehicle drives on a {scene.n_lanes}-lane road"
                               f"{' towards a crosswalk' if scene.crosswalk else ''}.")
        data[scene_token] = {"scene_description": description, "key_frames": frames}
    path = json_dir / "drivelm_example.json"
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
