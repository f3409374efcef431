"""Write a synthetic driving dataset in the stage-one JSONL format (see ``kd.pipeline.common.dataset``).

``n`` counts *scenes*. Each scene gives one image and three records, one per capability:
a perception question (the five types in turn: ``scene % 5``), a reasoning question
(``scene % 3``) and the planning question. Splits are contiguous ranges of scenes, so no image
appears in two splits (a question about a test image never leaks through a train record).

Scene ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the same seed gives
byte-identical files, and scene ``i`` is the same whatever ``n`` is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .questions import ACTIONS, BY_CAPABILITY, QUESTIONS, answer
from .render import render
from .questions import sample_scene
from .scene import ACTION_WEIGHTS

SPLIT_NAMES = ("train", "val", "test")
FORMAT_VERSION = 1
_ACTION_P = np.array([ACTION_WEIGHTS[a] for a in ACTIONS]) / sum(ACTION_WEIGHTS.values())


def split_sizes(n: int, splits: tuple[float, float, float]) -> dict[str, int]:
    """Scenes per split: cumulative rounding, so the sizes add up to ``n`` exactly."""
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be 3 non-negative fractions with a positive sum, got {splits}")
    cum = np.cumsum(splits) / sum(splits)
    bounds = [0] + [int(round(n * c)) for c in cum[:-1]] + [n]
    return {name: bounds[k + 1] - bounds[k] for k, name in enumerate(SPLIT_NAMES)}


def scene_records(i: int, seed: int, image: str, split: str) -> tuple[list[dict], object]:
    """The scene for index ``i`` and its three records (perception, reasoning, planning)."""
    rng = np.random.default_rng([seed, i])
    action = ACTIONS[int(rng.choice(len(ACTIONS), p=_ACTION_P))]
    scene = sample_scene(rng, action)
    per = BY_CAPABILITY["perception"]
    rea = BY_CAPABILITY["reasoning"]
    chosen = (per[i % len(per)], rea[i % len(rea)], BY_CAPABILITY["planning"][0])
    records = [
        {
            "id": f"syn{seed}-{i:06d}-{q.name}",
            "images": [image],
            "prompt": q.prompt(),
            "answer": answer(q.name, scene),
            "capability": q.capability,
            "split": split,
            "scene": i,
            "question": q.name,
        }
        for q in chosen
    ]
    return records, scene


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def synthesize(out_dir: str | Path, n: int, seed: int = 0,
               splits: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, Path]:
    """Write ``n`` scenes (``3 n`` records) to ``out_dir``; return ``{split: jsonl path}``.

    Layout: ``images/NNNNNN.png``, ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (a split with
    no scenes gets no file: a stale one from an earlier run is removed) and ``synth.json``
    (seed, sizes, format version). Other files already in ``out_dir`` are left alone.
    """
    if n < 1:
        raise ValueError(f"n (number of scenes) must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(n, splits)
    paths: dict[str, Path] = {}
    start = 0
    for split in SPLIT_NAMES:
        path = out / f"{split}.jsonl"
        stop = start + sizes[split]
        if stop == start:
            path.unlink(missing_ok=True)
            continue
        lines = []
        for i in range(start, stop):
            rel = f"images/{i:06d}.png"
            records, scene = scene_records(i, seed, rel, split)
            render(scene).save(out / rel, format="PNG", compress_level=6)
            lines.extend(json.dumps(r, ensure_ascii=False) for r in records)
        _write_text(path, "\n".join(lines) + "\n")
        paths[split] = path
        start = stop
    manifest = {
        "generator": "kd.pipeline.demo.synth",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_scenes": n,
        "records_per_scene": 3,
        "scenes_per_split": sizes,
        "questions": {name: list(q.answers) for name, q in QUESTIONS.items()},
    }
    _write_text(out / "synth.json", json.dumps(manifest, indent=2) + "\n")
    return paths
