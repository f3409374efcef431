"""kd's teacher caches in a transformers ``Trainer`` (and TRL's ``SFTTrainer``).

Teams share caches across experiments that run in many trainers, not only in ``kd distill``. This
module gives any ``Trainer`` what ``kd distill`` trains on, with nothing loaded from the teacher:

* ``KDDataset.from_caches(data, processor, {role: cache url})``: the student's inputs joined with
  every cache by sample id. It is kd distill's ``DistillDataset``: alignment is proved before the
  first step, with the same checks and the same ``AlignmentError`` naming the sample and cache.
* ``KDCollator``: kd distill's ``collate`` (student inputs plus each teacher's targets for the batch).
* ``KDTrainerMixin`` / ``KDTrainer``: ``compute_loss`` is kd distill's objective
  (``build_objective``: CE plus per-teacher top-k or sampled KD, hidden-state and attention-map
  terms, weighted per capability by the mixing matrix), configured by the same ``LossConfig``
  fields (``kd_loss=``). Mix it into any ``Trainer`` subclass: ``class T(KDTrainerMixin, MyTrainer)``.
  ``KDSFTTrainer`` (``KDTrainerMixin`` + TRL's ``SFTTrainer``) exists when TRL is installed. TRL's
  trainers accept only a ``datasets.Dataset``, so for them the mixin hands over ``index_dataset``
  rows (``{kd_index, kd_dataset}``) and the ``KDCollator`` reads each batch's samples from the kd
  dataset (TRL's tokenization is skipped for those rows).

Why the model is wrapped: the objective holds trainable hidden-state projectors. The Trainer builds
its optimizer from ``self.model`` and accelerate wraps ``self.model`` in DDP, so the student and the
projectors must be one module to be trained and synchronised together. After the Trainer's own
setup (which sees the plain student), ``self.model`` becomes ``KDModel(student, objective)``, kd
distill's ``DistillModule``; it answers every other attribute (``config``,
``gradient_checkpointing_enable``, ...) from the student. ``save_model`` writes the student alone,
as a transformers directory (``kd eval --model DIR`` reads it), plus the projectors in
``kd_objective.safetensors`` beside it, which ``resume_from_checkpoint`` loads back.

Multi-GPU: the Trainer's own accelerate, one process per GPU (``accelerate launch train.py`` or
``torchrun --nproc_per_node N train.py``). Each rank reads only its batches from the caches; DDP
syncs the student and projectors. One process driving several GPUs (``nn.DataParallel``) is
refused: its scatter cannot split a kd batch. End such a script with
``trainer.accelerator.end_training()``: it destroys the process group, without which a rank may
abort in gloo's teardown at exit and the launch fail after training finished. Tested with two CPU
processes (gloo): both ranks end with the same student and projectors.

What the Trainer path does not do: learnable loss weights (``weighting="learnable"``) and AGP
(``agp=True``) need kd distill's own step (per-loss gradients, a second optimizer), so they are
refused here with that reason; attention-map terms do not combine with gradient checkpointing (the
maps are captured by hooks that a recomputed layer does not run), also refused. The Trainer's
``remove_unused_columns`` must be False (its column filter expects dict rows); it is set so.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments

from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import DistillDataset, LossConfig, open_teachers
from kd.pipeline.distill.data import TeacherSource, collate
from kd.pipeline.distill.mixing import check_capabilities
from kd.pipeline.distill.objective import DistillObjective, LossBreakdown, build_objective
from kd.pipeline.distill.student import use_map_attention
from kd.pipeline.distill.train import DistillModule

__all__ = ["KD_DATASET", "KD_INDEX", "OBJECTIVE_FILE", "KDCollator", "KDDataset", "KDModel", "KDTrainer",
           "KDTrainerMixin", "index_dataset", "loss_config"]

OBJECTIVE_FILE = "kd_objective.safetensors"  # the projectors, next to the student that save_model writes


# ----------------------------------------------------------------------------- data


KD_INDEX, KD_DATASET = "kd_index", "kd_dataset"  # the columns of an index dataset (TRL)


class KDDataset(DistillDataset):
    """kd distill's ``DistillDataset`` for a Trainer: the same encoding, cache reads and alignment
    checks, plus ``source`` (the JSONL it came from, for messages) and ``index_dataset`` (for
    trainers that take only a ``datasets.Dataset``)."""

    source: str = ""

    @classmethod
    def from_caches(cls, data: str | os.PathLike | Sequence[Any], processor: Any,
                    teachers: Mapping[str, str] | Mapping[str, TeacherSource], *,
                    vocab_maps: Mapping[str, str] | None = None, missing: str = "error",
                    cache_mib: int = 512) -> KDDataset:
        """Open ``teachers`` (``{role: cache url}``, or sources from ``open_teachers``) and join them
        with ``data`` (a stage-one JSONL, or its records) for the student's ``processor``.

        ``vocab_maps``, ``missing`` and ``cache_mib`` mean what they mean for ``kd distill``
        (``vocab_maps.<role>``, ``missing``, ``train.cache_mib``). Raises ``AlignmentError`` naming
        the first sample and cache that do not line up, before any batch is read.
        """
        if teachers and all(isinstance(t, TeacherSource) for t in teachers.values()):
            sources = dict(teachers)
        else:
            sources = open_teachers(dict(teachers), dict(vocab_maps or {}), processor, cache_bytes=cache_mib << 20)
        is_path = isinstance(data, (str, os.PathLike))
        dataset = cls(load_records(data) if is_path else list(data), processor, sources, missing=missing)
        dataset.source = os.fspath(data) if is_path else ""
        return dataset


def index_dataset(dataset: DistillDataset, name: str) -> Any:
    """A ``datasets.Dataset`` of rows ``{kd_index: i, kd_dataset: name}``, one per sample of
    ``dataset``: TRL's trainers accept nothing else. ``KDCollator`` reads the samples of a batch of
    such rows from ``dataset`` (registered under ``name``), so each teacher is still read once per batch."""
    import datasets

    return datasets.Dataset.from_dict({KD_INDEX: list(range(len(dataset))), KD_DATASET: [name] * len(dataset)})


@dataclass
class KDCollator:
    """kd distill's ``collate`` as a Trainer ``data_collator``: right-padded student inputs (with
    ``pad_id``) plus every teacher's targets, flattened over answer tokens.

    Its features are the samples of a ``DistillDataset``, or rows of an ``index_dataset``, read
    here from ``datasets[row["kd_dataset"]]``."""

    pad_id: int = 0
    datasets: dict[str, DistillDataset] = field(default_factory=dict)

    @classmethod
    def for_processor(cls, processor: Any) -> KDCollator:
        """Pad with the student tokenizer's pad token, as ``kd distill`` does."""
        tok = getattr(processor, "tokenizer", processor)
        return cls(getattr(tok, "pad_token_id", None) or 0)

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        if features and isinstance(features[0], Mapping):  # index rows: read the samples, a batch at once
            names = {f[KD_DATASET] for f in features}
            if len(names) != 1 or not names <= set(self.datasets):
                raise ValueError(f"index rows of datasets {sorted(names)}; this collator reads {sorted(self.datasets)}")
            features = self.datasets[names.pop()].__getitems__([int(f[KD_INDEX]) for f in features])
        return collate(features, pad_id=self.pad_id)


# ----------------------------------------------------------------------------- model


class KDModel(DistillModule):
    """Student + objective as one module (kd distill's ``DistillModule``: ``forward(batch)`` returns
    the ``LossBreakdown``), answering every attribute it lacks from the student so the Trainer's
    code written for a transformers model (``config``, ``gradient_checkpointing_enable``,
    ``floating_point_ops``, ...) works unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self.__dict__.get("_modules", {}).get("student")
            if student is None or name.startswith("__"):
                raise
            return getattr(student, name)


def loss_config(kd_loss: LossConfig | Mapping[str, Any] | None) -> LossConfig:
    """``kd_loss`` as a ``LossConfig`` (a mapping holds the fields of kd distill's ``loss`` section),
    refusing what only kd distill's own step implements."""
    cfg = kd_loss if isinstance(kd_loss, LossConfig) else LossConfig(**dict(kd_loss or {}))
    if cfg.weighting != "fixed":
        raise ValueError("loss.weighting=learnable needs kd distill's own step (GradNorm weights with their own "
                         "optimizer); the Trainer path trains fixed weights: use kd distill for learnable weights")
    if cfg.agp:
        raise ValueError("loss.agp needs kd distill's own step (one gradient per loss, projected); the Trainer path "
                         "runs one backward: use kd distill for AGP")
    return cfg


# ----------------------------------------------------------------------------- trainer


class KDTrainerMixin:
    """kd's objective for any ``Trainer`` subclass: ``class MyKDTrainer(KDTrainerMixin, MyTrainer)``.

    Takes the base trainer's arguments plus ``kd_loss`` (a ``LossConfig`` or a mapping of its
    fields, as kd distill's ``loss`` section). ``model`` is the student itself (``load_student``)
    and ``train_dataset`` a ``DistillDataset`` (``KDDataset.from_caches``): the teachers are the
    caches the dataset reads. ``data_collator`` defaults to ``KDCollator`` and ``processing_class``
    to the dataset's processor (saved with the model). See the module docstring.
    """

    kd_objective: DistillObjective
    kd_loss_config: LossConfig

    def __init__(self, *args: Any, kd_loss: LossConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        lc = loss_config(kd_loss)
        a = inspect.signature(super().__init__).bind_partial(*args, **kwargs).arguments
        a.pop("kwargs", None)
        student, train = a.get("model"), a.get("train_dataset")
        if not isinstance(student, nn.Module):
            raise TypeError(f"{type(self).__name__} needs model= the student module (kd.api.load_student), "
                            f"got {type(student).__name__}")
        if not isinstance(train, DistillDataset):
            raise TypeError(f"{type(self).__name__} needs train_dataset= a kd DistillDataset "
                            f"(KDDataset.from_caches), got {type(train).__name__}")
        evals = a.get("eval_dataset")
        for name, ds in (evals.items() if isinstance(evals, Mapping) else [("eval", evals)] if evals else []):
            if not isinstance(ds, DistillDataset) or list(ds.sources) != list(train.sources):
                raise ValueError(f"eval dataset {name!r} must be a DistillDataset over the teachers "
                                 f"{list(train.sources)} of the train dataset")
        objective = build_objective(lc, train.sources, student)
        check_capabilities(train.records.capabilities(), objective.roles,
                           "uniform" if len(objective.roles) == 1 else lc.unknown_capability,
                           source=getattr(train, "source", ""))
        if objective.attention_layers:
            use_map_attention(student)  # sdpa, plus the attention weights of the answer rows of the layers read
        targs = a.get("args") or TrainingArguments(output_dir="trainer_output")
        targs.remove_unused_columns = False  # its column filter expects dict rows, not kd samples
        if targs.gradient_checkpointing and objective.attention_layers:
            raise ValueError("attention-map terms do not combine with gradient checkpointing (a recomputed layer "
                             "runs without the hooks that capture its maps): set gradient_checkpointing=False, "
                             "or loss.attention=0")
        a["args"] = targs
        collator = a.get("data_collator")
        if collator is None:
            collator = a["data_collator"] = KDCollator.for_processor(train.processor)
        if a.get("processing_class") is None:
            a["processing_class"] = train.processor
        if self._takes_hf_datasets():  # TRL: index rows, the samples read by the collator
            if not isinstance(collator, KDCollator):
                raise TypeError("a TRL trainer gets kd samples as index rows: use a KDCollator as data_collator")
            named = {"train": train, **(dict(evals) if isinstance(evals, Mapping) else {"eval": evals} if evals else {})}
            collator.datasets.update(named)
            a["train_dataset"] = index_dataset(train, "train")
            if evals:
                a["eval_dataset"] = ({k: index_dataset(v, k) for k, v in evals.items()} if isinstance(evals, Mapping)
                                     else index_dataset(evals, "eval"))
        super().__init__(**a)
        if self.args.n_gpu > 1:
            raise ValueError(f"{self.args.n_gpu} GPUs in one process would use nn.DataParallel, which cannot split "
                             "a kd batch: run one process per GPU (accelerate launch / torchrun)")
        self.kd_loss_config = lc
        self.kd_objective = objective.to(self.args.device)
        self.model = self.model_wrapped = KDModel(self.model, self.kd_objective)
        # The loss is a token-weighted mean per micro-batch, as in kd distill: the Trainer divides it
        # by the accumulation steps (it has no labels to count items by).
        self.model_accepts_loss_kwargs = False
        self._kd_terms: dict[str, float] = {}
        self._kd_batches = 0

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, LossBreakdown]:
        """kd distill's loss of a collated batch: ``objective(student_forward(...)).total(fixed weights)``."""
        breakdown = model(inputs)
        loss = breakdown.total(self.kd_objective.fixed_weights())
        if model.training:
            for k, v in breakdown.terms.items():
                self._kd_terms[k] = self._kd_terms.get(k, 0.0) + v
            self._kd_batches += 1
        return (loss, breakdown) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        """The eval loss is kd's loss on the eval batch (there are no logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean of each loss term since the last log (``terms/ce``, ``terms/kd/<role>``, ...:
        this rank's, as kd distill's ``metrics.jsonl`` names them) to the training logs."""
        if self._kd_batches and "loss" in logs:
            logs.update({f"terms/{k}": v / self._kd_batches for k, v in self._kd_terms.items()})
            self._kd_terms, self._kd_batches = {}, 0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ data (TRL)

    def _takes_hf_datasets(self) -> bool:
        """TRL's trainers accept only a ``datasets.Dataset``: kd's are handed to them as index rows."""
        return any(c.__module__.split(".")[0] == "trl" for c in type(self).__mro__)

    def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        """TRL's trainers tokenize their datasets; kd's index rows point at samples already encoded
        and aligned."""
        if KD_INDEX in (getattr(dataset, "column_names", None) or ()):
            return dataset
        return super()._prepare_dataset(dataset, *args, **kwargs)

    # ------------------------------------------------------------------ save / resume

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The student alone as a transformers directory, the projectors in ``OBJECTIVE_FILE``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        kd_model = self.accelerator.unwrap_model(self.model)
        if not isinstance(kd_model, KDModel):
            return super()._save(output_dir, state_dict)
        student_state = None
        objective_state = kd_model.objective.state_dict()
        if state_dict is not None:  # gathered by FSDP / DeepSpeed for the whole wrapper
            student_state = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
            objective_state = {k[len("objective."):]: v for k, v in state_dict.items() if k.startswith("objective.")}
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        kd_model.student.save_pretrained(output_dir, state_dict=student_state)
        if objective_state:
            save_file({k: v.detach().cpu().contiguous() for k, v in objective_state.items()},
                      os.path.join(output_dir, OBJECTIVE_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The student through the Trainer's own loader, the projectors from ``OBJECTIVE_FILE``."""
        kd_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(kd_model, KDModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=kd_model.student)
        if len(kd_model.objective.state_dict()):
            path = Path(resume_from_checkpoint) / OBJECTIVE_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint holds no kd projectors to resume the objective from")
            device = next(kd_model.objective.parameters()).device
            kd_model.objective.load_state_dict(load_file(path, device=str(device)))


class KDTrainer(KDTrainerMixin, Trainer):
    """A transformers ``Trainer`` training the student on kd's objective from teacher caches
    (``KDTrainerMixin`` + ``Trainer``; see the module docstring)."""


def __getattr__(name: str) -> Any:
    """``KDSFTTrainer``: ``KDTrainerMixin`` + TRL's ``SFTTrainer``, made when first imported (TRL is
    optional; importing this module never imports it)."""
    if name == "KDSFTTrainer":
        from trl import SFTTrainer

        cls = type("KDSFTTrainer", (KDTrainerMixin, SFTTrainer),
                   {"__module__": __name__, "__doc__": "TRL's SFTTrainer on kd's objective (KDTrainerMixin)."})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
