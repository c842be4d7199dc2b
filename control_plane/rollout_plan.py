"""Staged rollouts, the pure part: values in, decisions out, the clock's reading passed in.
No database, no broker; control_plane.rollouts does the reading, writing and notifying.

    membership(rollout, devices, stages)   which stage each targeted device belongs to
    apply_event(progress, event, ...)      one device's state after one of its ota.* reports
    stage_verdict(...)                     pending / passed / failed, with the reasons
    decide(rollout, devices, now)          wait / advance / await_approval / pause /
                                           rollback / complete, and the devices it assigns

Membership: the targeted devices are ranked by sha256(rollout id, device id), so the order is
the same every time and independent of enrolment order; stage k holds the first `size_k` of
them, where `size_k` is the stage's count or ceil(percent × N), never below the previous
stage's size and never above N. A device belongs to the first stage that holds it.

A device's life in a rollout (its own reports, ordered by its (boot, seq)):

    pending ─assign─► assigned ─started/downloaded/staged/switched─► installing
                          │                                          │
                          ├──────────────committed───────────────────┴─► committed
                          └──────────rolled_back / refused───────────────► failed (reason)
    rollback: assigned / installing / committed ─► reverting ─committed─► reverted
                                                             └─rolled_back/refused─► revert_failed

A stage's verdict looks at the devices that stage added:

    failed    more than max_failed failed, more than max_rollbacks rolled back, or the success
              rate can no longer reach min_install_success; once enough reported: success rate
              below min_install_success, mean confidence drop (before − after) over
              max_confidence_drop, mean latency ratio over max_latency_ratio
    pending   fewer than min_devices_reporting × its devices reported (committed or failed),
              or soak_s has not passed since that share was reached; a current stage still
              short of its reports stage_timeout_s after it started fails instead
    passed    otherwise (a stage that adds no device passes at once)

`decide` fails the rollout when any stage reached so far fails (a late report counts), unless
the operator accepted that stage (resume after an automatic pause). A passed last stage
completes the rollout; otherwise the next stage starts, once approved when it asks for it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = [
    "ACTIVE",
    "FAILURE_EVENTS",
    "FIGURES",
    "PROGRESS_EVENTS",
    "Action",
    "Criteria",
    "Decision",
    "DeviceState",
    "OtaEvent",
    "PlanError",
    "Progress",
    "RolloutState",
    "Stage",
    "Status",
    "Target",
    "Verdict",
    "apply_event",
    "check_stages",
    "decide",
    "membership",
    "stage_sizes",
    "stage_verdict",
]

Status = Literal[
    "running", "awaiting_approval", "paused", "rolling_back", "completed", "aborted", "rolled_back"
]
ACTIVE: frozenset[str] = frozenset({"running", "awaiting_approval", "paused", "rolling_back"})
DeviceState = Literal[
    "pending",
    "assigned",
    "installing",
    "committed",
    "failed",
    "reverting",
    "reverted",
    "revert_failed",
]
Action = Literal["wait", "advance", "await_approval", "pause", "rollback", "complete"]
PROGRESS_EVENTS = frozenset({"ota.started", "ota.downloaded", "ota.staged", "ota.switched"})
FAILURE_EVENTS = frozenset({"ota.rolled_back", "ota.refused"})
FIGURES = (
    "canary_agreement",
    "confidence_before",
    "confidence_after",
    "latency_ratio",
    "error_rate",
)
MAX_STAGES = 20
FORWARD: frozenset[str] = frozenset({"assigned", "installing", "committed", "failed"})
REVERT: frozenset[str] = frozenset({"reverting", "reverted", "revert_failed"})


class PlanError(ValueError):
    """A rollout's stages or criteria are not a plan: the message says which and why."""


@dataclass(frozen=True, slots=True)
class Target:
    """What a device is told to install: a TUF target name and its model version."""

    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Stage:
    """`percent` of the targeted devices or `count` of them (exactly one), cumulative."""

    percent: float | None = None
    count: int | None = None
    require_approval: bool = False

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.count is None):
            raise PlanError("a stage is either a percent or a count of devices")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise PlanError(f"a stage's percent must be in (0, 100], not {self.percent}")
        if self.count is not None and self.count < 1:
            raise PlanError(f"a stage's count must be at least 1, not {self.count}")


@dataclass(frozen=True, slots=True)
class Criteria:
    """What a stage must show to pass; None switches a bound off."""

    min_install_success: float = 0.95
    max_failed: int | None = None
    max_rollbacks: int | None = 0
    max_confidence_drop: float | None = 0.1
    max_latency_ratio: float | None = 2.0
    min_devices_reporting: float = 1.0
    soak_s: float = 300.0
    stage_timeout_s: float | None = None  # the reports a stage needs must come within this

    def __post_init__(self) -> None:
        if not 0 <= self.min_install_success <= 1:
            raise PlanError("min_install_success is a share in [0, 1]")
        if not 0 < self.min_devices_reporting <= 1:
            raise PlanError("min_devices_reporting is a share in (0, 1]")
        if self.soak_s < 0:
            raise PlanError("soak_s cannot be negative")
        if self.stage_timeout_s is not None and self.stage_timeout_s <= 0:
            raise PlanError("stage_timeout_s must be positive (or null: no timeout)")


@dataclass(frozen=True, slots=True)
class OtaEvent:
    """One ota.* report of a device, as stored by ingest (`received_at`: control plane's
    clock). `target`/`version` are what the report says it is about."""

    device_id: str
    boot: int
    seq: int
    name: str
    received_at: float
    target: str | None = None
    version: str | None = None
    reason: str | None = None
    figures: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Progress:
    """One device in one rollout. `at`: when `state` was last set (a report's receipt time or
    an assignment); `progressed`: the device reported anything on the new target."""

    device_id: str
    stage: int
    state: DeviceState = "pending"
    last: tuple[int, int] | None = None
    event: str | None = None
    at: float | None = None
    reason: str | None = None
    figures: Mapping[str, float] = field(default_factory=dict)
    progressed: bool = False

    @property
    def reported(self) -> bool:
        return self.state in ("committed", "failed")


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A rollout as `decide` sees it. `stage` is -1 before the first stage starts."""

    status: Status
    stages: tuple[Stage, ...]
    criteria: Criteria = Criteria()
    on_failure: Literal["pause", "rollback"] = "pause"
    stage: int = -1
    approved_through: int = -1
    accepted_through: int = -1
    stage_started_at: float | None = None  # when the current stage assigned its devices


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Literal["pending", "passed", "failed"]
    reasons: tuple[str, ...] = ()
    devices: int = 0
    reported: int = 0
    soak_until: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now: `stage` is the stage after the action, `devices` the devices it
    assigns (advance: the new stage's; rollback: the ones to revert)."""

    action: Action
    stage: int
    reasons: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()


# -- membership ------------------------------------------------------------------------------


def check_stages(stages: Sequence[Stage]) -> None:
    """PlanError unless 1..MAX_STAGES stages whose percents, and whose counts, increase."""
    if not 1 <= len(stages) <= MAX_STAGES:
        raise PlanError(f"a rollout has 1 to {MAX_STAGES} stages, not {len(stages)}")
    percents = [s.percent for s in stages if s.percent is not None]
    counts = [s.count for s in stages if s.count is not None]
    for kind, values in (("percents", percents), ("counts", counts)):
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise PlanError(f"the stages' {kind} must increase from stage to stage")


def stage_sizes(stages: Sequence[Stage], total: int) -> tuple[int, ...]:
    """How many of `total` devices each stage holds, cumulative."""
    sizes: list[int] = []
    for stage in stages:
        if stage.count is not None:
            wanted = stage.count
        else:
            assert stage.percent is not None
            wanted = math.ceil(stage.percent * total / 100 - 1e-9)
        sizes.append(min(total, max(sizes[-1] if sizes else 0, wanted)))
    return tuple(sizes)


def _rank(rollout_id: str, device_id: str) -> bytes:
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()


def membership(
    rollout_id: str,
    devices: Iterable[str],
    stages: Sequence[Stage],
    first: Sequence[str] = (),
) -> dict[str, int]:
    """Each device's stage: the first whose size reaches the device's rank. `first` (canary
    devices, in order) rank ahead of the rest, which rank by hash. A device no stage reaches
    (the last stage below 100 %) is left out."""
    pool = set(devices)
    leaders = list(dict.fromkeys(d for d in first if d in pool))
    rest = sorted(pool - set(leaders), key=lambda d: (_rank(rollout_id, d), d))
    ranked = leaders + rest
    sizes = stage_sizes(stages, len(ranked))
    out: dict[str, int] = {}
    start = 0
    for index, size in enumerate(sizes):
        for device in ranked[start:size]:
            out[device] = index
        start = max(start, size)
    return out


# -- one device ------------------------------------------------------------------------------


def _about(event: OtaEvent, target: Target | None) -> bool:
    return (
        target is not None
        and event.target == target.name
        and (event.version is None or event.version == target.version)
    )


def apply_event(
    progress: Progress, event: OtaEvent, target: Target, previous: Target | None = None
) -> Progress:
    """The device's progress after `event`; unchanged when the event is older than the last
    one applied, about another target, or not one this state moves on."""
    key = (event.boot, event.seq)
    if progress.last is not None and key <= progress.last:
        return progress
    if progress.state in FORWARD and _about(event, target):
        new: DeviceState
        if event.name in PROGRESS_EVENTS:
            if progress.state not in ("assigned", "installing"):
                return replace(progress, last=key)
            new = "installing"
        elif event.name == "ota.committed":
            new = "committed"
        elif event.name in FAILURE_EVENTS:
            new = "failed"
        else:
            return progress
        return replace(
            progress,
            state=new,
            last=key,
            event=event.name,
            at=event.received_at,
            reason=event.reason if new == "failed" else None,
            figures=dict(event.figures) if new == "committed" else {},
            progressed=True,
        )
    if progress.state in REVERT and _about(event, previous):
        if event.name == "ota.committed":
            state: DeviceState = "reverted"
        elif event.name in FAILURE_EVENTS:
            state = "revert_failed"
        elif event.name in PROGRESS_EVENTS:
            return replace(progress, last=key, event=event.name, at=event.received_at)
        else:
            return progress
        reason = event.reason if state == "revert_failed" else progress.reason
        return replace(
            progress, state=state, last=key, event=event.name, at=event.received_at, reason=reason
        )
    return progress


# -- one stage -------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def stage_verdict(cohort: Sequence[Progress], criteria: Criteria, now: float) -> Verdict:
    """The verdict on the devices one stage added (module docstring)."""
    n = len(cohort)
    if n == 0:
        return Verdict("passed", ("the stage adds no device",))
    failed = [p for p in cohort if p.state == "failed"]
    committed = [p for p in cohort if p.state == "committed"]
    rollbacks = sum(1 for p in failed if p.event == "ota.rolled_back")
    reported = len(failed) + len(committed)
    reasons: list[str] = []
    if criteria.max_failed is not None and len(failed) > criteria.max_failed:
        reasons.append(f"{len(failed)} of {n} devices failed (at most {criteria.max_failed})")
    if criteria.max_rollbacks is not None and rollbacks > criteria.max_rollbacks:
        reasons.append(f"{rollbacks} of {n} devices rolled back (at most {criteria.max_rollbacks})")
    if (n - len(failed)) / n < criteria.min_install_success:
        reasons.append(
            f"install success cannot reach {criteria.min_install_success:.0%}: "
            f"{len(failed)} of {n} devices failed"
        )
    quorum = max(1, math.ceil(criteria.min_devices_reporting * n - 1e-9))
    if not reasons and reported >= quorum:
        rate = len(committed) / reported
        if rate < criteria.min_install_success:
            reasons.append(
                f"install success {rate:.0%} is below {criteria.min_install_success:.0%}"
            )
        drops = [
            p.figures["confidence_before"] - p.figures["confidence_after"]
            for p in committed
            if "confidence_before" in p.figures and "confidence_after" in p.figures
        ]
        drop = _mean(drops)
        if (
            drop is not None
            and criteria.max_confidence_drop is not None
            and drop > criteria.max_confidence_drop
        ):
            reasons.append(
                f"mean confidence dropped by {drop:.3f} (at most {criteria.max_confidence_drop})"
            )
        ratio = _mean(
            [p.figures["latency_ratio"] for p in committed if "latency_ratio" in p.figures]
        )
        if (
            ratio is not None
            and criteria.max_latency_ratio is not None
            and ratio > criteria.max_latency_ratio
        ):
            reasons.append(f"mean latency ratio {ratio:.2f} is over {criteria.max_latency_ratio}")
    if reasons:
        return Verdict("failed", tuple(reasons), n, reported)
    if reported < quorum:
        return Verdict("pending", (f"{reported} of {quorum} needed devices reported",), n, reported)
    times = sorted(p.at if p.at is not None else now for p in cohort if p.reported)
    soak_until = times[quorum - 1] + criteria.soak_s
    if now < soak_until:
        wait = (f"soaking for {criteria.soak_s:g} s, until {soak_until:.0f} (Unix s)",)
        return Verdict("pending", wait, n, reported, soak_until)
    return Verdict("passed", (), n, reported, soak_until)


# -- the rollout -----------------------------------------------------------------------------


def _cohorts(devices: Sequence[Progress], stages: int) -> list[list[Progress]]:
    cohorts: list[list[Progress]] = [[] for _ in range(stages)]
    for progress in devices:
        if 0 <= progress.stage < stages:
            cohorts[progress.stage].append(progress)
    return cohorts


def _timed_out(verdict: Verdict, rollout: RolloutState, now: float, *, current: bool) -> Verdict:
    """The current stage still short of its reports `stage_timeout_s` after it started fails
    (a soaking stage has its reports and only waits)."""
    timeout, started = rollout.criteria.stage_timeout_s, rollout.stage_started_at
    if (
        not current
        or verdict.status != "pending"
        or verdict.soak_until is not None
        or timeout is None
        or started is None
        or now - started < timeout
    ):
        return verdict
    reason = (
        f"only {verdict.reported} of {verdict.devices} devices reported within the "
        f"{timeout:g} s stage timeout"
    )
    return Verdict("failed", (reason,), verdict.devices, verdict.reported)


def decide(rollout: RolloutState, devices: Sequence[Progress], now: float) -> Decision:
    """The next action for `rollout` given its devices' progress, at `now`."""
    stage = rollout.stage
    if rollout.status == "rolling_back":
        outstanding = [p for p in devices if p.state == "reverting" and p.progressed]
        if outstanding:
            return Decision("wait", stage, (f"{len(outstanding)} devices still reverting",))
        return Decision("complete", stage, ("every updated device reported its revert",))
    if rollout.status not in ("running", "awaiting_approval"):
        return Decision("wait", stage, ())
    cohorts = _cohorts(devices, len(rollout.stages))
    current: Verdict | None = None
    for index in range(stage + 1):
        if index <= rollout.accepted_through:
            if index == stage:
                current = Verdict("passed", ("accepted by an operator",))
            continue
        verdict = stage_verdict(cohorts[index], rollout.criteria, now)
        verdict = _timed_out(verdict, rollout, now, current=index == stage)
        if verdict.status == "failed":
            reasons = tuple(f"stage {index + 1}: {r}" for r in verdict.reasons)
            if rollout.on_failure == "rollback":
                revert = tuple(
                    sorted(
                        p.device_id
                        for p in devices
                        if p.state in ("assigned", "installing", "committed")
                    )
                )
                return Decision("rollback", stage, reasons, revert)
            return Decision("pause", stage, reasons)
        if index == stage:
            current = verdict
    if current is not None and current.status == "pending":
        return Decision("wait", stage, tuple(f"stage {stage + 1}: {r}" for r in current.reasons))
    if stage + 1 >= len(rollout.stages):
        return Decision("complete", stage, (f"stage {stage + 1} of {len(rollout.stages)} passed",))
    following = stage + 1
    if rollout.stages[following].require_approval and rollout.approved_through < following:
        return Decision(
            "await_approval", stage, (f"stage {following + 1} waits for an operator's approval",)
        )
    assign = tuple(sorted(p.device_id for p in cohorts[following] if p.state == "pending"))
    return Decision("advance", following, (f"stage {following + 1} starts",), assign)
