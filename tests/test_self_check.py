"""The build-time self-check: on by default, reports its cost, stops a wrong capture before any write."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kd.pipeline.build import self_check as sc
from kd.pipeline.build import BuildRequest, build_cache, close_warm_engines
from kd.pipeline.build.engines import hf_engine
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_families import build_tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("self_check")
    teacher = build_tiny("qwen2_5_vl", root / "teacher", seed=1)
    data = synthesize(root / "data", 2, seed=0, splits=(1.0, 0.0, 0.0))["train"]
    return root, teacher, data


def _request(root, teacher, data, out: str, **kw) -> BuildRequest:
    kw = {"shard_size": 4, **kw}
    return BuildRequest(teacher=str(teacher), data=str(data), out=str(root / out), engine="hf", top_k=8,
                        hidden_layers=(1,), attention_layers=(0,), attention_kind="both", **kw)


def test_a_build_runs_the_self_check_by_default_and_reports_its_cost(setup):
    root, teacher, data = setup
    result = build_cache(_request(root, teacher, data, "ok"))
    close_warm_engines()
    assert result.self_check_s is not None and result.self_check_s > 0
    assert set(result.self_check_diff) == {"logprobs", "hidden[1]", "attention[0]"}
    assert max(result.self_check_diff.values()) < sc.TOLERANCE["float32"]
    skipped = build_cache(_request(root, teacher, data, "skipped", self_check=False))
    assert skipped.self_check_s is None


def test_a_capture_that_drops_image_inputs_stops_the_build_before_any_write(setup, monkeypatch):
    """The bug the check exists for: a batch forward without the pixel values still runs."""
    root, teacher, data = setup
    real = hf_engine.stack_model_inputs

    def without_pixels(samples, padding_side="right"):
        stacked = real(samples, padding_side)
        return None if stacked is None else {k: v for k, v in stacked.items() if not k.startswith("pixel")}

    monkeypatch.setattr(hf_engine, "stack_model_inputs", without_pixels)
    close_warm_engines()
    request = _request(root, teacher, data, "wrong")
    with pytest.raises(sc.SelfCheckError, match=r"Qwen2_5_VLForConditionalGeneration: sample '[^']+', logprobs"):
        build_cache(request)
    close_warm_engines()
    assert not [p for p in (root / "wrong").rglob("*") if p.is_file()], "a file was written"


def test_pick_samples_prefers_the_extremes():
    class S:
        def __init__(self, n, img):
            self.input_ids = np.zeros(n)
            self.image_token_mask = np.arange(n) < img

    batch = [S(10, 0), S(30, 2), S(5, 0), S(20, 9)]
    assert sc.pick_samples(batch) == [1, 2, 3]
    assert sc.pick_samples(batch[:1]) == [0]


def test_the_reference_copy_is_let_go_before_the_engine_first_captures(setup):
    """A vLLM engine takes the device's memory at its first capture: the transformers copy the check
    loads must be gone by then, so both never share one GPU."""
    import gc
    import weakref

    from kd.pipeline.build.engines import load_engine
    from kd.pipeline.common.dataset import load_records

    root, teacher, data = setup
    engine = load_engine("hf", str(teacher), device="cpu", dtype="float32", batch_size=4)
    request = _request(root, teacher, data, "order")
    copies: list[weakref.ref] = []

    def load():
        model = sc.reference_model(object(), str(teacher), device="cpu", dtype="float32")  # a copy, as for vLLM
        copies.append(weakref.ref(model))
        return model

    class Watched:
        """The hf engine, noting at each capture whether the copy is still alive."""

        alive_at_capture: list[bool] = []

        def encode(self, batch):
            return engine.encode(batch)

        def capture(self, batch, spec):
            gc.collect()
            self.alive_at_capture.append(any(ref() is not None for ref in copies))
            return engine.capture(batch, spec)

    records = [r.as_dict() for r in load_records(data)][:4]
    report = sc.run_self_check(Watched(), load, records, request.signal_spec(), family="qwen2_5_vl", dtype="float32")
    assert len(copies) == 1 and Watched.alive_at_capture == [False]
    assert set(report.max_diff) == {"logprobs", "hidden[1]", "attention[0]"}
    assert max(report.max_diff.values()) < sc.TOLERANCE["float32"]


def test_the_first_shard_writes_the_self_checks_capture_instead_of_repeating_it(setup, monkeypatch):
    """The self-check captures the build's first batch; that batch is not captured a second time,
    and the cache is byte for byte the one a build without the self-check writes."""
    from cache_helpers import file_tree

    root, teacher, data = setup
    calls: list[int] = []
    real = hf_engine.HFEngine.capture

    def counted(self, batch, spec):
        calls.append(len(batch))
        return real(self, batch, spec)

    monkeypatch.setattr(hf_engine.HFEngine, "capture", counted)
    close_warm_engines()
    checked = build_cache(_request(root, teacher, data, "reused", batch_size=2, shard_size=3))
    with_check = list(calls)
    close_warm_engines()
    calls.clear()
    plain = build_cache(_request(root, teacher, data, "plain", batch_size=2, shard_size=3, self_check=False))
    close_warm_engines()
    assert checked.self_check_s is not None and plain.self_check_s is None
    assert sum(with_check) == sum(calls) == checked.samples, (with_check, calls)  # each sample captured once
    assert with_check == calls  # the same batches: the self-check's is the first shard's first
    # Each shard's files (its folder's name carries a per-attempt suffix, so the folders are matched by shard).
    trees = [[file_tree(d) for d in sorted(Path(r.path, "shards").iterdir()) if d.is_dir()] for r in (checked, plain)]
    assert len(trees[0]) == 2 and trees[0] == trees[1]


def test_a_kept_capture_serves_only_the_same_engine_samples_contents_and_spec():
    """A capture kept from a build that then failed must not stand in for edited records of the same ids."""
    from kd.pipeline.build import shard
    from kd.pipeline.build.engines import SignalSpec

    class Engine:
        calls = 0

        def capture(self, inputs, spec):
            self.calls += 1
            return ["fresh"] * len(inputs)

    engine, other, spec = Engine(), Engine(), SignalSpec(top_k=4)
    kept = [SimpleNamespace(sample_id="a")]
    for asked in [(other, ["a"], ["h1"], spec), (engine, ["b"], ["h1"], spec), (engine, ["a"], ["h2"], spec),
                  (engine, ["a"], ["h1"], SignalSpec(top_k=8))]:
        shard.keep_captured(engine, kept, ("h1",), spec)
        who, ids, hashes, wanted = asked
        assert shard._capture(who, ids, hashes, [{}], wanted) == ["fresh"], asked
    shard.keep_captured(engine, kept, ("h1",), spec)
    assert shard._capture(engine, ["a"], ["h1"], [{}], spec) == kept
    assert shard._capture(engine, ["a"], ["h1"], [{}], spec) == ["fresh"]  # taken once
    shard.drop_captured()
