"""The daemon's side of fine-tuning (docs/finetune.md): with the label intake
(edged.finetune.intake), start the worker process when enough new labels arrived (or drift
fired, or a new base committed, or the operator switched it back on), install what it returns
through the same slots and health trial as an OTA update after a provenance check, and revert
to the base when switched off. Torch is never imported here; the worker is another process
that never touches the slots, so killing it at any moment changes nothing that serves. The
worker is the daemon's child or runs in the edged-finetune systemd unit
(edged.finetune.launchers); a job handed to the unit when the daemon stopped is collected at
its next start, and no job starts while a unit worker still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from edged.atomic import atomic_write
from edged.config import FinetuneConfig
from edged.errors import EdgedError
from edged.finetune.head_patch import HeadPatchError, check_changed_only, trainable_outputs
from edged.finetune.intake import (
    HttpPersonalisation,
    LabelIntake,
    PersonalisationState,
    Serving,
    log,
)
from edged.finetune.job import (
    CANDIDATE_FILE,
    HEAD_DELTA_FILE,
    Job,
    JobError,
    JobLabels,
    read_job,
    write_job,
)
from edged.finetune.launchers import await_unit, hand_over, run_process
from edged.finetune.request import worker_running
from edged.labels import Label, LabelStore
from edged.logs import RateLimitedLog, log_event
from edged.ota.slots import file_sha256
from edged.ota.trial import InstallOutcome
from edged.sample_store import SampleStore
from edged_formats import FormatError, read_bundle

__all__ = ["HttpPersonalisation", "Personaliser"]

Emit = Callable[..., Awaitable[None]]
Install = Callable[..., Awaitable[InstallOutcome]]
BASE_FILE = "base.edb"
KEEP_JOBS = 2
TICK_S = 5.0


class Personaliser:
    """Owns the label intake and the fine-tune jobs of one daemon."""

    def __init__(
        self,
        config: Callable[[], FinetuneConfig],
        state_dir: Path,
        labels: LabelStore,
        samples: SampleStore,
        serving: Serving,
        install: Install,
        emit: Emit,
        *,
        device_id: str,
        control: HttpPersonalisation | None = None,
        poll_s: float = 3600.0,
        bad_input: RateLimitedLog | None = None,
    ) -> None:
        self._config = config
        self.dir = state_dir / "finetune"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.labels, self.serving = labels, serving
        self._install, self._emit = install, emit
        self.device_id = device_id
        self.state = PersonalisationState.load(self.dir / "state.json")
        self.last: dict[str, Any] | None = None
        self.running = False
        self._wake = asyncio.Event()
        self._drifted = False
        self.intake = LabelIntake(
            config,
            labels,
            samples,
            serving,
            self.state,
            self._save,
            self._wake.set,
            lambda: self.enabled,
            control=control,
            poll_s=poll_s,
            bad_input=bad_input,
        )
        self._torch = importlib.util.find_spec("torch") is not None

    # -- switches ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """The configuration allows it and the operator's switch does not forbid it."""
        return self._config().enabled and self.state.operator is not False

    def serving_base(self) -> tuple[str, Path] | None:
        """The base (sha256, file) of the serving model when it is personalised: the
        updater counts that base as what serves, and patches deltas against its file."""
        lineage = self.serving.engine.manifest.personalisation
        return None if lineage is None else (lineage.base_sha256, self.dir / BASE_FILE)

    def _base_sha256(self) -> str:
        """The digest of the cloud model the serving one is, or derives from."""
        lineage = self.serving.engine.manifest.personalisation
        return self.serving.active_sha256() if lineage is None else lineage.base_sha256

    def drifted(self, _alarm: dict[str, Any]) -> None:
        """A drift listener: a drift event may start a job (`on_drift`)."""
        self._drifted = True
        self._wake.set()

    # -- jobs -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: start a job whenever one is due; revert when switched off."""
        tasks = [asyncio.create_task(self.intake.poll(), name="personalisation poll")]
        try:
            while True:
                # not wait_for: on Python 3.11 a cancel that meets a wake-up in the same turn
                # is lost there, and the daemon's stop waited for this task for ever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    await self.step()
                except (EdgedError, OSError, FormatError) as exc:
                    log_event(log, "error", "finetune_step_failed", reason=str(exc))
        finally:
            for task in tasks:
                task.cancel()

    async def step(self) -> str:
        """One decision: 'reverted', a job's verdict, or why nothing happened."""
        if self.serving.trial_running():
            return "busy"
        if self.state.pending_job is not None:
            return await self._resume()
        if await asyncio.to_thread(worker_running, self.dir):
            return "busy"  # a unit worker no daemon waits for any more: never two at once
        lineage = self.serving.engine.manifest.personalisation
        if not self.enabled:
            if lineage is not None and self.state.reverted_from != self.serving.active_sha256():
                return await self._revert()
            return "disabled"
        reason = self._due(lineage is None)
        if reason is None:
            return "waiting"
        if not self._torch:
            if self.last is None or self.last.get("reason") != NO_TORCH:
                await self._report({"verdict": "failed", "reason": NO_TORCH, "trigger": reason})
            return "failed"
        return await self.job(reason)

    def _due(self, serving_cloud_model: bool) -> str | None:
        cfg = self._config()
        if self.labels.count < cfg.min_labels:
            return None
        if serving_cloud_model and self.state.last_base not in (None, self._base_sha256()):
            return "new_base"  # re-apply personalisation on the new base at once
        if serving_cloud_model and self.state.rebuild:
            return "switched_on"
        if time.time() - self.state.last_job_at < cfg.min_interval_s:
            return None
        if self.labels.added - self.state.mark >= cfg.min_new_labels:
            return "labels"
        if self._drifted and cfg.on_drift and self.labels.added > self.state.mark:
            return "drift"
        return None

    async def job(self, trigger: str) -> str:
        """Export the labels, run the worker, install what passes. Returns the verdict."""
        cfg = self._config()
        self.running = True
        self._drifted = False
        try:
            self.state.mark = self.labels.added  # a job that fails waits for new labels too
            self.state.last_job_at = time.time()
            self.state.rebuild = False
            try:
                base_path, base_sha = await self._base()
                base = read_bundle(await asyncio.to_thread(base_path.read_bytes))
            except (OSError, FormatError, EdgedError) as exc:
                self._save()
                await self._report({"verdict": "failed", "reason": str(exc), "trigger": trigger})
                return "failed"
            if self.state.last_base not in (None, base_sha):
                trigger = "new_base"  # an install raced the decision: it re-applies all the same
            self.state.jobs += 1
            self.state.last_base = base_sha
            self._save()
            number = self.state.jobs
            version = f"{base.manifest.version}+local.{number}"
            job_dir = self.dir / "jobs" / str(number)
            await asyncio.to_thread(self._prune_jobs)
            async with self.intake.applying:
                labels = await self.labels.all()
            spec = Job(
                base=str(base_path),
                base_sha256=base_sha,
                current=str(self.serving.active_path()),
                version=version,
                device=self.device_id,
                holdout_share=cfg.holdout_share,
                min_holdout=cfg.min_holdout,
                min_gain=cfg.min_gain,
                max_replay_loss=cfg.max_replay_loss,
                anchor=cfg.anchor,
                max_iter=cfg.max_iter,
                threads=cfg.threads,
                train=cfg.train,
                block_anchor=cfg.block_anchor,
            )
            await asyncio.to_thread(self._write_job, job_dir, spec, labels, base.manifest.version)
            report: dict[str, Any] = {"trigger": trigger, "job": number}
            if cfg.launcher == "systemd":
                self.state.pending_job, self.state.pending_trigger = number, trigger
                self._save()
                report |= await hand_over(self.dir, job_dir, cfg)
                self.state.pending_job = None
                self._save()
            else:
                report |= await run_process(job_dir, cfg)
            return await self._finish(report, job_dir, spec, base.manifest.version)
        finally:
            self.running = False

    async def _resume(self) -> str:
        """The job an earlier run of the daemon handed to the unit: wait for its worker, then
        install or report its result like any other job's."""
        number, trigger = self.state.pending_job, self.state.pending_trigger
        job_dir = self.dir / "jobs" / str(number)
        self.running = True
        try:
            report: dict[str, Any] = {"trigger": trigger, "job": number, "resumed": True}
            try:
                spec = await asyncio.to_thread(read_job, job_dir)
                base = read_bundle(await asyncio.to_thread(Path(spec.base).read_bytes))
            except (OSError, JobError, FormatError) as exc:
                self.state.pending_job = None
                self._save()
                await self._report({**report, "verdict": "failed", "reason": f"{exc}"})
                return "failed"
            report |= await await_unit(self.dir, job_dir, self._config())
            self.state.pending_job = None
            self._save()
            return await self._finish(report, job_dir, spec, base.manifest.version)
        finally:
            self.running = False

    async def _finish(
        self, report: dict[str, Any], job_dir: Path, spec: Job, base_version: str
    ) -> str:
        """Install an accepted candidate unless it is stale; report the job. Its verdict."""
        report["base"] = {"version": base_version, "sha256": spec.base_sha256}
        if report["verdict"] == "accepted":
            stale = self._stale(spec.base_sha256)
            if stale is not None:
                report |= {"verdict": "discarded", "reason": stale}
            else:
                report |= await self._install_candidate(job_dir, Path(spec.base), spec.version)
        await self._report(report)
        return str(report["verdict"])

    def _stale(self, base_sha: str) -> str | None:
        """Why a finished candidate must not install now: switched off, or the cloud's model
        changed under the worker (a local model never replaces a cloud rollout's target)."""
        if not self.enabled:
            return "personalisation was switched off while the worker ran"
        if self._base_sha256() != base_sha:
            return "the serving model's base changed while the worker ran"
        return None

    async def _base(self) -> tuple[Path, str]:
        """The cloud model the serving one is (or derives from), kept in finetune/base.edb."""
        copy, sha = self.dir / BASE_FILE, self._base_sha256()
        if copy.exists() and await asyncio.to_thread(file_sha256, copy) == sha:
            return copy, sha
        if self.serving.engine.manifest.personalisation is not None:
            raise EdgedError("the base of the serving personalised model is not on the device")
        data = await asyncio.to_thread(self.serving.active_path().read_bytes)
        await asyncio.to_thread(atomic_write, copy, data)
        return copy, sha

    def _write_job(self, job_dir: Path, spec: Job, labels: list[Label], base: str) -> None:
        shape = self.serving.engine.sample_shape
        usable = [lb for lb in labels if tuple(lb.input.shape) == shape]
        size = self.serving.engine.manifest.embedding
        width = 0 if size is None else size.size
        embedded = np.zeros(len(usable), bool)
        embeddings = np.zeros((len(usable), width), np.float32)
        for i, lb in enumerate(usable):
            if lb.embedding is not None and lb.embedded_on == base and lb.embedding.size == width:
                embedded[i], embeddings[i] = True, lb.embedding
        dtype = np.dtype(self.serving.engine.manifest.input.dtype)
        labelled = JobLabels(
            keys=np.array([lb.key for lb in usable], dtype=str),
            x=np.stack([lb.input for lb in usable]) if usable else np.zeros((0, *shape), dtype),
            y=np.array([lb.label for lb in usable], np.int64),
            embeddings=embeddings,
            embedded=embedded,
        )
        write_job(job_dir, spec, labelled)

    def _prune_jobs(self) -> None:
        jobs = self.dir / "jobs"
        if not jobs.exists():
            return
        old = sorted((p for p in jobs.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        for path in old[: max(0, len(old) - KEEP_JOBS + 1)]:
            shutil.rmtree(path, ignore_errors=True)

    async def _install_candidate(
        self, job_dir: Path, base_path: Path, version: str
    ) -> dict[str, Any]:
        """Provenance check, then the A/B slots and health trial; the install's outcome."""
        candidate_path = job_dir / CANDIDATE_FILE
        try:
            data, base_data = await asyncio.to_thread(
                lambda: (candidate_path.read_bytes(), base_path.read_bytes())
            )
            candidate, base = read_bundle(data), read_bundle(base_data)
            lineage = candidate.manifest.personalisation
            base_sha = hashlib.sha256(base_data).hexdigest()
            if lineage is None or lineage.base_sha256 != base_sha:
                raise EdgedError("the candidate does not name the device's base as its base")
            if (
                candidate.manifest.version != version
                or candidate.manifest.name != base.manifest.name
            ):
                raise EdgedError("the candidate's name or version is not the job's")
            try:
                check_changed_only(base.model, candidate.model, trainable_outputs(base.manifest))
            except HeadPatchError as exc:
                raise EdgedError(
                    "the candidate's model differs from the base outside what the base allows "
                    f"to be trained ({exc})"
                ) from exc
            delta = _head_delta(job_dir)
        except (OSError, FormatError, HeadPatchError, EdgedError) as exc:
            return {"verdict": "refused", "reason": f"provenance check failed: {exc}"}
        outcome = await self._install(
            data,
            hashlib.sha256(data).hexdigest(),
            version,
            context={"origin": "finetune", "base_version": base.manifest.version},
        )
        figures = {"install": outcome.result, "install_reason": outcome.reason}
        if outcome.result == "committed":
            self.state.reverted_from = None
            self._save()
            return {"verdict": "installed", **figures, "head_delta": delta}
        return {"verdict": outcome.result, **figures}

    async def _revert(self) -> str:
        """Switched off while serving a personalised model: the base again, through the
        slots and the trial."""
        lineage = self.serving.engine.manifest.personalisation
        assert lineage is not None
        personalised = self.serving.active_sha256()
        self.state.reverted_from = personalised  # tried once per personalised model
        self._save()
        copy = self.dir / BASE_FILE
        try:
            data = await asyncio.to_thread(copy.read_bytes)
        except OSError as exc:
            await self._report({"verdict": "failed", "reason": f"cannot revert: {exc}"})
            return "failed"
        sha = hashlib.sha256(data).hexdigest()
        if sha != lineage.base_sha256:
            await self._report({"verdict": "failed", "reason": "cannot revert: base changed"})
            return "failed"
        outcome = await self._install(  # the operator's choice: less sure is expected
            data,
            sha,
            lineage.base_version,
            context={"origin": "finetune_off"},
            judge_confidence=False,
        )

        await self._report(
            {
                "verdict": "reverted" if outcome.result == "committed" else outcome.result,
                "reason": outcome.reason,
                "base": {"version": lineage.base_version, "sha256": sha},
            }
        )
        return "reverted"

    async def _report(self, report: dict[str, Any]) -> None:
        report = {"labels": self.labels.count, **report}
        self.last = {k: v for k, v in report.items() if k != "head_delta"}
        await self._emit("finetune", **report)

    def _save(self) -> None:
        self.state.save(self.dir / "state.json")

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "operator": self.state.operator,
            "labels": self.labels.count,
            "new_labels": self.labels.added - self.state.mark,
            "jobs": self.state.jobs,
            "running": self.running,
            "refused": dict(self.intake.refused),
            "cloud_seq": self.state.cloud_seq,
            "last": self.last,
        }


NO_TORCH = "fine-tuning needs the finetune extra (torch) installed on the device"


def _head_delta(job_dir: Path) -> dict[str, Any]:
    """The report's `head_delta`: the head's change and, when the block was trained, the
    block's (`block_shape`, `block_weight`, `block_bias`), as float16 bytes."""
    with np.load(job_dir / HEAD_DELTA_FILE) as npz:
        arrays = {name: npz[name].astype("<f2") for name in npz.files}
    delta: dict[str, Any] = {
        "dtype": "<f2",
        "shape": list(arrays["weight"].shape),
        "weight": arrays["weight"].tobytes(),
        "bias": arrays["bias"].tobytes(),
    }
    if "block_weight" in arrays:
        delta |= {
            "block_shape": list(arrays["block_weight"].shape),
            "block_weight": arrays["block_weight"].tobytes(),
            "block_bias": arrays["block_bias"].tobytes(),
        }
    return delta
