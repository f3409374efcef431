"""The build's progress bar: samples, tokens/s, ETA and shards done (silent when not a terminal)."""

from __future__ import annotations

import time


class BuildProgress:
    """Rich progress bar: samples, tokens/s, ETA and shards done (silent when not a terminal)."""

    def __init__(self, description: str = "capture", enabled: bool = True):
        self.description = description
        self.enabled = enabled
        self._progress = None
        self._task = None
        self.tokens = 0
        self._t0 = time.perf_counter()
        self.shards_done = 0
        self.total_shards = 0

    def start(self, *, total_samples: int, done_samples: int, total_shards: int, done_shards: int) -> None:
        self.shards_done, self.total_shards = done_shards, total_shards
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("samples"), TextColumn("{task.fields[rate]}"),
                                  TextColumn("shards {task.fields[shards]}"), TimeRemainingColumn())
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total_samples, completed=done_samples,
                                             rate="", shards=f"{done_shards}/{total_shards}")

    def advance(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        if self._progress is not None:
            rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._task, advance=samples, rate=f"{rate:,.0f} tok/s")

    def shard_done(self) -> None:
        self.shards_done += 1
        if self._progress is not None:
            self._progress.update(self._task, shards=f"{self.shards_done}/{self.total_shards}")

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
