"""Exact top-k log-probs of an LM head over a large vocabulary, scored tile by tile.

A cache keeps, per answer row, the top-k of ``log_softmax(x @ W.T)`` over ~152k ids. Done plainly
(``[rows, V]`` logits, a log-softmax copy, ``torch.topk`` over each whole row) the passes after the
matmul cost as much as the matmul, and a matmul of a few rows against the whole head re-reads
(and re-packs) the 150+ MB weight for every few rows. ``TiledHead`` instead, per block of
``rows`` rows:

* computes the logits transposed, ``W[tile] @ x.T``, one vocabulary tile (``vocab_tile`` ids)
  at a time into a ``[V, rows]`` buffer: the weight tile is the large operand, read once per
  block, and each output tile is still in cache for the passes below;
* per tile, while it is in cache: the max of every sub-block of ``B`` ids and the tile's
  ``sum(exp(logit - tile max))``; the row's logsumexp is combined from
  the tiles' (max, sum) pairs at the end, so no exp or log-softmax of the block is kept;
* the top-k: a row's top-k ids all lie in the ``k`` sub-blocks with the largest maxima (if an
  id's sub-block is not among them, ``k`` other sub-blocks each hold a larger-or-equal logit),
  so ``torch.topk`` runs on ``V / B`` sub-block maxima and then on those ``k * B`` candidates
  instead of on ``V`` logits. The top-k logits are exactly the plain top-k's; among logits
  that tie exactly, which id is reported may differ.

Determinism: a row's result must not depend on the other rows scored with it (batch
composition, a shard boundary) nor on the thread count (tests/test_cluster.py: 1-thread dask
workers against an in-process build). BLAS gives neither for free: its result for a column
changes with the number of columns, and (MKL 2024, from ~1,024 hidden dims) with the thread
count. So every block has exactly ``rows`` rows (zero-padded) and the reduction over
the hidden size runs in fixed ``k_chunk`` slices, summed in a fixed order; within those shapes
the GEMM's per-column result is the same for any companions, position or thread count
(tests/test_head_kernels.py checks bit equality across all three).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

# (rows per block, vocabulary ids per tile) by device. CPU: a [2048, 128] float32 tile is 1 MiB,
# so the tile and its exp scratch stay in a 2 MiB L2 between the GEMM that writes the tile and the
# passes that read it; a GPU wants big blocks.
TILES = {"cpu": (128, 2048), "cuda": (512, 32768)}
K_CHUNK = 256  # hidden dims per GEMM slice (the reduction split that keeps results thread-independent)
_FLT_MAX = torch.finfo(torch.float32).max
SUB_BLOCK = 32  # ids per sub-block of the top-k search (when the vocabulary has >= 32 * k ids)


def sub_block_size(vocab: int, k: int) -> int:
    """Ids per sub-block: ``SUB_BLOCK``, or smaller so that there are at least ``k`` sub-blocks."""
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k needs 1 <= k <= vocabulary size ({vocab}), got k={k}")
    return SUB_BLOCK if vocab >= SUB_BLOCK * k else max(1, vocab // k)


class TiledHead:
    """``x @ weight.T (+ bias)`` scored in fixed-shape blocks: top-k log-probs or dense log-probs.

    ``weight``: ``[V, H]`` float32 (kept by reference, not copied); ``bias``: ``[V]`` or None;
    ``prepare``: applied to each padded ``[rows, H]`` block before the head (e.g. the final norm:
    a row-wise reduction that, like the GEMM, gives each row the same bits whatever its block-mates
    only when every block has the same shape). Results come back on the CPU. One instance keeps
    its ``[V, rows]`` buffer between calls (~78 MiB at 152k x 128): not safe to share between threads.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, rows: int | None = None,
                 vocab_tile: int | None = None, k_chunk: int = K_CHUNK,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(f"TiledHead needs a 2-d float32 weight, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.to(weight.device, torch.float32).contiguous()
        default_rows, default_tile = TILES.get(weight.device.type, TILES["cuda"])
        self.rows = rows or default_rows
        self.vocab_tile = vocab_tile or default_tile
        self.k_chunk = k_chunk
        self.prepare = prepare
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @torch.inference_mode()
    def topk(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs [N, k] float32, ids [N, k] int64)`` of each row of ``x`` ``[N, H]``, by descending log-prob."""
        sub = sub_block_size(self.vocab_size, k)
        vals, ids = [], []
        for n, buf, lse, submax in self._blocks(x, sub):
            top, top_ids = _topk_from_submax(buf, submax, sub, k)
            vals.append((top - lse[:, None])[:n].cpu())
            ids.append(top_ids[:n].cpu())
        if not vals:
            return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        return torch.cat(vals), torch.cat(ids)

    @torch.inference_mode()
    def logprobs(self, x: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, V]`` float32 log-probs (for sparse sampling, which needs the whole distribution)."""
        v = self.vocab_size
        out = [(buf[:v, :n].T - lse[:n, None]).cpu() for n, buf, lse, _ in self._blocks(x, SUB_BLOCK)]
        return torch.cat(out) if out else torch.empty(0, v)

    def _blocks(self, x: torch.Tensor, sub: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block of ``rows`` rows: (real rows, logits buffer ``[Vpad, rows]``, logsumexp ``[rows]``,
        sub-block maxima ``[Vpad / sub, rows]``). The buffer is reused by the next block."""
        x = x.to(self.weight.device, torch.float32)
        for i in range(0, x.shape[0], self.rows):
            xb = x[i : i + self.rows]
            n = xb.shape[0]
            if n < self.rows:  # every block has the same shape: see the module docstring
                xb = torch.cat([xb, xb.new_zeros(self.rows - n, xb.shape[1])])
            if self.prepare is not None:
                xb = self.prepare(xb)
            buf, lse, submax = self._score_block(xb.T.contiguous(), sub)
            yield n, buf, lse, submax

    def _buffer(self, name: int, shape: tuple[int, int]) -> torch.Tensor:
        key = (name, *shape)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=torch.float32, device=self.weight.device)
        return self._buffers[key]

    def _score_block(self, xt: torch.Tensor, sub: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, r = self.vocab_size, xt.shape[1]
        tile = max(sub, self.vocab_tile // sub * sub)  # tiles hold whole sub-blocks
        vpad = -(-v // sub) * sub
        starts = range(0, vpad, tile)
        buf = self._buffer(0, (vpad, r))
        scratch = self._buffer(1, (min(tile, vpad), r))
        submax = torch.empty(vpad // sub, r, dtype=torch.float32, device=xt.device)
        tile_max = torch.empty(len(starts), r, dtype=torch.float32, device=xt.device)
        tile_sum = torch.empty(len(starts), r, dtype=torch.float32, device=xt.device)
        for j, lo in enumerate(starts):
            hi = min(lo + tile, vpad)
            real = min(hi, v)
            self._matmul(lo, real, xt, buf[lo:real])
            if real < hi:
                buf[real:hi].fill_(-torch.inf)  # ids past the vocabulary, in the last sub-block
            logits = buf[lo:hi]
            sm = submax[lo // sub : hi // sub]
            torch.amax(logits.view(-1, sub, r), dim=1, out=sm)
            # Clamped to finite: an all -inf tile then adds exp(-inf - -FLT_MAX) = 0, not NaN.
            m = torch.amax(sm, dim=0, out=tile_max[j]).clamp_(-_FLT_MAX, _FLT_MAX)
            torch.sum(torch.sub(logits, m, out=scratch[: hi - lo]).exp_(), dim=0, out=tile_sum[j])
        peak = tile_max.amax(0)
        lse = peak + torch.log((tile_sum * torch.exp(tile_max - peak)).sum(0))
        return buf, lse, submax

    def _matmul(self, lo: int, hi: int, xt: torch.Tensor, out: torch.Tensor) -> None:
        """``out = weight[lo:hi] @ xt (+ bias)``, the hidden dims in fixed slices summed in order."""
        w = self.weight[lo:hi]
        step = self.k_chunk
        if self.bias is None:
            torch.mm(w[:, :step], xt[:step], out=out)
        else:
            torch.addmm(self.bias[lo:hi, None], w[:, :step], xt[:step], out=out)
        for k0 in range(step, w.shape[1], step):
            out.addmm_(w[:, k0 : k0 + step], xt[k0 : k0 + step])


def _topk_from_submax(buf: torch.Tensor, submax: torch.Tensor, sub: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logits and ids of each column of ``buf`` ``[Vpad, R]``, searched in the ``k`` sub-blocks
    with the largest maxima (``submax`` ``[Vpad / sub, R]``)."""
    r = buf.shape[1]
    blocks = torch.topk(submax, k, dim=0, sorted=False).indices.T  # [R, k] sub-block ids per row
    cand = buf.view(-1, sub, r)[blocks, :, torch.arange(r, device=buf.device)[:, None]]  # [R, k, sub]
    top, pos = torch.topk(cand.reshape(r, k * sub), k, dim=1, sorted=True)
    return top, blocks.gather(1, pos // sub) * sub + pos % sub
