"""`kd data import` and `kd data example`: bring datasets of other formats into kd's stage-one JSONL.

Kept apart from ``kd.cli`` (which only registers them on its ``data`` group) so the CLI module
stays one screenful per job; the work itself is in ``kd.pipeline.importers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)

IMPORT_HELP = "\n\n".join([  # one string per paragraph: the help reflows them to the terminal
    "Convert a dataset in another format into OUT/data.jsonl (+ OUT/images/), kd's stage-one input.",
    'FORMAT is one of:',
    'drivelm: a DriveLM-nuScenes QA JSON ({scene: {key_frames: {frame: {QA: {task: [{Q, A, ...}]}, '
    'image_paths}}}}). One record per QA, id scene/frame/task/index; capability by task '
    '(perception=perception, prediction=reasoning, planning=planning, behavior=planning; --capability-map '
    'changes it); the six cameras in the order CAM_FRONT, CAM_FRONT_LEFT, CAM_FRONT_RIGHT, CAM_BACK, '
    'CAM_BACK_LEFT, CAM_BACK_RIGHT (--cameras picks others).',
    'llava: LLaVA / ShareGPT JSON list or JSONL ({id, image, conversations: [{from: human|gpt|system, '
    'value}]}). One record per conversation, id <id>, every gpt turn supervised in one sample (the '
    'teacher runs the conversation once). A conversation with an image shown after its first gpt turn, or '
    'every one with --split-turns, gives one record per gpt turn instead: id <id>#<k> for the k-th gpt '
    'turn (from 0), the turns before it as messages. <image> placeholders stay where they are.',
    'parquet: a Parquet file, or every *.parquet under a folder; hf: a datasets.save_to_disk folder '
    '(--split for a DatasetDict). One row per record; columns by --id-column, --prompt-column | '
    '--messages-column, --answer-column, --image-column (bytes, {bytes, path} structs as Hugging Face '
    'Image features store them, or paths) and --capability-column | --capability. Embedded image bytes '
    'become OUT/images/<sha256>.<ext>. A messages column without an answer column holds whole '
    'conversations: every assistant turn is supervised.',
    "Relative image paths resolve against --images-root (default: the source file's folder). Every bad "
    'entry is reported (file, entry, field) and then nothing is written: OUT appears only complete and '
    'valid.',
])


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def data_import(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="drivelm | llava | parquet | hf."),
    src: Path = typer.Argument(..., help="Source file or folder."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder (new or empty; --force replaces it)."),
    images_root: Optional[Path] = typer.Option(None, help="Folder relative image paths resolve against "
                                                          "(default: the source file's folder)."),
    capability_map: Optional[str] = typer.Option(None, help="drivelm: task=capability pairs, e.g. "
                                                            "'prediction=reasoning,behavior=planning', or a JSON file."),
    cameras: Optional[str] = typer.Option(None, help="drivelm: comma-separated cameras, in image order "
                                                     "(default: all six)."),
    capability: Optional[str] = typer.Option(None, help="llava/parquet/hf: capability tag of every record "
                                                        "(default: the entry's or column's own, else 'general')."),
    id_column: Optional[str] = typer.Option(None, help="parquet/hf: id column (default 'id'; without one, "
                                                       "<file>-<row>)."),
    prompt_column: Optional[str] = typer.Option(None, help="parquet/hf: prompt column (default 'prompt')."),
    messages_column: Optional[str] = typer.Option(None, help="parquet/hf: column of chat turns before the answer "
                                                             "([{role, content}] or its JSON), or of whole "
                                                             "conversations when there is no answer column."),
    answer_column: str = typer.Option("answer", help="parquet/hf: answer column."),
    image_column: Optional[str] = typer.Option(None, help="parquet/hf: image column (default 'images' or 'image' "
                                                          "if present)."),
    capability_column: Optional[str] = typer.Option(None, help="parquet/hf: capability column "
                                                               "(default 'capability' if present)."),
    split: Optional[str] = typer.Option(None, help="hf: the split of a DatasetDict."),
    split_turns: bool = typer.Option(False, "--split-turns", help="llava: one record per gpt turn (<id>#<k>, the "
                                                                   "turns before it as prompt) instead of one per "
                                                                   "conversation."),
    force: bool = typer.Option(False, help="Replace OUT if it exists (only once the new dataset is complete)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the data path."),
) -> None:
    """See ``IMPORT_HELP``."""
    from kd.pipeline.importers import FORMATS, Columns, ImportFailed, import_dataset

    if fmt not in FORMATS:
        _fail(f"unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    given = {"--capability-map": capability_map, "--cameras": cameras, "--capability": capability,
             "--id-column": id_column, "--prompt-column": prompt_column, "--messages-column": messages_column,
             "--answer-column": None if answer_column == "answer" else answer_column, "--image-column": image_column,
             "--capability-column": capability_column, "--split": split, "--split-turns": split_turns or None}
    allowed = {"drivelm": {"--capability-map", "--cameras"}, "llava": {"--capability", "--split-turns"},
               "parquet": {"--capability", "--id-column", "--prompt-column", "--messages-column", "--answer-column",
                           "--image-column", "--capability-column"}}
    allowed["hf"] = allowed["parquet"] | {"--split"}
    wrong = [name for name, value in given.items() if value is not None and name not in allowed[fmt]]
    if wrong:
        _fail(f"{', '.join(wrong)}: not an option of format {fmt} (its options: {', '.join(sorted(allowed[fmt]))})")
    options: dict = {"images_root": images_root, "force": force}
    if fmt == "drivelm":
        options["capability_map"] = capability_map
        if cameras:
            options["cameras"] = tuple(c.strip() for c in cameras.split(",") if c.strip())
    elif fmt == "llava":
        options["capability"] = capability or "general"
        options["split_turns"] = split_turns
    else:
        options["columns"] = Columns(id=id_column, prompt=prompt_column, messages=messages_column,
                                     answer=answer_column, image=image_column,
                                     capability_column=capability_column, capability=capability)
        if fmt == "hf":
            options["split"] = split
    try:
        result = import_dataset(fmt, src, out_dir, **options)
    except ImportFailed as e:
        _fail(str(e), 1)
    except (ValueError, OSError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
        return
    caps = ", ".join(f"{c} {n}" for c, n in result.capabilities.items())
    err.print(f"{result.records} records ({caps}), {result.images_written} embedded images written", highlight=False)
    print(result.data)


def data_example(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="drivelm (the only one so far)."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder."),
    scenes: int = typer.Option(2, help="Scenes."),
    frames: int = typer.Option(2, help="Key frames per scene (5 QAs and 6 camera images each)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same bytes)."),
) -> None:
    """Write a small synthetic dataset in another format, to try `kd data import` on; print the file to import.

    drivelm: a DriveLM-nuScenes QA JSON (4 tasks, 5 QAs per key frame) with six camera images per key frame.
    """
    from kd.pipeline.demo.drivelm_example import write_drivelm_example

    if fmt != "drivelm":
        _fail(f"unknown example format {fmt!r} (formats: drivelm)")
    try:
        path = write_drivelm_example(out_dir, scenes, frames, seed)
    except ValueError as e:
        _fail(str(e))
    print(path)


def register(data_app: typer.Typer) -> None:
    """Add ``import`` and ``example`` to the ``kd data`` group."""
    data_app.command("import", help=IMPORT_HELP)(data_import)
    data_app.command("example")(data_example)
