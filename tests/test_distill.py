"""Stage two on tiny models and real caches (written by the hf teacher engine): config, alignment,
loss wiring against a hand computation, mixing weights, projector gradients, resume, run directory,
a short training run, learnable weights + AGP."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distill_helpers import build_test_cache, kd_world  # noqa: F401

from kd.cache_schema import CachedSample, CacheReader
from kd.pipeline.common.dataset import RecordTable, load_records
from kd.pipeline.distill import AlignmentError, DistillConfig, VocabMap, distill, load_config, open_teachers
from kd.pipeline.distill.data import DistillDataset, collate, to_student_ids
from kd.pipeline.distill.objective import build_objective
from kd.pipeline.distill.student import load_student, student_forward
from kd.pipeline.distill.train import DistillModule
from kd.pipeline.common.encoding import encode_record
from kd.pipeline.build.engines import SignalSpec
from kd.pipeline.distill.losses import attention_map_loss, hidden_state_loss, sampled_kd_loss, student_log_probs, topk_kd_loss

ROLES = ("perception", "reasoning", "planning")
FAST = {"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 3}


def make_config(world, out, **fields) -> DistillConfig:
    train = {**FAST, **fields.pop("train", {})}
    fields.setdefault("teachers", world["caches"])
    return load_config(student=str(world["student"]), data=str(world["train"]), out=str(out), quiet=True,
                       train=train, **fields)


@pytest.fixture(scope="module")
def setup(kd_world):
    student, processor = load_student(kd_world["student"], attention=True)
    sources = open_teachers(kd_world["caches"], {}, processor)
    dataset = DistillDataset(load_records(kd_world["train"]), processor, sources)
    return student, processor, sources, dataset


def first_scene_batch(dataset):
    """Scene 0's three records: one perception, one reasoning, one planning sample."""
    items = [dataset[i] for i in range(3)]
    assert [s.capability for s in items] == list(ROLES)
    return collate(items)


# ----------------------------------------------------------------------------- config


def test_config_from_yaml_toml_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "student: s\ndata: d.jsonl\nout: o\nteachers: {perception: /c/p, planning: /c/q}\n"
        "loss: {kd_kind: jsd, hidden_layer_map: {perception: {'1': 2}}}\ntrain: {lr: 1.0e-4}\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.lr=3e-4", "loss.agp=true", "train.max_steps=7",
                                              "teachers.reasoning=/c/r"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float) and cfg.loss.agp is True
    assert cfg.train.max_steps == 7 and cfg.loss.kd_kind == "jsd" and cfg.roles == ["perception", "planning", "reasoning"]
    assert cfg.loss.hidden_layer_map == {"perception": {1: 2}}
    assert DistillConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON round trip
    (tmp_path / "run.toml").write_text('student = "s"\ndata = "d"\nout = "o"\n[teachers]\nplanning = "/c"\n'
                                       '[train]\ngrad_accum = 2\n')
    assert load_config(tmp_path / "run.toml").train.grad_accum == 2
    with pytest.raises(ValueError, match=r"train\.lrr"):
        load_config(tmp_path / "run.toml", ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"loss\.kd_kind must be one of"):
        load_config(tmp_path / "run.toml", ["loss.kd_kind=kl"])
    with pytest.raises(ValueError, match="mixing_matrix"):
        load_config(tmp_path / "run.toml", ["loss.mixing_matrix=[[0.5, 0.5]]"])
    assert load_config(tmp_path / "run.toml", ["train.cache_mib=64"]).train.cache_mib == 64
    with pytest.raises(ValueError, match=r"train\.cache_mib must be >= 0"):
        load_config(tmp_path / "run.toml", ["train.cache_mib=-1"])


# ----------------------------------------------------------------------------- alignment


def test_teacher_chunk_caches_share_one_budget(kd_world):
    sources = open_teachers(kd_world["caches"], {}, None, cache_bytes=3 << 20)
    assert len(sources) == 3 and all(s.reader._lru.budget == 1 << 20 for s in sources.values())


def test_alignment_error_names_sample_and_cache_for_another_tokenizer(kd_world):
    _, processor = load_student(kd_world["student_tok1"])
    sources = open_teachers(kd_world["caches"], {}, processor)
    with pytest.raises(AlignmentError) as err:
        DistillDataset(load_records(kd_world["train"]), processor, sources)
    named = re.match(r"sample '([^']+)'", str(err.value))
    assert named and named.group(1) in {r.id for r in load_records(kd_world["train"])}
    assert f"cache {kd_world['caches']['perception']}" in str(err.value)


def test_alignment_error_names_a_corrupted_answer(kd_world, setup):
    _, processor, sources, _ = setup
    lines = Path(kd_world["train"]).read_text().splitlines()
    rec = json.loads(lines[4])
    rec["answer"] = "no" if rec["answer"] == "yes" else "yes"
    lines[4] = json.dumps(rec)
    bad = Path(kd_world["train"]).with_name("train-corrupt.jsonl")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(AlignmentError, match=rf"sample '{rec['id']}'.*cache {kd_world['caches']['perception']}"):
        DistillDataset(load_records(bad), processor, sources)


def test_vocab_map_lets_a_teacher_with_another_tokenizer_serve(kd_world):
    _, processor = load_student(kd_world["student_tok1"])
    # "auto" reads the teacher dir from the manifest; a dir that does not exist here is refused by name
    moved = CacheReader(kd_world["caches"]["planning"]).manifest.teacher["model_dir"]
    assert Path(moved) == Path(kd_world["teacher"]).resolve()
    maps = {"perception": "auto", "reasoning": str(kd_world["teacher"]), "planning": "auto"}
    sources = open_teachers(kd_world["caches"], maps, processor)
    assert sources["perception"].vocab_map.source == moved
    dataset = DistillDataset(load_records(kd_world["train"]), processor, sources)
    sample = dataset[0]
    teacher_tok = load_student(kd_world["teacher"])[1].tokenizer
    cached = sources["perception"].reader.get(sample.sample_id)
    mapped = sample.teachers["perception"].ids
    keep = mapped >= 0
    assert 0.5 < keep.mean() < 1.0  # BPEs of two corpora over the same words share most token strings
    assert (processor.tokenizer.convert_ids_to_tokens(mapped[keep].tolist())
            == teacher_tok.convert_ids_to_tokens(cached.ids[keep].tolist()))
    assert np.array_equal(sources["perception"].vocab_map.map_ids(cached.target_ids), sample.answer_ids)
    lost = np.where(~keep & (cached.ids >= 0), np.exp(cached.logprobs), 0.0).sum(1)
    assert np.allclose(np.exp(sample.teachers["perception"].tail), np.exp(cached.tail_logmass) + lost, atol=1e-6)


def test_unmapped_topk_entries_fold_into_the_tail():
    cached = CachedSample(sample_id="s", capability="perception", target_ids=np.array([5], np.int32),
                          ids=np.array([[5, 7, -1]], np.int32),
                          logprobs=np.array([[np.log(0.5), np.log(0.3), -np.inf]], np.float32),
                          tail_logmass=np.log(np.array([0.2], np.float32)), answer_start=3, seq_len=4,
                          input_ids_hash="", answer_ids_hash="")
    out = to_student_ids(cached, VocabMap.from_pairs({5: 1}, "test"))
    assert out.ids.tolist() == [[1, -1, -1]]
    assert np.allclose(np.exp(out.logprobs), [[0.5, 0.0, 0.0]]) and np.allclose(np.exp(out.tail), [0.5])
    with pytest.raises(ValueError, match="same student id"):
        VocabMap.from_pairs({1: 3, 2: 3}, "dup")


def test_missing_samples_error_by_default_and_skip_on_request(kd_world, setup):
    _, processor, sources, _ = setup
    extra = Path(kd_world["train"]).with_name("train-plus-val.jsonl")
    extra.write_text(Path(kd_world["train"]).read_text() + Path(kd_world["val"]).read_text().splitlines()[0] + "\n")
    with pytest.raises(KeyError, match=r"1 sample\(s\) missing from cache"):
        DistillDataset(load_records(extra), processor, sources)
    assert len(DistillDataset(load_records(extra), processor, sources, missing="skip")) == 9


# ----------------------------------------------------------------------------- objective


def test_loss_wiring_equals_a_hand_computation(kd_world, setup):
    student, processor, sources, dataset = setup
    cfg = make_config(kd_world, "unused").loss
    objective = build_objective(cfg, sources, student)
    # The Drive-KD layer choices for a 2-layer student and 4-layer teacher.
    plans = objective.plans
    assert plans["perception"].hidden_map == {1: 2, 2: 4} and plans["perception"].t2v_map == {0: [0]}
    assert plans["reasoning"].full_map == {0: [0, 1, 2]} and plans["planning"].t2v_map == {0: [2]}
    assert plans["planning"].logits == "sampled"
    batch = first_scene_batch(dataset)
    with torch.no_grad():
        out = student_forward(student, batch, hidden_layers=objective.hidden_layers,
                              attention_layers=objective.attention_layers)
        bd = objective(out, batch)

        # By hand: one independent eager forward per sample, the cache read directly, library losses.
        w = {"perception": [0.8, 0.1, 0.1], "reasoning": [0.1, 0.8, 0.1], "planning": [0.1, 0.1, 0.8]}
        logits, targets, terms = [], [], {f"{t}/{r}": 0.0 for t in ("kd", "hidden", "attn") for r in ROLES}
        n = int(batch["num_tokens"].sum())
        for b, sid in enumerate(batch["sample_ids"]):
            rec = dataset.records[b]
            assert rec.id == sid
            enc = encode_record(processor, rec.as_dict())
            o = student(input_ids=torch.from_numpy(enc.input_ids.astype(np.int64))[None], output_hidden_states=True,
                        output_attentions=True, **{k: torch.from_numpy(v) for k, v in enc.model_inputs.items()})
            pos = torch.from_numpy(enc.target_positions)
            lg = o.logits[0, pos]
            logits.append(lg)
            targets.append(torch.from_numpy(enc.answer_ids.astype(np.int64)))
            t_b = len(pos)
            wb = {r: w[batch["capabilities"][b]][j] * t_b / n for j, r in enumerate(ROLES)}
            img = torch.from_numpy(enc.image_token_mask)
            c = {r: CacheReader(kd_world["caches"][r]).get(sid) for r in ROLES}
            p = c["perception"]
            terms["kd/perception"] += wb["perception"] * topk_kd_loss(
                lg, torch.from_numpy(p.ids), torch.from_numpy(p.logprobs), torch.from_numpy(p.tail_logmass))
            terms["hidden/perception"] += wb["perception"] * 0.5 * sum(
                hidden_state_loss(o.hidden_states[s][0, pos], torch.from_numpy(p.hidden[t]), objective.projectors["perception"][s])
                for s, t in ((1, 2), (2, 4)))
            terms["attn/perception"] += wb["perception"] * attention_map_loss(
                o.attentions[0][0].mean(0)[pos][:, img], torch.from_numpy(p.attention_t2v[0]))
            r = c["reasoning"]
            terms["kd/reasoning"] += wb["reasoning"] * topk_kd_loss(
                lg, torch.from_numpy(r.ids), torch.from_numpy(r.logprobs), torch.from_numpy(r.tail_logmass))
            full = torch.stack([torch.from_numpy(r.attention_full[layer]) for layer in (0, 1, 2)]).mean(0)
            terms["attn/reasoning"] += wb["reasoning"] * attention_map_loss(o.attentions[0][0].mean(0)[pos], full)
            q = c["planning"]
            terms["kd/planning"] += wb["planning"] * sampled_kd_loss(
                lg, torch.from_numpy(q.ids), torch.from_numpy(q.counts.astype(np.float32)), torch.from_numpy(q.logprobs))
            terms["attn/planning"] += wb["planning"] * attention_map_loss(
                o.attentions[0][0].mean(0)[pos][:, img], torch.from_numpy(q.attention_t2v[2]))
        ce = F.cross_entropy(torch.cat(logits), torch.cat(targets))
    assert bd.terms["ce"] == pytest.approx(float(ce), rel=1e-4)
    for key, value in terms.items():
        if key != "hidden/reasoning" and key != "hidden/planning":
            assert bd.terms[key] == pytest.approx(float(value), rel=1e-4, abs=1e-9), key
    assert "hidden/reasoning" not in bd.terms and "hidden/planning" not in bd.terms  # no hidden states cached
    expected = float(ce) + sum(float(v) for v in terms.values())
    assert float(bd.total(objective.fixed_weights())) == pytest.approx(expected, rel=1e-4)
    assert set(bd.losses) == {"ce", *ROLES}


def test_a_u8_cache_trains_like_the_fp32_cache_of_the_same_teacher(kd_world, setup, tmp_path):
    """u8 folds deep entries (id -1) and returns tie groups in canonical order; what the objective
    sees must still be the teacher's distribution, id for id, within the coding's error."""
    student, processor, _, _ = setup
    spec = SignalSpec(top_k=16)
    urls = {coding: build_test_cache(kd_world["teacher"], kd_world["train"], tmp_path / coding, spec, value_coding=coding)
            for coding in ("fp32", "u8")}
    exact, coded = CacheReader(urls["fp32"]), CacheReader(urls["u8"])
    for sid in exact.sample_ids:
        a, b = exact.get(sid), coded.get(sid)
        for row in range(a.num_tokens):
            want = dict(zip(a.ids[row].tolist(), a.logprobs[row].tolist()))
            got = {i: v for i, v in zip(b.ids[row].tolist(), b.logprobs[row].tolist()) if i >= 0}
            assert set(got) <= set(want)
            top = max(want.values())
            for i, v in want.items():
                if i in got:
                    assert abs(got[i] - v) <= 0.05 + 0.02 * (top - v), (sid, row, i)
                else:  # folded into the tail: 17 nats or more below the top-1
                    assert top - v >= 17.0 - 1e-4, (sid, row, i)
    losses = {}
    for coding, url in urls.items():
        sources = open_teachers({"perception": url}, {}, processor)
        dataset = DistillDataset(load_records(kd_world["train"]), processor, sources)
        objective = build_objective(make_config(kd_world, "unused").loss, sources, student)
        batch = collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            out = student_forward(student, batch, hidden_layers=objective.hidden_layers,
                                  attention_layers=objective.attention_layers)
            losses[coding] = objective(out, batch).terms["kd/perception"]
    assert losses["u8"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert losses["fp32"] > 0


def test_collate_flattens_maps_where_the_student_maps_put_them(setup):
    """The flat cached maps and their layout put every cached element at its place in the student's
    padded maps: scattering them back gives each sample's cached map; a map of another shape names
    its sample."""
    _, _, _, dataset = setup
    items = [dataset[i] for i in range(3)]
    batch = collate(items)
    b, t_max, width = 3, int(batch["num_tokens"].max()), batch["input_ids"].shape[1]
    for role, kind, layer in (("perception", "t2v", 0), ("reasoning", "full", 1), ("planning", "t2v", 2)):
        layout = batch["attention_layout"][kind]
        grid = torch.zeros(b * t_max * width)
        grid[layout["index"]] = batch["teachers"][role][f"attention_{kind}"][layer]
        grid = grid.view(b, t_max, width)
        for i, s in enumerate(items):
            cached = getattr(s.teachers[role], f"attention_{kind}")[layer]
            cols = np.flatnonzero(s.image_token_mask) if kind == "t2v" else np.arange(len(s.input_ids))
            assert torch.equal(grid[i, : len(s.answer_ids)][:, torch.from_numpy(cols)], torch.from_numpy(cached))
            assert torch.equal(layout["sample"][layout["index"] // (t_max * width) == i].unique(), torch.tensor([i]))
    items[1].teachers["reasoning"].attention_full[0] = items[1].teachers["reasoning"].attention_full[0][:, :-1]
    with pytest.raises(ValueError, match=re.escape(items[1].sample_id)):
        collate(items)


def _assert_same(a, b, where="batch"):
    """Two collated batches (nested dicts / lists of tensors) hold equal values of equal dtypes."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("student_key", ["student", "student_tok1"])
def test_a_batch_read_together_equals_its_samples_read_one_by_one(kd_world, student_key):
    """``__getitems__`` (the DataLoader's path: one cache read per teacher per batch) gives each
    sample the targets ``__getitem__`` gives it, and ``collate`` the same batch, for top-k, sampled
    and attention caches, with and without a vocabulary map."""
    _, processor = load_student(kd_world[student_key])
    maps = {} if student_key == "student" else {role: str(kd_world["teacher"]) for role in ROLES}
    dataset = DistillDataset(load_records(kd_world["train"]), processor, open_teachers(kd_world["caches"], maps, processor))
    order = [5, 0, 7, 3, 8]
    together = dataset.__getitems__(order)
    alone = [dataset[i] for i in order]
    for a, b in zip(together, alone):
        assert a.sample_id == b.sample_id and a.teachers.keys() == b.teachers.keys() == set(ROLES)
        for role in ROLES:
            for name in ("ids", "logprobs", "tail", "counts", "hidden", "attention_t2v", "attention_full"):
                x, y = getattr(a.teachers[role], name), getattr(b.teachers[role], name)
                if isinstance(x, dict):
                    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), (role, name)
                else:
                    assert (x is None and y is None) or np.array_equal(x, y), (role, name)
    _assert_same(collate(together), collate(alone))


def test_the_dataset_reaches_spawned_loader_workers(setup):
    """Under spawn / forkserver (Python 3.14's default start method) a worker gets the dataset
    pickled, readers included: its batches equal the main process's."""
    from functools import partial

    from torch.utils.data import DataLoader

    *_, dataset = setup
    make = partial(DataLoader, dataset, batch_size=4, collate_fn=partial(collate, pad_id=0))
    spawned = list(make(num_workers=1, multiprocessing_context="spawn"))
    here = list(make())
    assert len(spawned) == len(here) > 1
    for a, b in zip(spawned, here):
        _assert_same(a, b)


def test_training_with_loader_workers_equals_training_without(kd_world):
    losses = {}
    for workers in (0, 2):
        cfg = make_config(kd_world, kd_world["root"] / f"run-workers-{workers}",
                          train={"max_steps": 3, "batch_size": 3, "grad_accum": 1, "num_workers": workers})
        losses[workers] = _losses(distill(cfg).run_dir)
    assert sorted(losses[2]) == [1, 2, 3]
    assert losses[2] == pytest.approx(losses[0], abs=1e-6)


@pytest.mark.parametrize("tamper", ["answer", "image"])
def test_a_batch_read_names_the_sample_that_does_not_line_up(kd_world, setup, tamper):
    """Read-time alignment (past the index's hash check): a batch whose third sample's student
    tokens no longer match the caches names that sample, not the batch's first."""
    import dataclasses

    _, processor, sources, _ = setup
    dataset = DistillDataset(load_records(kd_world["train"]), processor, sources)
    records = list(dataset.records)
    rec = records[2]
    if tamper == "answer":  # past the start-up check: the answer changes after it
        records[2] = dataclasses.replace(rec, answer="no" if rec.answer == "yes" else "yes")
        expected = r"student answer ids \[[\d, ]+\] differ from the cached ones \[[\d, ]+\]"
    else:  # one image more: more image tokens than the perception cache's t2v maps have keys
        records[2] = dataclasses.replace(rec, images=rec.images + rec.images[:1])
        expected = r"cached t2v maps have \d+ image keys, the student input has \d+ image tokens"
    dataset.records = RecordTable(records)
    assert rec.images
    dataset.__getitems__([0, 1, 3])  # the untouched samples read fine
    with pytest.raises(AlignmentError, match=rf"sample '{rec.id}': {expected} \(teacher 'perception'"):
        dataset.__getitems__([0, 1, 2, 3])


def test_mixing_matrix_is_applied_per_capability(kd_world, setup):
    student, _, sources, dataset = setup
    batch = first_scene_batch(dataset)
    n_tok = batch["num_tokens"].double()
    for diag in (0.6, 1.0):
        cfg = make_config(kd_world, "unused", loss={"mixing_diag": diag}).loss
        objective = build_objective(cfg, sources, student)
        with torch.no_grad():
            bd = objective(student_forward(student, batch, hidden_layers=objective.hidden_layers,
                                           attention_layers=objective.attention_layers), batch)
        off = (1 - diag) / 2
        expected = torch.full((3, 3), off) + torch.eye(3) * (diag - off)  # samples are P, R, Pl = teacher order
        assert torch.allclose(bd.teacher_weights, expected)
        if diag == 1.0:  # a teacher sees only its own capability's sample
            with torch.no_grad():
                per_row = objective._kd_rows(student_log_probs(student_forward(student, batch).logits),
                                             batch["teachers"]["perception"], "topk")
            t0 = int(batch["num_tokens"][0])
            assert bd.terms["kd/perception"] == pytest.approx(float(per_row[:t0].sum() / n_tok.sum()), rel=1e-5)
    batch["capabilities"][0] = "Perception"
    with pytest.raises(ValueError, match="unknown capabilities"):
        objective(student_forward(student, batch, hidden_layers=objective.hidden_layers,
                                  attention_layers=objective.attention_layers), batch)


def test_gradients_reach_projectors_and_student(kd_world, setup):
    student, _, sources, dataset = setup
    objective = build_objective(make_config(kd_world, "unused").loss, sources, student)
    module = DistillModule(student, objective)
    module.zero_grad()
    bd = module(first_scene_batch(dataset))
    bd.total(objective.fixed_weights()).backward()
    for s in (1, 2):
        g = objective.projectors["perception"][s].weight.grad
        assert g is not None and float(g.abs().sum()) > 0
    assert float(student.get_decoder().layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0
    module.zero_grad()


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def run_a(kd_world):
    out = kd_world["root"] / "run-a"
    cfg = make_config(kd_world, out, val_data=str(kd_world["val"]),
                      train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 3, "eval_every": 2,
                             "eval_max_new_tokens": 3})
    return cfg, distill(cfg)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_run_dir_records_config_teachers_metrics_and_safetensors_checkpoints(kd_world, run_a):
    cfg, result = run_a
    run = result.run_dir
    assert result.steps == 4 and result.resumed_from is None and math.isfinite(result.final_loss)
    assert DistillConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg.resolved()
    teachers = json.loads((run / "teachers.json").read_text())
    for role, url in kd_world["caches"].items():
        assert teachers[role]["url"] == url and teachers[role]["key"] == CacheReader(url).key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and set(val[0]["accuracy"]) == set(ROLES)
    assert all(r["tokens_per_s"] > 0 and "kd/perception" in r["terms"] for r in rows if r["split"] == "train")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    ck = run / "checkpoints" / "step-00000004"
    assert (ck / "model" / "model.safetensors").exists() and not list(ck.rglob("*.bin"))
    assert (ck / "objective.safetensors").exists() and (ck / "rng.safetensors").exists()
    torch.load(ck / "optimizer.pt", weights_only=True)
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 4
    assert (run / "model" / "model.safetensors").exists() and json.loads((run / "eval.json").read_text())["step"] == 4
    with pytest.raises(FileExistsError, match="resume"):
        distill(cfg)


def test_resume_continues_with_identical_next_step_loss(kd_world, run_a):
    cfg, result = run_a
    out = kd_world["root"] / "run-b"
    shutil.copytree(result.run_dir, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    resumed = distill(DistillConfig.from_dict({**cfg.to_dict(), "out": str(out), "resume": True}))
    assert resumed.resumed_from == 2 and resumed.steps == 4
    a, b = _losses(result.run_dir), _losses(out)
    assert sorted(b) == [1, 2, 3, 4]
    assert b[3] == pytest.approx(a[3], abs=1e-6) and b[4] == pytest.approx(a[4], abs=1e-6)
    with pytest.raises(ValueError, match=r"train\.lr"):
        distill(DistillConfig.from_dict({**cfg.to_dict(), "out": str(out), "resume": True,
                                         "train": {**cfg.to_dict()["train"], "lr": 0.5}}))


def test_short_training_run_lowers_the_training_loss(kd_world):
    cfg = make_config(kd_world, kd_world["root"] / "run-short",
                      train={"max_steps": 12, "batch_size": 9, "lr": 3e-3, "max_grad_norm": 1.0})
    result = distill(cfg)
    losses = _losses(result.run_dir)
    assert losses[12] < 0.7 * losses[1], losses


def test_learnable_weights_with_agp_run(kd_world):
    cfg = make_config(kd_world, kd_world["root"] / "run-agp",
                      loss={"weighting": "learnable", "agp": True, "weights_lr": 0.1}, train={"max_steps": 3})
    result = distill(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = [r["weights"] for r in rows]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(w["ce"] >= 0.6 - 1e-6 and sum(w.values()) == pytest.approx(1.0, abs=1e-5) for w in weights)
    assert weights[-1] != weights[0]  # GradNorm moved them
    assert (result.last_checkpoint / "loss_weights.safetensors").exists()
