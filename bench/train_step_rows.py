"""One row of bench/train_step.py as a training state and its timed step (``RowRunner``), and the
plain SFT row's data (``SFTDataset``).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

from train_step_online import OnlineTeacher
from train_step_setup import ATTENTION, HIDDEN_LAYERS, ROLES


def to_device(obj, device, copy: bool = False):
    """The batch on ``device``; ``copy``: new tensors even on the loader's device (a CPU batch is
    mostly numpy memory that torch's allocator never sees; a GPU run allocates its copy)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, copy=copy)
    if isinstance(obj, dict):
        return {k: to_device(v, device, copy) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device, copy) for v in obj]
    return obj


class SFTDataset:
    """The student's own encoding of each record, no teacher (plain SFT's data)."""

    def __init__(self, records, processor) -> None:
        self.records, self.processor = list(records), processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import numpy as np

        from kd.pipeline.distill.data import DistillSample
        from kd.pipeline.common.encoding import encode_record

        rec = self.records[i]
        enc = encode_record(self.processor, rec.as_dict())
        return DistillSample(sample_id=rec.id, capability=rec.capability, input_ids=enc.input_ids.astype(np.int64),
                             answer_start=enc.answer_start, answer_ids=enc.answer_ids.astype(np.int64),
                             image_token_mask=enc.image_token_mask, model_inputs=enc.model_inputs, teachers={})


def loss_config(args: argparse.Namespace):
    """``kd distill``'s default loss config with the ``--set loss.field=value`` overrides."""
    from kd.pipeline.distill.config import LossConfig, apply_overrides

    return LossConfig(**apply_overrides({}, args.set).get("loss", {}))


class RowRunner:
    """One row's training state (its own student copy, optimiser, data loader, teachers) and its step."""

    def __init__(self, row: str, setup: dict, args: argparse.Namespace, records, device) -> None:
        import torch
        from torch.utils.data import DataLoader

        from kd.cache_schema import SignalConfig
        from kd.pipeline.distill.data import (
            DistillDataset,
            EpochSampler,
            collate,
            open_teachers,
        )
        from kd.pipeline.distill.objective import (
            DistillObjective,
            build_objective,
            plan_teacher,
        )
        from kd.pipeline.distill.student import (
            load_student,
            student_dims,
            use_map_attention,
        )
        from kd.pipeline.distill.train import DistillModule, make_adamw

        self.row, self.device = row, device
        self.copy_batch = False  # True when measuring tensors: count the batch as a GPU run would
        self.cuda = device.type == "cuda"
        torch.manual_seed(0)
        student, processor = load_student(setup["student"])
        tok = getattr(processor, "tokenizer", processor)
        self.teachers: dict[str, OnlineTeacher] = {}
        objective = None
        if row in ("cached", "loader"):
            sources = open_teachers(setup["caches"], {}, processor)
            dataset = DistillDataset(records, processor, sources)
            objective = build_objective(loss_config(args), sources, student)
        else:
            dataset = SFTDataset(records, processor)
        if row == "online":
            n_layers, width = student_dims(student)
            plans = {}
            for role in ROLES:
                kind, layers = ATTENTION[role]
                self.teachers[role] = OnlineTeacher(setup["teachers"][role], args.k, HIDDEN_LAYERS, (kind, layers),
                                                    device, not args.eager_attention)
                t_layers, t_width = student_dims(self.teachers[role].model)
                signals = SignalConfig(logits="topk", top_k=args.k, hidden_layers=HIDDEN_LAYERS,
                                       attention_layers=layers, attention_kinds=(kind,))
                plans[role] = plan_teacher(role, signals, loss_config(args), student_layers=n_layers,
                                           teacher_width=t_width, teacher_depth=t_layers)
            objective = DistillObjective(loss_config(args), plans, student_width=width)
        self.sampler = EpochSampler(len(dataset), seed=0)
        self.loader = DataLoader(dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.num_workers, collate_fn=partial(collate, pad_id=tok.pad_token_id or 0),
                                 persistent_workers=args.num_workers > 0)
        self.data = self._batches()
        if row == "loader":
            return
        if objective is not None and objective.attention_layers:
            if args.eager_attention:
                student.set_attn_implementation("eager")  # every layer's weights materialised
            else:
                use_map_attention(student)  # as kd distill does
        self.student, self.objective = student, objective
        self.module = DistillModule(student, objective) if objective is not None else student
        self.module.to(device).train()
        groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
        if objective is not None and list(objective.parameters()):
            groups.append({"params": list(objective.parameters())})
        self.optimizer = make_adamw(groups, lr=1e-4)  # kd distill's, in every row
        self.weights = objective.fixed_weights() if objective is not None else None

    def _batches(self):
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            epoch += 1

    def step(self) -> dict:
        """One training step: fetch, (teachers,) forward, losses, backward, clip, AdamW. Returns its timings."""
        import torch

        from kd.pipeline.distill.data import attention_layout
        from kd.pipeline.distill.student import student_forward
        from kd.pipeline.distill.losses import answer_ce_loss

        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        batch = to_device(next(self.data), self.device, copy=self.copy_batch)
        t1 = time.perf_counter()
        if self.teachers:
            batch["teachers"] = {role: t.targets(batch) for role, t in self.teachers.items()}
            kinds = {t.kind for t in self.teachers.values() if t.attention_layers}
            batch["attention_layout"] = {kind: attention_layout(batch, kind) for kind in kinds}
        t2 = time.perf_counter()
        if self.objective is None:
            loss = answer_ce_loss(student_forward(self.student, batch).logits, batch["targets"])
        else:
            loss = self.module(batch).total(self.weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        return {"step_s": t3 - t0, "data_s": t1 - t0, "teachers_s": t2 - t1, "tokens": int(batch["lengths"].sum())}
