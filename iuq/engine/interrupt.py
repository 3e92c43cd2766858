"""SIGINT / SIGTERM during training: finish the step, write the checkpoint, say how to resume.

A signal only sets a flag. At the end of the current step the run asks Lightning to stop
(`should_stop`), Lightning finishes the step's bookkeeping (schedule, logs), and the checkpoint is
written when training has ended, so `--resume` from it is exact (the data stream follows the
optimiser step, see `iuq.engine.data.StepSampler`). A second signal stops at once, keeping the
previous checkpoint. Under DDP the ranks agree on the flag every step, so they stop together.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L


class RunInterrupted(Exception):
    """Training stopped on a signal; `exit_code` is 128 + the signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop(L.Callback):
    """`install()` before `trainer.fit` and `restore()` after it; as a callback it does the stopping."""

    def __init__(self, last: Path, resume_command: str):
        self.last, self.resume_command = last, resume_command
        self.signum: int | None = None
        self.stopping = False  # set at the step boundary where the run stops
        self._previous: dict[int, object] = {}

    # -- signal handlers ------------------------------------------------------------------------------
    def install(self) -> None:
        """Before training; again at its start, over Lightning's SIGTERM handler (which would end the
        run with its own exception after the step, before a checkpoint could be written)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (e.g. not under a notebook's worker)
        for s in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(s, self._on_signal)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step and writing {self.last} "
            "(send it again to stop at once, without that checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    # -- stopping at a step boundary ------------------------------------------------------------------
    def _requested(self, trainer) -> bool:
        return bool(trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False))

    def on_train_start(self, trainer, module) -> None:
        self.install()
        if self._requested(trainer):  # the signal came while the run was starting: nothing new to save
            raise self.interrupted(trainer.global_step, saved=False)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not self.stopping and self._requested(trainer):
            self.stopping = True
            trainer.should_stop = True
            # Lightning validates when a run is asked to stop (for early stopping); an interruption
            # is not the end of training, and the resumed run evaluates on its schedule.
            trainer.limit_val_batches = 0

    def on_train_end(self, trainer, module) -> None:
        if self.stopping:
            trainer.save_checkpoint(self.last, weights_only=False)

    def interrupted(self, step: int, saved: bool) -> RunInterrupted:
        """The exception that ends the command (exit code 128 + signal)."""
        signum = self.signum or signal.SIGINT
        name = signal.Signals(signum).name
        if not saved and not self.last.is_file():
            return RunInterrupted(
                f"{name}: stopped before the first step; nothing to resume, start the run again", signum
            )
        what = f"checkpoint of step {step} written to" if saved else "stopped before the first step; unchanged:"
        return RunInterrupted(f"{name}: {what} {self.last}; resume with: {self.resume_command}", signum)
