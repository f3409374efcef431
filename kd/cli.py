"""The `kd` command line: a thin typer layer that parses, calls one function, and prints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kd.cli_data import register as register_data_commands

app = typer.Typer(help="kd: cache teacher outputs once, distil many students from the caches.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
cache_app = typer.Typer(help="Build, inspect, verify and list teacher-output caches.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets in the stage-one JSONL format: synthetic driving scenes, imports of DriveLM, "
                       "LLaVA, Parquet and HF datasets.", no_args_is_help=True)
models_app = typer.Typer(help="Tiny local models for tests, demos and smoke runs.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
register_data_commands(data_app)  # kd data import / example (kd/cli_data.py)

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    # One line whatever the terminal width (soft_wrap), and brackets in the message are text, not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _layers(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        _fail(f"layers must be comma-separated integers, got {text!r}")
        raise


@cache_app.command("build")
def cache_build(
    teacher: Optional[Path] = typer.Option(None, help="Teacher model directory (transformers layout)."),
    data: Optional[Path] = typer.Option(None, help="Dataset JSONL (id, images, prompt|messages, answer, capability)."),
    out_root: Optional[str] = typer.Option(None, "--out", help="Cache root: a local path or fsspec URL."),
    engine: str = typer.Option("auto", help="vllm | hf | auto (vLLM where installed, hf when attention maps are asked)."),
    logits: str = typer.Option("topk", help="topk: exact top-k log-probs; sampled: importance-sampled ids with counts."),
    top_k: int = typer.Option(64, help="k for --logits topk."),
    draws: int = typer.Option(12, help="Draws per position for --logits sampled."),
    value_coding: str = typer.Option("fp16", help="Log-prob coding: fp32 | fp16 | bf16 (lossless for that dtype) | u8 (lossy, bounded KL)."),
    hidden_layers: Optional[str] = typer.Option(None, help="Hidden-state layers to keep, e.g. '2,4' (0 = embeddings)."),
    hidden_coding: str = typer.Option("fp16", help="fp32 | fp16 | bf16."),
    attention_layers: Optional[str] = typer.Option(None, help="Decoder layers (0-based) whose head-averaged attention maps to keep (hf engine)."),
    attention_kind: str = typer.Option("t2v", help="t2v (keys = image tokens) | full (all keys) | both."),
    shard_size: int = typer.Option(256, help="Samples per shard (unit of work, commit and resume)."),
    batch_size: int = typer.Option(8, help="Samples per teacher forward."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N (hf engine)."),
    dtype: str = typer.Option("float32", help="Teacher compute dtype."),
    teacher_name: Optional[str] = typer.Option(None, help="Name recorded in the cache (default: directory name)."),
    revision: Optional[str] = typer.Option(None, help="Identify weights by name + revision instead of hashing them."),
    role: Optional[str] = typer.Option(None, help="Capability this teacher serves (perception | reasoning | planning | any)."),
    workers: int = typer.Option(0, help="Dask LocalCluster worker processes (0 = in-process)."),
    scheduler: Optional[str] = typer.Option(None, help="Address of an existing dask scheduler, e.g. tcp://host:8786."),
    config: Optional[Path] = typer.Option(None, help="Build config (YAML/TOML) listing several teachers with roles and signals."),
    force: bool = typer.Option(False, help="Rebuild even if a sealed cache with this key exists (a full cache, no parent)."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="Grow a sealed cache of the same teacher and signals under --out: capture only the samples it lacks (new or changed) into a child cache naming it as parent. --no-reuse: a full cache (also in place of a sealed child)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the teacher directory (off by default)."),
    self_check: bool = typer.Option(True, "--self-check/--no-self-check", help="Before the first shard, recompute a few samples one at a time, unpadded, through a plain transformers forward and stop if the batched capture differs (catches an architecture kd batches wrongly; costs a few forwards)."),
    lease_timeout: Optional[float] = typer.Option(None, help="Seconds to wait while another builder holds this cache's lease (default: until it finishes or its lease goes stale)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of text."),
) -> None:
    """Run teacher(s) teacher-forced over a dataset and write sealed cache(s); print their paths."""
    from kd.cache_schema import CacheError
    from kd.config_files import build_requests_from_config, load_config
    from kd.pipeline.build import BuildProgress, BuildRequest, build_cache
    from kd.pipeline.common.dataset import DatasetError

    cli = dict(
        teacher=str(teacher) if teacher else None, data=str(data) if data else None, out=out_root, engine=engine,
        logits=logits, top_k=top_k, sampled_draws=draws, value_coding=value_coding,
        hidden_layers=_layers(hidden_layers), hidden_coding=hidden_coding, attention_layers=_layers(attention_layers),
        attention_kind=attention_kind, shard_size=shard_size, batch_size=batch_size, device=device, dtype=dtype,
        teacher_name=teacher_name, teacher_revision=revision, role=role, workers=workers, scheduler=scheduler,
        force=force, trust_remote_code=trust_remote_code, self_check=self_check, reuse=reuse,
    )
    try:
        if config:
            explicit = {k: cli[k] for k in ("data", "out", "workers", "scheduler", "force") if cli[k]}
            if not self_check:
                explicit["self_check"] = False
            if not reuse:
                explicit["reuse"] = False
            raw = build_requests_from_config(load_config(config), config.parent, explicit)
            known = {f.name for f in dataclasses.fields(BuildRequest)}
            requests = []
            for r in raw:
                unknown = set(r) - known
                if unknown:
                    _fail(f"{config}: unknown keys {sorted(unknown)}")
                for key in ("hidden_layers", "attention_layers"):
                    r[key] = tuple(r.get(key) or ())
                requests.append(BuildRequest(**r))
        else:
            missing = [name for name in ("teacher", "data", "out") if not cli[name]]
            if missing:
                _fail(f"missing --{' --'.join(missing)} (or give --config)")
            requests = [BuildRequest(**cli)]
        results = []
        for req in requests:
            progress = BuildProgress(f"capture {Path(req.teacher).name}", enabled=sys.stderr.isatty() and not as_json)
            res = build_cache(req, progress, lease_timeout=lease_timeout)
            results.append(res)
            if not as_json:
                state = "reused sealed cache" if res.reused else f"built {res.shards_built}/{res.shards_total} shards"
                checked = (f" (self-check {res.self_check_s:.1f}s, max diff {max(res.self_check_diff.values()):.1e})"
                           if res.self_check_s is not None and res.self_check_diff else "")
                grown = f" ({res.reused_samples} of them from parent {res.parent})" if res.parent else ""
                err.print(f"{res.teacher}: {state}, {res.samples} samples{grown}, {res.tokens} tokens, {res.seconds:.1f}s"
                          f"{checked}", highlight=False)
                print(res.path)
    except DatasetError as e:
        _fail(str(e))
    except (ValueError, FileNotFoundError, OSError, CacheError) as e:
        _fail(str(e))
    except Exception as e:  # storage that cannot be reached, or a shard dask gave up on: one line
        from kd.cache_schema.storage import is_storage_error

        if is_storage_error(e):
            _fail(f"cannot reach the cache storage ({type(e).__name__}: {e})")
        if type(e).__name__ == "KilledWorker":
            _fail(f"dask gave up on a shard after its workers died repeatedly ({e}); committed shards are kept: "
                  "rerun to resume")
        raise
    if as_json:
        payload = [r.to_dict() for r in results]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=1))


@contextlib.contextmanager
def _storage_errors(where: str):
    """A cache's storage that cannot be reached (endpoint, credentials, permissions): one clean line."""
    from kd.cache_schema.storage import is_storage_error

    try:
        yield
    except Exception as e:  # narrowed just below: anything else propagates unchanged
        if not is_storage_error(e):
            raise
        _fail(f"{where}: cannot read storage ({type(e).__name__}: {e})")


@cache_app.command("inspect")
def cache_inspect(path: list[str] = typer.Argument(..., help="Cache directory or URL; several to compare them."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON (hashes in full).")) -> None:
    """Show a cache's identity, signals and size; hashes cut to 16 characters (--json: in full).

    Given several caches, also lists which identity fields (teacher, tokenizer, dataset, signals, ...) differ, with each cache's path.
    """
    from kd.cache_schema import CacheError, CacheReader
    from kd.cache_schema.inspection import inspect_summary
    from kd.cli_render import render_inspect

    summaries = []
    for p in path:
        try:
            with _storage_errors(p):
                summaries.append(inspect_summary(CacheReader(p)))
        except CacheError as e:
            _fail(str(e))
    if as_json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=1))
        return
    render_inspect(summaries, out)


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="Cache directory or URL.")) -> None:
    """Check every file's size and checksum and every count; exit 1 naming what fails."""
    from kd.cache_schema import verify_cache

    with _storage_errors(path):
        report = verify_cache(path)
    if report.ok:
        out.print(f"OK: {report.files_checked} files verified in {report.path}")
        return
    for problem in report.problems:
        err.print(f"[red]FAIL[/] {problem}", highlight=False)
    raise typer.Exit(1)


_LS_HELP = (  # paragraphs as single lines: typer keeps line breaks after the first paragraph
    "List the caches under ROOT, oldest first (newest last; unsealed ones after them).\n\n"
    "Columns: name (the handle for --teacher, never cut), role, signals, samples, tokens, size, sealed, "
    "created (UTC, to the minute). Key and dataset fingerprint: --long or --json.\n\n"
    "A terminal too narrow for every column first puts one space between columns and wraps signals, then "
    "drops columns in this order: sealed, tokens, size, samples, created, signals, role. An unsealed cache "
    "still reads 'unsealed' under created once sealed is gone; the name is never dropped or cut.\n\n"
    "A cache that grows another (a grown dataset's child, holding only its new or changed samples) gets a line "
    "under the table: '<child> grows <parent>: N new or changed samples here, M from the parent chain'; its "
    "samples column counts all it serves."
)


def _dataset_filter(value: Optional[str]) -> Optional[str]:
    """``--dataset`` as a fingerprint prefix: a JSONL file is fingerprinted as `kd cache build` does
    (images included; a ``DatasetError`` names a bad file), anything else is taken as hex."""
    if value is None or not Path(value).is_file():
        return value
    from kd.pipeline.common.dataset import dataset_fingerprint, load_records

    return dataset_fingerprint(load_records(value))


@cache_app.command("ls", help=_LS_HELP)
def cache_ls(root: str = typer.Argument(..., help="Cache root directory or URL."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON (every field, hashes in full)."),
             long: bool = typer.Option(False, "--long", "-l", help="One block per cache: every field, full key and dataset fingerprint."),
             teacher: Optional[str] = typer.Option(None, help="Only caches whose teacher or name contains this (any case)."),
             role: Optional[str] = typer.Option(None, help="Only caches built for this role (perception, ...)."),
             dataset: Optional[str] = typer.Option(None, help="Only caches of this dataset: a JSONL file, or a prefix of its fingerprint.")) -> None:
    """List caches (help: _LS_HELP; tests/test_cache_listing.py checks it against listing.DROP_ORDER)."""
    from kd.cache_schema.listing import Filters, by_created
    from kd.cache_schema.summary import scan
    from kd.cli_render import render_long, render_ls
    from kd.pipeline.common.dataset import DatasetError

    try:
        filters = Filters(teacher=teacher, role=role, dataset=_dataset_filter(dataset))
    except (ValueError, DatasetError) as e:
        _fail(str(e))
    with _storage_errors(root):
        found = scan(root)
    entries = by_created(e for e in found if filters.match(e))
    if as_json:
        print(json.dumps([e.to_json() for e in entries], indent=1))
        return
    console = out  # rich reads COLUMNS (or the terminal size) at each print
    if not entries:
        why = f" matches {filters.describe()} ({len(found)} there)" if found and filters.active() else ""
        console.print(Text(f"no cache under {root}{why}"), soft_wrap=True)
        return
    (render_long if long else render_ls)(entries, console)


@data_app.command("synth")
def data_synth(out_dir: Path = typer.Option(..., "--out", help="Output directory."),
               n: int = typer.Option(1000, help="Number of scenes (3 records each: one per capability)."),
               seed: int = typer.Option(0, help="Random seed (same seed, byte-identical files).")) -> None:
    """Generate synthetic driving scenes with perception / reasoning / planning questions."""
    from kd.pipeline.demo.synth import synthesize

    paths = synthesize(out_dir, n, seed)
    for split, path in paths.items():
        print(f"{split}\t{path}")


_TINY_HELP = (
    "Build a tiny random-weight model of a VLM / LLM family, in the standard transformers layout.\n\n"
    "The directory holds config, safetensors weights, a locally trained tokenizer with the family's special tokens, "
    "the family's real processor class and a chat template shaped like the real checkpoint's. It loads with "
    "AutoProcessor / AutoModelForImageTextToText (text families: AutoTokenizer / AutoModelForCausalLM) and in vLLM; "
    "no model hub is needed. Without --arch and --kind it builds idefics3. 'kd models tiny --arch list' prints "
    "the families."
)


@models_app.command("tiny", help=_TINY_HELP)
def models_tiny(out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to save the model."),
                arch: Optional[str] = typer.Option(
                    None, "--arch", help="Family to build (idefics3, smolvlm, qwen2_vl, qwen2_5_vl, qwen3_vl, internvl, "
                                         "llava, llava_onevision, gemma3, text llama / qwen2); 'list' prints them."),
                kind: Optional[str] = typer.Option(None, help="Older alias: vlm (= --arch idefics3) | llm (= --arch llama)."),
                preset: str = typer.Option("teacher", help="teacher (4 layers x 128) | student (2 layers x 64)."),
                seed: int = typer.Option(0, help="Weight-init seed (same arguments, same bytes)."),
                tokenizer_seed: int = typer.Option(0, help="Tokenizer seed; families of one base vocabulary share "
                                                         "token ids at equal tokenizer seeds.")) -> None:
    """Build a tiny model of one family (see ``_TINY_HELP``); ``--kind`` stays for older scripts."""
    from kd.pipeline.demo.tiny_families import ARCHS, KIND_ALIASES, build_tiny
    from kd.pipeline.demo.tiny_models import PRESETS

    if arch == "list":
        for name, family in ARCHS.items():
            print(f"{name}\t{family.summary}")
        return
    name = _tiny_arch(arch, kind, ARCHS, KIND_ALIASES)
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}", param_hint="--preset")
    if out_dir is None:
        raise typer.BadParameter("required (where to save the model)", param_hint="--out")
    print(build_tiny(name, out_dir, preset=PRESETS[preset], seed=seed, tokenizer_seed=tokenizer_seed))


def _tiny_arch(arch: Optional[str], kind: Optional[str], archs: dict, aliases: dict[str, str]) -> str:
    """The family ``--arch`` / ``--kind`` name; an unknown or contradictory one lists the choices."""
    choices = ", ".join(archs)
    if kind is not None and kind not in aliases:
        raise typer.BadParameter(f"unknown kind {kind!r}: expected vlm or llm (or use --arch: {choices})",
                                 param_hint="--kind")
    if arch is not None and arch not in archs:
        raise typer.BadParameter(f"unknown arch {arch!r}: expected one of {choices}, or 'list'", param_hint="--arch")
    from_kind = aliases[kind] if kind is not None else None
    if arch is not None and from_kind is not None and arch != from_kind:
        raise typer.BadParameter(f"--kind {kind} means --arch {from_kind}, which contradicts --arch {arch}",
                                 param_hint="--kind")
    return arch or from_kind or aliases["vlm"]


@app.command("distill")
def distill_cmd(
    student: Optional[Path] = typer.Option(None, help="Student model directory (transformers layout)."),
    data: Optional[Path] = typer.Option(None, help="Training JSONL (stage-one format; same ids as the caches)."),
    teacher: list[str] = typer.Option([], "--teacher", help="ROLE=CACHE (repeatable), e.g. perception=caches/t-1a2b..."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (config, checkpoints, metrics, final model)."),
    val_data: Optional[Path] = typer.Option(None, help="Validation JSONL for periodic evaluation."),
    config: Optional[Path] = typer.Option(None, help="Distill config (YAML/TOML/JSON); options given here override it."),
    override: list[str] = typer.Option([], "--set", help="section.field=value override, e.g. loss.temperature=2 (repeatable)."),
    resume: bool = typer.Option(False, help="Continue from the run directory's last checkpoint."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Train a student from one or more teacher caches (CE + top-k KD + hidden + attention losses)."""
    from kd.cache_schema import CacheError
    from kd.pipeline.distill import AlignmentError, distill, load_config
    from kd.pipeline.distill.launch import release_process_group

    fields: dict = {}
    for name, value in (("student", student), ("data", data), ("out", out_dir), ("val_data", val_data)):
        if value is not None:
            fields[name] = str(value)
    if teacher:
        roles = {}
        for item in teacher:
            role, sep, url = item.partition("=")
            if not sep or not role or not url:
                _fail(f"--teacher expects ROLE=CACHE, got {item!r}")
            roles[role] = url
        fields["teachers"] = roles
    if resume:
        fields["resume"] = True
    if quiet or as_json:
        fields["quiet"] = True
    try:
        cfg = load_config(config, override, **fields)
        result = distill(cfg)
    except (AlignmentError, CacheError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    finally:
        release_process_group()  # under accelerate launch / torchrun: each rank exits cleanly
    summary = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir), "steps": result.steps,
               "final_loss": result.final_loss, "resumed_from": result.resumed_from, "eval": result.eval}
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        err.print(f"trained {result.steps} steps, final loss {result.final_loss}")
        print(result.model_dir)


@app.command("eval")
def eval_cmd(model: Path = typer.Option(..., help="Model directory to evaluate."),
             data: Path = typer.Option(..., help="JSONL with gold answers (stage-one format)."),
             max_new_tokens: int = typer.Option(8, help="Greedy decoding length."),
             batch_size: int = typer.Option(8, help="Samples per generate call."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Greedy-decode answers and report exact-match accuracy per capability and on average."""
    from kd.pipeline.distill.evaluate import evaluate

    if not (model / "config.json").is_file():
        _fail(f"{model} is not a model directory (no config.json)")
    try:
        result = evaluate(model, data, max_new_tokens=max_new_tokens, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=1, default=str))
        return
    table = Table("capability", "accuracy", "n")
    for cap, acc in result["accuracy"].items():
        table.add_row(cap, f"{acc:.3f}", str(result["counts"][cap]))
    table.add_row("average", f"{result['average']:.3f}", str(result["n"]))
    out.print(table)


@app.command("demo")
def demo(workdir: Path = typer.Option(Path("kd-demo"), help="Working directory (data, models, caches, report)."),
         quick: bool = typer.Option(False, "--quick", help="A smaller run (the tests use it)."),
         as_json: bool = typer.Option(False, "--json", help="Print a JSON summary.")) -> None:
    """Run the pipeline end to end on a tiny built-in example (synthetic driving scenes, CPU)."""
    from kd.pipeline.demo import run_demo

    result = run_demo(workdir, quick=quick, log=(lambda m: None) if as_json else err.print)
    if as_json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        err.print(f"demo finished in {result.seconds:.1f}s; summary in {workdir / 'demo.json'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
