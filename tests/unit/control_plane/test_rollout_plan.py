"""The rollout plan: stage membership, device progress from ota.* reports, stage verdicts and
the next action, all on values and a passed-in clock."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from control_plane.rollout_plan import (
    Criteria,
    OtaEvent,
    PlanError,
    Progress,
    RolloutState,
    Stage,
    Target,
    apply_event,
    check_stages,
    decide,
    membership,
    stage_sizes,
    stage_verdict,
)

NEW = Target("models/digits/1.3.0.edb", "1.3.0")
OLD = Target("models/digits/1.2.0.edb", "1.2.0")
STAGES = (Stage(count=1), Stage(percent=10), Stage(percent=50), Stage(percent=100))
FAST = Criteria(soak_s=10, max_rollbacks=0)


def _devices(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


def _event(device: str, seq: int, name: str, at: float = 100.0, **extra: object) -> OtaEvent:
    return OtaEvent(device, 1, seq, name, at, NEW.name, NEW.version, **extra)  # type: ignore[arg-type]


def _fleet(states: dict[str, int], state: str = "pending", at: float = 0.0) -> list[Progress]:
    return [Progress(d, s, state, at=at) for d, s in states.items()]  # type: ignore[arg-type]


# -- membership ------------------------------------------------------------------------------


def test_stage_sizes_are_cumulative_capped_and_never_shrink() -> None:
    """Counts and percents give cumulative sizes: ceil of the share, at most N, monotone."""
    assert stage_sizes(STAGES, 1000) == (1, 100, 500, 1000)
    assert stage_sizes(STAGES, 10) == (1, 1, 5, 10)
    assert stage_sizes(STAGES, 3) == (1, 1, 2, 3)
    assert stage_sizes((Stage(count=50), Stage(percent=10)), 100) == (50, 50)
    assert stage_sizes((Stage(count=5),), 2) == (2,)


def test_membership_is_deterministic_and_proportional() -> None:
    """The same rollout and devices give the same stages in any order; sizes follow the plan."""
    devices = _devices(1000)
    first = membership("r1", devices, STAGES)
    again = membership("r1", list(reversed(devices)), STAGES)
    assert first == again
    per_stage = Counter(first.values())
    assert [per_stage[i] for i in range(4)] == [1, 99, 400, 500]


def test_membership_differs_between_rollouts_and_is_stable_as_the_fleet_grows() -> None:
    """Another rollout draws another first device; one more device moves at most one device
    out of each stage's cumulative set."""
    devices = _devices(200)
    a = membership("rollout-a", devices, STAGES)
    b = membership("rollout-b", devices, STAGES)
    assert [d for d, s in a.items() if s == 0] != [d for d, s in b.items() if s == 0]
    grown = membership("rollout-a", [*devices, "dev-new"], STAGES)
    for stage in range(4):
        before = {d for d, s in a.items() if s <= stage}
        after = {d for d, s in grown.items() if s <= stage}
        assert len(before - after) <= 1


def test_a_last_stage_below_100_percent_leaves_devices_out() -> None:
    """Devices no stage reaches are not in the rollout at all."""
    members = membership("r", _devices(10), (Stage(count=1), Stage(percent=50)))
    assert len(members) == 5


def test_stages_that_do_not_increase_are_refused() -> None:
    """Percents and counts must grow; a stage is a percent or a count, in bounds."""
    check_stages(STAGES)
    with pytest.raises(PlanError, match="percents must increase"):
        check_stages((Stage(percent=50), Stage(percent=10)))
    with pytest.raises(PlanError, match="counts must increase"):
        check_stages((Stage(count=2), Stage(count=2)))
    with pytest.raises(PlanError, match="1 to 20 stages"):
        check_stages(())
    with pytest.raises(PlanError, match="either a percent or a count"):
        Stage(percent=10, count=1)
    with pytest.raises(PlanError, match=r"\(0, 100\]"):
        Stage(percent=0)


# -- device progress -------------------------------------------------------------------------


def test_reports_move_a_device_through_install_to_committed() -> None:
    """started → installing, committed → committed with its figures; older reports are
    ignored by (boot, seq)."""
    p = Progress("dev-a", 0, "assigned")
    p = apply_event(p, _event("dev-a", 1, "ota.started"), NEW)
    assert p.state == "installing" and p.progressed
    figures = {"confidence_before": 0.9, "confidence_after": 0.88, "latency_ratio": 1.1}
    p = apply_event(p, _event("dev-a", 3, "ota.committed", at=120, figures=figures), NEW)
    assert (p.state, p.at, dict(p.figures)) == ("committed", 120, figures)
    late = apply_event(p, _event("dev-a", 2, "ota.switched"), NEW)
    assert late == p


def test_rolled_back_and_refused_count_as_failed_with_the_reason() -> None:
    """Both failure reports leave the device failed and keep why."""
    for name in ("ota.rolled_back", "ota.refused"):
        p = apply_event(
            Progress("dev-a", 0, "installing", last=(1, 1)),
            _event("dev-a", 2, name, reason="canaries disagree"),
            NEW,
        )
        assert (p.state, p.event, p.reason) == ("failed", name, "canaries disagree")


def test_reports_about_another_target_or_before_assignment_change_nothing() -> None:
    """A report naming another target, or for a device not yet assigned, is not counted."""
    other = OtaEvent("dev-a", 1, 5, "ota.committed", 1.0, OLD.name, OLD.version)
    assert apply_event(Progress("dev-a", 0, "assigned"), other, NEW).state == "assigned"
    pending = Progress("dev-a", 0)
    assert apply_event(pending, _event("dev-a", 1, "ota.committed"), NEW) == pending


def test_a_reverting_device_follows_its_reports_on_the_previous_target() -> None:
    """During a rollback the previous target's committed report means reverted."""
    p = Progress("dev-a", 0, "reverting", last=(1, 4), progressed=True)
    back = OtaEvent("dev-a", 1, 5, "ota.committed", 9.0, OLD.name, OLD.version)
    assert apply_event(p, back, NEW, OLD).state == "reverted"
    refused = OtaEvent("dev-a", 1, 5, "ota.refused", 9.0, OLD.name, OLD.version, reason="x")
    assert apply_event(p, refused, NEW, OLD).state == "revert_failed"
    assert apply_event(p, _event("dev-a", 6, "ota.committed"), NEW, OLD).state == "reverting"


# -- stage verdicts --------------------------------------------------------------------------


def _cohort(committed: int, failed: int = 0, pending: int = 0, at: float = 100.0) -> list[Progress]:
    out = [Progress(f"c{i}", 0, "committed", at=at) for i in range(committed)]
    out += [
        Progress(f"f{i}", 0, "failed", event="ota.refused", at=at, reason="timeout")
        for i in range(failed)
    ]
    out += [Progress(f"p{i}", 0, "assigned") for i in range(pending)]
    return out


def test_a_stage_waits_for_its_devices_then_for_the_soak() -> None:
    """Not enough reports → pending; enough → pending until soak_s after the quorum; then
    passed."""
    criteria = Criteria(soak_s=60, min_devices_reporting=0.8, min_install_success=0.5)
    assert stage_verdict(_cohort(3, pending=2), criteria, 1000).status == "pending"
    soaking = stage_verdict(_cohort(4, pending=1, at=100), criteria, 130)
    assert soaking.status == "pending" and soaking.soak_until == 160
    assert stage_verdict(_cohort(4, pending=1, at=100), criteria, 160).status == "passed"


def test_a_stage_fails_early_when_its_bounds_are_already_broken() -> None:
    """max_failed, max_rollbacks, and a success rate that can no longer be met fail the stage
    before everyone reported."""
    criteria = Criteria(min_install_success=0.5, max_failed=1, max_rollbacks=None, soak_s=0)
    broken = stage_verdict(_cohort(0, failed=2, pending=8), criteria, 0)
    assert broken.status == "failed" and "2 of 10 devices failed (at most 1)" in broken.reasons
    rollback = [Progress("r", 0, "failed", event="ota.rolled_back", at=1.0)]
    verdict = stage_verdict([*rollback, *_cohort(0, pending=9)], Criteria(max_rollbacks=0), 0)
    assert verdict.status == "failed" and "rolled back" in verdict.reasons[0]
    unreachable = stage_verdict(_cohort(1, failed=1, pending=1), Criteria(soak_s=0), 0)
    assert unreachable.status == "failed" and "cannot reach 95%" in unreachable.reasons[0]


def test_behaviour_on_the_devices_fails_a_stage() -> None:
    """Once reported, a mean confidence drop or latency ratio over the bounds fails it."""
    slow = [
        replace(p, figures={"confidence_before": 0.9, "confidence_after": 0.6, "latency_ratio": 3})
        for p in _cohort(4)
    ]
    verdict = stage_verdict(slow, Criteria(soak_s=0), 1000)
    assert verdict.status == "failed"
    assert any("confidence dropped by 0.300" in r for r in verdict.reasons)
    assert any("latency ratio 3.00" in r for r in verdict.reasons)
    lenient = Criteria(soak_s=0, max_confidence_drop=None, max_latency_ratio=None)
    assert stage_verdict(slow, lenient, 1000).status == "passed"


def test_a_stage_without_new_devices_passes() -> None:
    """A stage whose size equals the previous one's adds nobody and passes at once."""
    assert stage_verdict([], Criteria(), 0).status == "passed"


# -- decisions -------------------------------------------------------------------------------


def _rollout(**kw: object) -> RolloutState:
    base = RolloutState(status="running", stages=STAGES, criteria=FAST)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_a_new_rollout_assigns_its_first_stage() -> None:
    """Before stage 1 the decision is to advance, assigning exactly the stage-1 devices."""
    members = membership("r", _devices(20), STAGES)
    decision = decide(_rollout(), _fleet(members), 0)
    assert decision.action == "advance" and decision.stage == 0
    assert decision.devices == tuple(d for d, s in members.items() if s == 0)


def test_a_rollout_advances_only_on_a_passed_stage_and_completes_after_the_last() -> None:
    """Stage by stage: wait while devices report and soak, advance, and complete at the end."""
    members = membership("r", _devices(20), STAGES)
    rollout = _rollout(stage=0)
    fleet = [
        replace(p, state="assigned") if p.stage == 0 else p for p in _fleet(members)
    ]  # fmt: skip
    assert decide(rollout, fleet, 50).action == "wait"
    done = [replace(p, state="committed", at=50) if p.stage == 0 else p for p in fleet]
    assert decide(rollout, done, 55).reasons == ("stage 1: soaking for 10 s, until 60 (Unix s)",)
    advance = decide(rollout, done, 60)
    assert advance.action == "advance" and advance.stage == 1
    assert set(advance.devices) == {d for d, s in members.items() if s == 1}
    finished = [replace(p, state="committed", at=60) for p in fleet]
    assert decide(_rollout(stage=3), finished, 70).action == "complete"


def test_a_failure_pauses_by_default_and_rolls_back_when_asked() -> None:
    """A failed stage → pause; with on_failure rollback → rollback of every updated device."""
    members = membership("r", _devices(20), STAGES)
    fleet = [
        replace(p, state="failed", event="ota.rolled_back", at=5.0, reason="crash loop")
        if p.stage == 0
        else replace(p, state="committed", at=5.0)
        if p.stage == 1
        else p
        for p in _fleet(members)
    ]
    paused = decide(_rollout(stage=1), fleet, 100)
    assert paused.action == "pause"
    assert paused.reasons[0].startswith("stage 1: 1 of 1 devices rolled back")
    rollback = decide(_rollout(stage=1, on_failure="rollback"), fleet, 100)
    assert rollback.action == "rollback"
    assert set(rollback.devices) == {d for d, s in members.items() if s == 1}


def test_a_stage_short_of_its_reports_past_its_timeout_fails() -> None:
    """stage_timeout_s: a stage whose devices have not reported 1 h after it started fails
    (pause, or rollback when asked), naming how many reported; before the timeout it waits,
    a soaking stage (its reports in) is not failed by it, and without one it waits for ever.
    Before, a stage whose devices never reported held the rollout for ever."""
    members = membership("r", _devices(20), STAGES)
    timed = replace(FAST, stage_timeout_s=3600.0)
    fleet = [replace(p, state="assigned") if p.stage == 0 else p for p in _fleet(members)]

    def at_stage_0(criteria: Criteria, **extra: object) -> RolloutState:
        return replace(_rollout(stage=0, **extra), criteria=criteria, stage_started_at=1000.0)

    assert decide(at_stage_0(timed), fleet, 1000.0 + 3599).action == "wait"
    late = decide(at_stage_0(timed), fleet, 1000.0 + 3600)
    assert late.action == "pause"
    assert late.reasons == (
        "stage 1: only 0 of 1 devices reported within the 3600 s stage timeout",
    )
    assert decide(at_stage_0(timed, on_failure="rollback"), fleet, 9999).action == "rollback"
    assert decide(at_stage_0(FAST), fleet, 1e9).action == "wait"
    soaking = [replace(p, state="committed", at=4590.0) if p.stage == 0 else p for p in fleet]
    assert decide(at_stage_0(timed), soaking, 4595.0).action == "wait"
    with pytest.raises(PlanError, match="stage_timeout_s must be positive"):
        Criteria(stage_timeout_s=0)


def test_a_late_failure_in_an_earlier_stage_still_counts() -> None:
    """A stage that passed fails the rollout when one of its devices reports a failure later."""
    members = membership("r", _devices(20), STAGES)
    fleet = [replace(p, state="committed", at=1.0) if p.stage <= 1 else p for p in _fleet(members)]
    first = next(i for i, p in enumerate(fleet) if p.stage == 0)
    fleet[first] = replace(fleet[first], state="failed", event="ota.refused", reason="expired")
    assert decide(_rollout(stage=2), fleet, 100).action == "pause"


def test_approval_gates_hold_a_stage_until_approved() -> None:
    """A stage that requires approval is not started until approved_through reaches it."""
    gated = (Stage(count=1), Stage(percent=100, require_approval=True))
    members = membership("r", _devices(5), gated)
    fleet = [replace(p, state="committed", at=0.0) if p.stage == 0 else p for p in _fleet(members)]
    rollout = _rollout(stages=gated, stage=0)
    held = decide(rollout, fleet, 100)
    assert held.action == "await_approval"
    assert held.reasons == ("stage 2 waits for an operator's approval",)
    assert decide(replace(rollout, status="awaiting_approval"), fleet, 100).action == (
        "await_approval"
    )
    approved = decide(replace(rollout, approved_through=1), fleet, 100)
    assert approved.action == "advance" and len(approved.devices) == 4
    first_gated = decide(_rollout(stages=(Stage(count=1, require_approval=True),)), fleet, 0)
    assert first_gated.action == "await_approval"


def test_an_accepted_stage_counts_as_passed() -> None:
    """After an operator resumes an automatically paused stage, its failures no longer stop it."""
    members = membership("r", _devices(20), STAGES)
    fleet = [
        replace(p, state="failed", event="ota.rolled_back", at=1.0) if p.stage == 0 else p
        for p in _fleet(members)
    ]
    assert decide(_rollout(stage=0), fleet, 100).action == "pause"
    assert decide(_rollout(stage=0, accepted_through=0), fleet, 100).action == "advance"


def test_paused_and_finished_rollouts_do_nothing() -> None:
    """Paused, completed, aborted and rolled back rollouts only wait."""
    fleet = _fleet(membership("r", _devices(5), STAGES))
    for status in ("paused", "completed", "aborted", "rolled_back"):
        assert decide(_rollout(status=status), fleet, 0).action == "wait"


def test_a_rollback_completes_once_every_updated_device_reverted() -> None:
    """Rolling back waits for the devices that took the new target; untouched ones don't
    hold it."""
    fleet = [
        Progress("a", 0, "reverting", progressed=True),
        Progress("b", 0, "reverting", progressed=False),
        Progress("c", 1, "failed"),
    ]
    rollout = _rollout(status="rolling_back", stage=1)
    assert decide(rollout, fleet, 0).action == "wait"
    fleet[0] = replace(fleet[0], state="reverted")
    assert decide(rollout, fleet, 0).action == "complete"


def test_canary_devices_go_first_in_their_order() -> None:
    """Named canaries fill the first stages in the order given; unknown names are ignored."""
    devices = [f"dev-{i:02d}" for i in range(10)]
    stages = [Stage(None, 1), Stage(None, 2), Stage(100.0, None)]
    members = membership("r-canary", devices, stages, ["dev-07", "dev-nope", "dev-03"])
    assert members["dev-07"] == 0 and members["dev-03"] == 1
    assert sorted(members) == devices and sum(1 for s in members.values() if s == 1) == 1
