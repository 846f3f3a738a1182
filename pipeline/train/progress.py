"""A rich progress display for a run: tokens/s, loss and the time left to the deadline."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn


class ProgressDisplay:
    def __init__(self, budget, enabled: bool = True):
        self.budget = budget
        self.console = Console(stderr=True)
        # Off the terminal (CI, pipes, Ray workers) a live bar is noise: print notes only.
        self.enabled = enabled and self.console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(),
                                 TextColumn("{task.percentage:>5.1f}%"),
                                 TextColumn("{task.fields[tps]:>9} tok/s  loss {task.fields[loss]:>7}"
                                            "  left {task.fields[left]}"),
                                 console=self.console, disable=not self.enabled)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        # the schedule's own progress (`Trainer.progress`): the deadline's, the token cap's, or
        # whichever binds first
        self.task = self.progress.add_task("train", total=1.0, tps="-", loss="-", left="-")
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, trainer, loss: float, step_times: list[float]) -> None:
        if not self.enabled:
            return
        tps = trainer.tokens_per_step / max(1e-9, step_times[-1])
        left = []  # seconds to the deadline and to the token cap: the nearer is shown
        if self.budget.timed:
            left.append(self.budget.seconds - trainer.elapsed())
        if self.budget.tokens is not None:
            left.append((self.budget.tokens - trainer.tokens) / max(tps, 1e-9))
        m, s = divmod(int(max(0.0, min(left))), 60)
        done = trainer.progress(trainer.result.reserve_s)
        self.progress.update(self.task, completed=min(1.0, done), tps=f"{tps:,.0f}", loss=f"{loss:.4f}",
                             left=f"{m}:{s:02d}")

    def note(self, text: str) -> None:
        self.console.print(text)
