"""Row (c) of bench/train_step.py: a teacher model in memory that computes each step's targets.
"""

from __future__ import annotations


class OnlineTeacher:
    """A teacher model in memory that produces, for a collated batch, the entry ``collate`` would
    build from its cache: top-k ids / log-probs / tail, hidden states and attention maps, computed
    exactly as ``engines/hf_engine.py`` computes them (answer-predicting positions only)."""

    def __init__(self, model_dir: str, k: int, hidden_layers, attention: tuple[str, tuple[int, ...]], device,
                 maps: bool) -> None:
        from kd.pipeline.distill.student import load_student, use_map_attention

        self.model, _ = load_student(model_dir)
        self.maps = maps and bool(attention[1])
        if self.maps:
            use_map_attention(self.model)  # the same attention-map route as the student's
        elif attention[1]:
            self.model.set_attn_implementation("eager")  # as the hf engine does
        self.model.to(device).eval().requires_grad_(False)
        self.k, self.hidden_layers = k, tuple(hidden_layers)
        self.kind, self.attention_layers = attention

    def targets(self, batch: dict) -> dict:
        import torch

        from kd.pipeline.distill.data import flatten_maps, map_shapes
        from kd.pipeline.build.engines.base import tail_logmass

        device = batch["input_ids"].device
        positions = [torch.arange(int(a) - 1, int(a) - 1 + int(t), device=device)
                     for a, t in zip(batch["answer_start"], batch["num_tokens"])]
        keep = torch.unique(torch.cat(positions))
        rows = [torch.searchsorted(keep, p) for p in positions]
        store, hooks = {}, []
        modules = [self.model.get_decoder().layers[layer].self_attn for layer in self.attention_layers]
        for layer, mod in zip(self.attention_layers, modules):
            def hook(_mod, _inp, output, layer=layer):
                weights = output[1].float().mean(dim=1)
                store[layer] = weights if self.maps else weights[:, keep, :]
            hooks.append(mod.register_forward_hook(hook))
            if self.maps:
                mod._kd_keep = keep
        extra = batch["model_inputs"] or {}
        try:
            # no_grad, not inference_mode: the targets are saved for the student's backward.
            with torch.no_grad():
                out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 output_hidden_states=bool(self.hidden_layers), use_cache=False, logits_to_keep=keep,
                                 **extra)
                lp = torch.log_softmax(out.logits.float(), dim=-1)
                lp = torch.cat([lp[b, r] for b, r in enumerate(rows)])
                vals, ids = torch.topk(lp, min(self.k, lp.shape[-1]), dim=-1)
                lengths = batch["lengths"].tolist()
                entry = {
                    "ids": ids, "logprobs": vals, "tail": tail_logmass(vals).to(device),
                    "hidden": {layer: torch.cat([out.hidden_states[layer][b, p] for b, p in enumerate(positions)])
                               for layer in self.hidden_layers},
                    "attention_t2v": {}, "attention_full": {},
                }
                shapes = map_shapes(batch, self.kind)
                for layer in self.attention_layers:
                    maps = [store[layer][b, r, : lengths[b]] for b, r in enumerate(rows)]
                    if self.kind == "t2v":
                        maps = [m[:, batch["image_mask"][b, : lengths[b]]] for b, m in enumerate(maps)]
                    entry[f"attention_{self.kind}"][layer] = flatten_maps(maps, shapes, batch["sample_ids"], "map")
        finally:
            for h in hooks:
                h.remove()
            for mod in modules:
                mod.__dict__.pop("_kd_keep", None)
        return entry
