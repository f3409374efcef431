"""DriveLM-nuScenes QA JSON to kd records: one record per question, six cameras per record.

The source (``v1_1_train_nus.json`` and friends) nests ``{scene_token: {"scene_description",
"key_frames": {frame_token: {"key_object_infos", "QA": {task: [{"Q", "A", "C", "con_up",
"con_down", "cluster", "layer"}, ...]}, "image_paths": {camera: path}}}}}``.

* id: ``scene_token/frame_token/task/index`` (index in that task's list): stable across
  re-imports of the same file, whatever else is added to it.
* capability from the task through ``CAPABILITY_MAP`` (perception -> perception, prediction ->
  reasoning, planning and behavior -> planning); ``capability_map`` overrides or adds tasks, and a
  task in none of them is an error (a silent default would train a teacher on the wrong rows).
* images: the cameras of ``CAMERAS``, always in that order (front, front-left, front-right, back,
  back-left, back-right), so image ``i`` of every record is the same camera; relative paths
  resolve against ``images_root`` (default: the JSON file's folder, as DriveLM's ``../nuscenes``
  paths expect). A missing camera is an error.
* prompt: ``Q`` as it is (object tags like ``<c1,CAM_BACK,1088.3,497.5>`` kept); answer: ``A``.
* metadata: scene and frame tokens, task, index, the scene description, the frame's
  ``key_object_infos`` and every other QA field (``C``, ``con_up``, ...) under ``qa``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import ImagePaths, ImportResult, Problems, Staging, nonempty_str, read_json, type_name

CAMERAS = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
CAPABILITY_MAP = {"perception": "perception", "prediction": "reasoning", "planning": "planning",
                  "behavior": "planning"}
FORMAT = "drivelm"


def parse_capability_map(spec: str | Path | Mapping[str, str] | None) -> dict[str, str]:
    """``CAPABILITY_MAP`` updated by ``spec``: ``'task=cap,task=cap'``, a JSON file ``{task: cap}`` or a mapping."""
    out = dict(CAPABILITY_MAP)
    if spec is None or spec == "":
        return out
    if isinstance(spec, Mapping):
        pairs = dict(spec)
    elif str(spec).strip().startswith("{") or Path(spec).suffix == ".json" and Path(spec).is_file():
        text = str(spec) if str(spec).strip().startswith("{") else Path(spec).read_text(encoding="utf-8")
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"capability map {spec}: invalid JSON: {e.msg}") from e
        if not isinstance(pairs, dict):
            raise ValueError(f"capability map {spec}: must be a JSON object {{task: capability}}")
    else:
        pairs = {}
        for item in str(spec).split(","):
            task, sep, cap = item.partition("=")
            if not sep or not task.strip() or not cap.strip():
                raise ValueError(f"capability map: {item.strip()!r} is not task=capability "
                                 "(e.g. 'prediction=reasoning,behavior=planning')")
            pairs[task.strip()] = cap.strip()
    for task, cap in pairs.items():
        if not nonempty_str(cap):
            raise ValueError(f"capability map: task {task!r} needs a non-empty capability, got {cap!r}")
    out.update(pairs)
    return out


def _frame_images(frame: Mapping[str, Any], where: str, source: Path, cameras: Sequence[str],
                  paths: ImagePaths, problems: Problems) -> list[str] | None:
    cams = frame.get("image_paths")
    if not isinstance(cams, dict):
        problems.add(source, where, "image_paths",
                     f"must be an object {{camera: path}}, got {type_name(cams)}" if "image_paths" in frame
                     else "missing (needs the six camera paths)")
        return None
    out: list[str] = []
    for cam in cameras:
        if cam not in cams:
            problems.add(source, where, f"image_paths.{cam}", f"missing camera (cameras are {list(cameras)}; "
                                                              f"this frame has {sorted(cams)})")
            continue
        p, err = paths.resolve(cams[cam])
        if err:
            problems.add(source, where, f"image_paths.{cam}", err)
        else:
            out.append(str(p))
    return out if len(out) == len(cameras) else None


def _qa_record(qa: Any, where: str, source: Path, rid: str, capability: str, images: list[str] | None,
               meta: dict[str, Any], problems: Problems) -> dict[str, Any] | None:
    if not isinstance(qa, dict):
        problems.add(source, where, "", f"a QA entry must be an object {{Q, A, ...}}, got {type_name(qa)}")
        return None
    ok = True
    for key in ("Q", "A"):
        if key not in qa:
            problems.add(source, where, key, "missing")
            ok = False
        elif not nonempty_str(qa[key]):
            problems.add(source, where, key, f"must be a non-empty string, got {qa[key]!r}")
            ok = False
    if not ok or images is None:
        return None
    extra = {k: v for k, v in qa.items() if k not in ("Q", "A")}
    return {"id": rid, "images": images, "prompt": qa["Q"], "answer": qa["A"], "capability": capability,
            **meta, **({"qa": extra} if extra else {})}


def import_drivelm(src: str | Path, out: str | Path, *, images_root: str | Path | None = None,
                   capability_map: str | Path | Mapping[str, str] | None = None,
                   cameras: Sequence[str] = CAMERAS, force: bool = False) -> ImportResult:
    """Convert a DriveLM-nuScenes QA JSON file into ``out/data.jsonl`` (see the module docstring)."""
    source = Path(src).expanduser()
    caps = parse_capability_map(capability_map)
    cameras = tuple(cameras)
    if not cameras or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras must be distinct camera names, got {list(cameras)}")
    paths = ImagePaths(Path(images_root).expanduser() if images_root else source.resolve().parent)
    problems = Problems(FORMAT)
    with Staging(out, FORMAT, force=force) as staging:
        data = read_json(source, problems)
        if data is not None and not isinstance(data, dict):
            problems.add(source, "", "file", f"must be a JSON object {{scene_token: scene}}, got {type_name(data)}")
        for scene_token, scene in (data or {}).items() if isinstance(data, dict) else ():
            _scene(source, scene_token, scene, caps, cameras, paths, problems, staging)
        manifest = {"source": str(source.resolve()), "images_root": str(paths.root.resolve()),
                    "cameras": list(cameras), "capability_map": caps}
        return staging.commit(problems, manifest)


def _scene(source: Path, scene_token: str, scene: Any, caps: Mapping[str, str], cameras: Sequence[str],
           paths: ImagePaths, problems: Problems, staging: Staging) -> None:
    where = f"scene {scene_token}"
    if not isinstance(scene, dict):
        problems.add(source, where, "", f"a scene must be an object {{scene_description, key_frames}}, "
                                        f"got {type_name(scene)}")
        return
    frames = scene.get("key_frames")
    if not isinstance(frames, dict):
        problems.add(source, where, "key_frames", f"must be an object {{frame_token: frame}}, got {type_name(frames)}"
                     if "key_frames" in scene else "missing")
        return
    for frame_token, frame in frames.items():
        fwhere = f"{where} / frame {frame_token}"
        if not isinstance(frame, dict):
            problems.add(source, fwhere, "", f"a key frame must be an object {{QA, image_paths, ...}}, "
                                             f"got {type_name(frame)}")
            continue
        images = _frame_images(frame, fwhere, source, cameras, paths, problems)
        qa_by_task = frame.get("QA")
        if not isinstance(qa_by_task, dict):
            problems.add(source, fwhere, "QA", f"must be an object {{task: [QA, ...]}}, got {type_name(qa_by_task)}"
                         if "QA" in frame else "missing")
            continue
        meta: dict[str, Any] = {"scene_token": scene_token, "frame_token": frame_token}
        if "scene_description" in scene:
            meta["scene_description"] = scene["scene_description"]
        meta.update({k: v for k, v in frame.items() if k not in ("QA", "image_paths")})
        for task, qas in qa_by_task.items():
            twhere = f"{fwhere} / QA.{task}"
            if task not in caps:
                problems.add(source, twhere, "task", f"unknown task {task!r}: map it with --capability-map "
                                                     f"(known: {sorted(caps)})")
                continue
            if not isinstance(qas, list):
                problems.add(source, twhere, "", f"must be a list of QA entries, got {type_name(qas)}")
                continue
            for i, qa in enumerate(qas):
                rid = f"{scene_token}/{frame_token}/{task}/{i}"
                rec = _qa_record(qa, f"{twhere}[{i}]", source, rid, caps[task], images,
                                 {**meta, "task": task, "qa_index": i}, problems)
                if rec is not None:
                    first = staging.claim_id(rid, f"{twhere}[{i}]")
                    if first is not None:
                        problems.add(source, f"{twhere}[{i}]", "id", f"duplicate id {rid!r} (first at {first})")
                    else:
                        staging.add(rec)
