"""kd data import: DriveLM, LLaVA, Parquet and HF datasets into kd's JSONL, then through a cache build
and a few distillation steps; every kind of bad entry named, and nothing written when one is found."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from kd.cli import app
from kd.pipeline.common.dataset import load_records
from kd.pipeline.demo.drivelm_example import write_drivelm_example
from kd.pipeline.importers import CAMERAS, Columns, ImportFailed, import_dataset, parse_capability_map

runner = CliRunner()


def _png(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _drivelm(root: Path, scenes: int = 1, frames: int = 1) -> Path:
    return write_drivelm_example(root / "drivelm_src", scenes, frames, seed=0)


def _llava(root: Path) -> Path:
    """Two conversations: one multi-turn with two images (the second shown at turn 3), one text-only."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "imgs" / "a.png").write_bytes(_png((200, 30, 30)))
    (root / "imgs" / "b.png").write_bytes(_png((30, 30, 200)))
    entries = [
        {"id": "c1", "image": ["imgs/a.png", "imgs/b.png"], "source": "unit",
         "conversations": [{"from": "system", "value": "You drive carefully."},
                           {"from": "human", "value": "<image>\nWhat colour is the light?"},
                           {"from": "gpt", "value": "red"},
                           {"from": "human", "value": "And now? <image>"},
                           {"from": "gpt", "value": "blue"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "Should the ego car stop at a red light?"},
                                    {"from": "gpt", "value": "yes"}]},
    ]
    path = root / "llava.json"
    path.write_text(json.dumps(entries))
    return path


def _parquet(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "cam.png").write_bytes(_png((30, 200, 30)))
    red = _png((200, 30, 30))
    table = pa.table({
        "qid": ["p0", "p1", "p2", "p3"],
        "question": ["What colour is the light?", "Is the road clear?", "What colour is the car?", "Stop?"],
        "response": ["red", "yes", "green", "no"],
        "picture": [{"bytes": red, "path": "x.png"}, {"bytes": red, "path": "y.png"},  # same bytes: one file
                    {"bytes": None, "path": "cam.png"}, None],
        "task": ["perception", "reasoning", "perception", "planning"],
        "speed": [1.5, 2.0, float("nan"), 3.0],
        "blob": [b"x", b"y", b"z", b"w"],  # binary: not metadata
    })
    path = root / "train.parquet"
    pq.write_table(table, path)
    return path


def _hf(root: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"id": ["h0", "h1", "h2"], "prompt": ["What colour is the light?", "Is it safe?", "Lane?"],
         "answer": ["red", "no", "left"], "image": [Image.new("RGB", (24, 24), (200, 30, 30)),
                                                     Image.new("RGB", (24, 24), (30, 30, 200)), None]},
        features=datasets.Features({"id": datasets.Value("string"), "prompt": datasets.Value("string"),
                                    "answer": datasets.Value("string"), "image": datasets.Image()}))
    path = root / "hf_ds"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


SOURCES = {
    "drivelm": (_drivelm, {}),
    "llava": (_llava, {"capability": "reasoning"}),
    "parquet": (_parquet, {"columns": Columns(id="qid", prompt="question", answer="response", image="picture",
                                              capability_column="task")}),
    "hf": (_hf, {"columns": Columns(capability="perception")}),
}
EXPECTED = {"drivelm": 5, "llava": 3, "parquet": 4, "hf": 3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from kd.pipeline.demo.tiny_models import build_preset

    root = tmp_path_factory.mktemp("import_models")
    return build_preset("vlm", "teacher", root / "teacher"), build_preset("vlm", "student", root / "student", seed=5)


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_each_format_imports_builds_a_cache_and_distils(fmt, models, tmp_path):
    from kd.pipeline.build import BuildRequest, build_cache
    from kd.pipeline.distill import distill, load_config

    make, options = SOURCES[fmt]
    res = import_dataset(fmt, make(tmp_path / "src"), tmp_path / "out", **options)
    assert res.data == tmp_path / "out" / "data.jsonl" and res.records == EXPECTED[fmt]
    records = load_records(res.data)
    assert len(records) == EXPECTED[fmt]
    teacher, student = models
    cache = build_cache(BuildRequest(teacher=str(teacher), data=str(res.data), out=str(tmp_path / "caches"),
                                     engine="hf", top_k=8, shard_size=64, self_check=False))
    assert cache.samples == EXPECTED[fmt]
    cfg = load_config(student=str(student), data=str(res.data), out=str(tmp_path / "run"), quiet=True,
                      teachers={"teacher": cache.path},
                      train={"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 4, "max_steps": 2})
    run = distill(cfg)
    assert run.steps == 2
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(math.isfinite(r["terms"]["kd/teacher"]) and r["terms"]["kd/teacher"] > 0 for r in train)


# --- what each importer writes -------------------------------------------------------------------

def test_drivelm_records_ids_cameras_capabilities_and_metadata(tmp_path):
    src = _drivelm(tmp_path, scenes=2, frames=2)
    res = import_dataset("drivelm", src, tmp_path / "out")
    recs = load_records(res.data)
    assert len(recs) == 20 and res.capabilities == {"perception": 8, "planning": 8, "reasoning": 4}
    data = json.loads(src.read_text())
    scene, frames = next(iter(data.items()))
    frame_token, frame = next(iter(frames["key_frames"].items()))
    first = recs[0]
    assert first.id == f"{scene}/{frame_token}/perception/0"
    assert first.prompt == frame["QA"]["perception"][0]["Q"] and first.answer == frame["QA"]["perception"][0]["A"]
    assert [p.parent.name for p in first.images] == list(CAMERAS)  # the documented order, every record
    assert all(p.is_absolute() and p.is_file() for p in first.images)
    assert first.meta["qa"] == {k: None for k in ("C", "con_up", "con_down", "cluster", "layer")}
    assert first.meta["key_object_infos"] == frame["key_object_infos"]
    assert first.meta["scene_description"] == frames["scene_description"] and first.meta["task"] == "perception"
    by_task = {r.meta["task"]: r.capability for r in recs}
    assert by_task == {"perception": "perception", "prediction": "reasoning", "planning": "planning",
                       "behavior": "planning"}
    manifest = json.loads((tmp_path / "out" / "import.json").read_text())
    assert manifest["format"] == "drivelm" and manifest["records"] == 20 and manifest["cameras"] == list(CAMERAS)


def test_drivelm_capability_map_cameras_and_images_root(tmp_path):
    src = _drivelm(tmp_path)
    res = import_dataset("drivelm", src, tmp_path / "a", capability_map="prediction=planning,behavior=behavior",
                         cameras=("CAM_BACK", "CAM_FRONT"))
    recs = load_records(res.data)
    assert {r.meta["task"]: r.capability for r in recs}["prediction"] == "planning"
    assert {r.meta["task"]: r.capability for r in recs}["behavior"] == "behavior"
    assert [p.parent.name for p in recs[0].images] == ["CAM_BACK", "CAM_FRONT"]
    (tmp_path / "map.json").write_text(json.dumps({"perception": "seeing"}))
    assert parse_capability_map(tmp_path / "map.json")["perception"] == "seeing"
    assert parse_capability_map(str(tmp_path / "map.json"))["prediction"] == "reasoning"  # defaults stay
    with pytest.raises(ValueError, match="not task=capability"):
        parse_capability_map("prediction:reasoning")
    # The JSON moved elsewhere: its ../nuscenes paths resolve against --images-root instead.
    moved = tmp_path / "elsewhere" / "q.json"
    moved.parent.mkdir()
    moved.write_text(src.read_text())
    with pytest.raises(ImportFailed, match="image file not found"):
        import_dataset("drivelm", moved, tmp_path / "b")
    res = import_dataset("drivelm", moved, tmp_path / "b", images_root=src.parent)
    default = load_records(import_dataset("drivelm", src, tmp_path / "c").data)
    assert load_records(res.data)[0].images == default[0].images


def test_llava_a_conversation_is_one_multi_turn_record_unless_an_image_comes_late(tmp_path):
    res = import_dataset("llava", _llava(tmp_path), tmp_path / "out")
    recs = {r.id: r for r in load_records(res.data)}
    # c1 shows b.png only after its first gpt turn: one record per turn; 7 is one multi-turn record
    assert set(recs) == {"c1#0", "c1#1", "7"}
    seven = recs["7"]
    assert seven.is_multi_turn and seven.answer is None and seven.messages[-1][0] == "assistant"
    assert seven.images == () and seven.capability == "general"
    split = {r.id for r in load_records(import_dataset("llava", _llava(tmp_path), tmp_path / "o2", split_turns=True).data)}
    assert split == {"c1#0", "c1#1", "7#0"}


def test_llava_one_record_per_gpt_turn_with_images_shown_so_far(tmp_path):
    res = import_dataset("llava", _llava(tmp_path), tmp_path / "out", split_turns=True)
    recs = {r.id: r for r in load_records(res.data)}
    assert set(recs) == {"c1#0", "c1#1", "7#0"}
    a, b = recs["c1#0"], recs["c1#1"]
    assert a.messages == (("system", "You drive carefully."), ("user", "<image>\nWhat colour is the light?"))
    assert a.answer == "red" and [p.name for p in a.images] == ["a.png"]  # b.png is shown only later
    assert [m[0] for m in b.messages] == ["system", "user", "assistant", "user"]
    assert b.messages[2] == ("assistant", "red") and b.answer == "blue"
    assert [p.name for p in b.images] == ["a.png", "b.png"]
    assert b.meta == {"source_id": "c1", "turn": 1, "source": "unit"}
    assert recs["7#0"].images == () and recs["7#0"].capability == "general"


def test_llava_jsonl_without_placeholders_gives_every_turn_the_images(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"id": "x", "image": "a.png", "capability": "planning",
             "conversations": [{"role": "user", "content": "Stop?"}, {"role": "assistant", "content": "yes"},
                               {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_records(import_dataset("llava", src, tmp_path / "out", split_turns=True).data)
    assert [len(r.images) for r in recs] == [1, 1] and {r.capability for r in recs} == {"planning"}
    whole = load_records(import_dataset("llava", src, tmp_path / "one").data)
    assert [(r.id, len(r.images), r.is_multi_turn) for r in whole] == [("x", 1, True)]
    assert [m[0] for m in whole[0].messages] == ["user", "assistant", "user", "assistant"]


def test_parquet_embedded_bytes_structs_paths_and_metadata(tmp_path):
    _, options = SOURCES["parquet"]
    res = import_dataset("parquet", _parquet(tmp_path / "src"), tmp_path / "out", **options)
    recs = {r.id: r for r in load_records(res.data)}
    assert res.images_written == 1  # p0 and p1 hold the same bytes: one content-hashed file
    p0, p1, p2, p3 = (recs[f"p{i}"] for i in range(4))
    assert p0.images == p1.images and p0.images[0].parent == tmp_path / "out" / "images"
    assert len(p0.images[0].stem) == 32 and p0.images[0].suffix == ".png"
    assert p2.images == ((tmp_path / "src" / "cam.png").resolve(),) and p3.images == ()
    assert p0.meta == {"speed": 1.5} and p2.meta == {"speed": None}  # NaN -> null, binary column dropped
    assert (p0.capability, p1.capability, p3.capability) == ("perception", "reasoning", "planning")
    assert json.loads((tmp_path / "out" / "data.jsonl").read_text().splitlines()[0])["images"][0].startswith("images/")


def test_parquet_folder_messages_column_and_row_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "src" / "part").mkdir(parents=True)
    turns = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Light?"}],
             json.dumps([{"role": "user", "content": "Car?"}])]
    for name, rows in (("a", turns[:1]), ("part/b", turns[1:])):
        pq.write_table(pa.table({"chat": [json.dumps(r) if not isinstance(r, str) else r for r in rows],
                                 "answer": ["red"]}), tmp_path / "src" / f"{name}.parquet")
    res = import_dataset("parquet", tmp_path / "src", tmp_path / "out",
                         columns=Columns(messages="chat", capability="perception"))
    recs = load_records(res.data)
    assert [r.id for r in recs] == ["a-0", "part/b-0"]
    assert recs[0].messages == (("system", "Be brief."), ("user", "Light?")) and recs[1].prompt is None


def test_parquet_conversations_without_an_answer_column_supervise_every_turn(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [[{"role": "user", "content": "Light?"}, {"role": "assistant", "content": "red"},
              {"role": "user", "content": "Go?"}, {"role": "assistant", "content": "no"}],
             json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lane?"},
                         {"role": "assistant", "content": "left"}])]
    pq.write_table(pa.table({"id": ["c0", "c1"], "messages": [json.dumps(c) if not isinstance(c, str) else c
                                                               for c in chats]}), tmp_path / "chat.parquet")
    recs = load_records(import_dataset("parquet", tmp_path / "chat.parquet", tmp_path / "out").data)
    assert [(r.id, r.is_multi_turn, len(r.messages)) for r in recs] == [("c0", True, 4), ("c1", True, 3)]
    pq.write_table(pa.table({"id": ["open"], "messages": [json.dumps(chats[0][:3])]}), tmp_path / "bad.parquet")
    with pytest.raises(ImportFailed, match=r"messages\[2\]\.role: last turn must be 'assistant'"):
        import_dataset("parquet", tmp_path / "bad.parquet", tmp_path / "out2")
    with pytest.raises(ImportFailed, match="no column 'response'"):  # a named answer column must exist
        import_dataset("parquet", tmp_path / "chat.parquet", tmp_path / "out3", columns=Columns(answer="response"))


def test_hf_dataset_dict_needs_a_split_when_it_has_several(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["a?"], "answer": ["b"], "capability": ["planning"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: choose one with --split"):
        import_dataset("hf", tmp_path / "dd", tmp_path / "out")
    res = import_dataset("hf", tmp_path / "dd", tmp_path / "out", split="test")
    rec = load_records(res.data)[0]
    assert (rec.id, rec.capability, rec.images) == ("test-0", "planning", ())
    with pytest.raises(ValueError, match="not a datasets.load_from_disk folder"):
        import_dataset("hf", tmp_path, tmp_path / "out2")


# --- bad entries: each named, all collected, nothing written ---------------------------------------

def _fails(fmt: str, src: Path, out: Path, **options) -> ImportFailed:
    with pytest.raises(ImportFailed) as info:
        import_dataset(fmt, src, out, **options)
    assert not out.exists(), "nothing may be written on error"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "staging folder left"
    return info.value


def test_drivelm_bad_entries_are_all_reported(tmp_path):
    src = _drivelm(tmp_path, scenes=1, frames=2)
    data = json.loads(src.read_text())
    scene = next(iter(data))
    (f1, fr1), (f2, fr2) = data[scene]["key_frames"].items()
    del fr1["QA"]["perception"][0]["Q"]
    fr1["QA"]["perception"][1]["A"] = ""
    fr1["QA"]["weather"] = [{"Q": "Rain?", "A": "no"}]
    del fr2["image_paths"]["CAM_BACK_LEFT"]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    fr2["image_paths"]["CAM_FRONT"] = str(bad)
    src.write_text(json.dumps(data))
    err = _fails("drivelm", src, tmp_path / "out")
    got = {(p.where, p.field) for p in err.problems}
    base = f"scene {scene} / frame {f1} / QA."
    assert (base + "perception[0]", "Q") in got and (base + "perception[1]", "A") in got
    assert (base + "weather", "task") in got
    assert (f"scene {scene} / frame {f2}", "image_paths.CAM_BACK_LEFT") in got
    assert (f"scene {scene} / frame {f2}", "image_paths.CAM_FRONT") in got
    assert err.total == 5 and all(p.source == str(src) for p in err.problems)
    text = str(err)
    assert "unknown task 'weather'" in text and "--capability-map" in text and "missing camera" in text
    assert "unreadable image" in text and f"{src}: {base}perception[0]: Q: missing" in text


def test_drivelm_bad_structure(tmp_path):
    src = tmp_path / "d.json"
    src.write_text(json.dumps({"s1": {"key_frames": {"f1": {"image_paths": {}}}}, "s2": [], "s3": {}}))
    text = str(_fails("drivelm", src, tmp_path / "out"))
    assert "scene s1 / frame f1: QA: missing" in text and "scene s2: a scene must be an object" in text
    assert "scene s3: key_frames: missing" in text and "image_paths.CAM_FRONT: missing camera" in text
    src.write_text("[1, 2")
    assert "invalid JSON" in str(_fails("drivelm", src, tmp_path / "out"))
    assert "not found" in str(_fails("drivelm", tmp_path / "nope.json", tmp_path / "out"))


def _conv(*turns: tuple[str, str], **entry) -> dict:
    return {"id": "e", **entry, "conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.mark.parametrize("entry, field, message", [
    (_conv(("human", "Light?")), "conversations[0].from", "ends with a human turn"),
    (_conv(("gpt", "red"), ("human", "ok")), "conversations[0].from", "starts with a gpt turn"),
    (_conv(("system", "x"), ("gpt", "red")), "conversations[1].from", "starts with a gpt turn"),
    (_conv(("human", "a"), ("human", "b"), ("gpt", "c")), "conversations[1].from", "two human turns in a row"),
    (_conv(("human", "a"), ("gpt", "b"), ("system", "c"), ("human", "d"), ("gpt", "e")),
     "conversations[2].from", "system turn may only come first"),
    (_conv(("human", "a"), ("bot", "b")), "conversations[1].from", "must be one of system, human, gpt"),
    (_conv(("human", "a"), ("gpt", " ")), "conversations[1].value", "empty gpt turn"),
    (_conv(("human", "<image> <image> a"), ("gpt", "b"), image="a.png"), "conversations",
     "2 <image> placeholder(s) but 1 image(s)"),
    (_conv(("human", "a"), ("gpt", "b"), image="missing.png"), "image", "image file not found"),
    (_conv(("human", "a"), ("gpt", "b"), image=["a.png", "broken.png"]), "image[1]", "unreadable image"),
    (_conv(("human", "a"), ("gpt", "b"), image=3), "image", "must be a path or a list of paths"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "id", "missing"),
    ({"id": "e"}, "conversations", "missing"),
])
def test_llava_bad_entries(tmp_path, entry, field, message):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(_png()[:40])
    src = tmp_path / "in.json"
    src.write_text(json.dumps([_conv(("human", "fine"), ("gpt", "ok"), id="good"), entry]))
    err = _fails("llava", src, tmp_path / "out")
    assert [(p.field, p.source) for p in err.problems] == [(field, str(src))], err
    assert message in err.problems[0].message and err.problems[0].where.startswith("[1]")


def test_llava_duplicate_ids_and_jsonl_lines_are_named(tmp_path):
    src = tmp_path / "in.jsonl"
    good = json.dumps(_conv(("human", "a"), ("gpt", "b"), id="same"))
    src.write_text(f"{good}\n{{not json\n{good}\n[1]\n")
    err = _fails("llava", src, tmp_path / "out")
    assert [(p.where, p.field) for p in err.problems] == [("line 2", "line"), ("line 3 (id same)", "id"),
                                                          ("line 4", "")]
    assert "first at line 1 (id same)" in err.problems[1].message


def test_parquet_bad_rows_and_missing_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    pq.write_table(pa.table({
        "id": ["r0", "r1", "r2", "r3", "r0"],
        "prompt": ["ok?", None, "ok?", "ok?", "again?"],
        "answer": ["yes", "yes", "", "yes", "yes"],
        "image": [{"bytes": b"\x00\x01not an image", "path": None}, None, None, {"bytes": None, "path": "bad.png"},
                  None],
        "capability": ["planning"] * 5,
    }), tmp_path / "t.parquet")
    err = _fails("parquet", tmp_path / "t.parquet", tmp_path / "out")
    got = [(p.where, p.field) for p in err.problems]
    assert got == [("row 0 (id r0)", "image"), ("row 1 (id r1)", "prompt"), ("row 2 (id r2)", "answer"),
                   ("row 3 (id r3)", "image"), ("row 4 (id r0)", "id")], err
    assert "image bytes are not a readable image (14 bytes starting b'\\x00\\x01not an'): no known image format" \
        == err.problems[0].message
    assert "unreadable image" in err.problems[3].message and "duplicate id 'r0'" in err.problems[4].message
    err = _fails("parquet", tmp_path / "t.parquet", tmp_path / "out",
                 columns=Columns(id="qid", answer="response", image="pic"))
    assert [p.field for p in err.problems] == ["--id-column", "--answer-column", "--image-column"]
    assert "no column 'qid' (columns: ['id', 'prompt', 'answer', 'image', 'capability'])" in str(err)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 nope")
    assert "not a readable Parquet file" in str(_fails("parquet", tmp_path / "junk.parquet", tmp_path / "out"))


def test_hf_missing_columns_and_bad_image_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"q": ["a?", "b?"], "answer": ["x", "y"],
                                     "image": [{"bytes": b"nope", "path": None}, {"bytes": None, "path": None}]})
    ds.save_to_disk(str(tmp_path / "ds"))
    err = _fails("hf", tmp_path / "ds", tmp_path / "out")
    assert [p.field for p in err.problems] == ["--prompt-column or --messages-column"]
    err = _fails("hf", tmp_path / "ds", tmp_path / "out", columns=Columns(prompt="q"))
    assert [(p.where, p.field) for p in err.problems] == [("row 0 (id row-0)", "image"), ("row 1 (id row-1)", "image")]
    assert "not a readable image" in err.problems[0].message and "neither bytes nor path" in err.problems[1].message


def test_many_problems_are_listed_up_to_a_cap(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([_conv(("human", f"q{i}"), id=f"e{i}") for i in range(30)]))
    err = _fails("llava", src, tmp_path / "out")
    assert err.total == 30 and len(err.problems) == 30
    assert "30 problem(s) importing llava data (nothing written)" in str(err) and "... and 10 more" in str(err)


def test_output_is_replaced_only_with_force_and_only_when_complete(tmp_path):
    src = _llava(tmp_path)
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--force"):
        import_dataset("llava", src, out)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([_conv(("human", "a"))]))
    with pytest.raises(ImportFailed):
        import_dataset("llava", bad, out, force=True)
    assert (out / "old").is_dir()  # a failed import leaves the old output alone
    import_dataset("llava", src, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "import.json"]


def test_cli_import_and_example(tmp_path):
    res = runner.invoke(app, ["data", "example", "drivelm", "--out", str(tmp_path / "ex"), "--scenes", "1",
                              "--frames", "1"])
    assert res.exit_code == 0, res.output
    src = Path(res.stdout.strip())
    assert src.name == "drivelm_example.json" and len(list((tmp_path / "ex" / "nuscenes" / "samples").iterdir())) == 6
    res = runner.invoke(app, ["data", "import", "drivelm", str(src), "--out", str(tmp_path / "out"),
                              "--capability-map", "behavior=reasoning"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("data.jsonl") and "5 records" in res.stderr
    res = runner.invoke(app, ["data", "import", "drivelm", str(src), "--out", str(tmp_path / "o2"), "--split", "x"])
    assert res.exit_code == 2 and "--split: not an option of format drivelm" in res.stderr
    res = runner.invoke(app, ["data", "import", "csv", str(src), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "unknown format 'csv'" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([_conv(("gpt", "x"), ("human", "y"))]))
    res = runner.invoke(app, ["data", "import", "llava", str(bad), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 1 and "starts with a gpt turn" in res.stderr and not (tmp_path / "o3").exists()
