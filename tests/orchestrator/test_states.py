"""The status transition table, one rule per case."""

from __future__ import annotations

import pytest

from orchestrator.states import TERMINAL, InvalidTransition, Status, check_transition

ALLOWED_BOTH = [
    (Status.queued, Status.running),
    (Status.queued, Status.cancelled),
    (Status.running, Status.succeeded),
    (Status.running, Status.failed),
    (Status.running, Status.cancelled),
    (Status.failed, Status.queued),
    (Status.cancelled, Status.queued),
]


@pytest.mark.parametrize("entity", ["job", "stage_run"])
@pytest.mark.parametrize(("current", "new"), ALLOWED_BOTH)
def test_allowed_transition_passes(entity, current, new):
    check_transition(entity, current, new)


@pytest.mark.parametrize("entity", ["job", "stage_run"])
@pytest.mark.parametrize(
    ("current", "new"),
    [
        (Status.running, Status.running),
        (Status.running, Status.queued),
        (Status.queued, Status.succeeded),
        (Status.queued, Status.failed),
        (Status.failed, Status.running),
        (Status.cancelled, Status.succeeded),
    ],
)
def test_forbidden_transition_raises(entity, current, new):
    with pytest.raises(InvalidTransition):
        check_transition(entity, current, new)


def test_succeeded_stage_run_may_be_requeued():
    check_transition("stage_run", Status.succeeded, Status.queued)


def test_succeeded_job_is_final():
    with pytest.raises(InvalidTransition, match="allowed from 'succeeded': none"):
        check_transition("job", Status.succeeded, Status.queued, ident="j1")


def test_invalid_transition_message_names_entity_states_and_allowed_targets():
    with pytest.raises(InvalidTransition) as info:
        check_transition("stage_run", "queued", "failed", ident="s1")
    assert str(info.value) == (
        "stage_run s1: cannot move from 'queued' to 'failed'; allowed from 'queued': cancelled, running, skipped"
    )
    assert (info.value.current, info.value.new) == (Status.queued, Status.failed)


def test_invalid_transition_is_a_value_error():
    assert issubclass(InvalidTransition, ValueError)


def test_statuses_are_plain_strings():
    assert Status("running") is Status.running
    assert Status.running == "running"
    assert {s.value for s in Status} == {"queued", "running", "succeeded", "failed", "cancelled", "skipped"}


def test_only_stage_runs_are_skipped_and_a_skipped_stage_can_run_again():
    check_transition("stage_run", "queued", "skipped")
    check_transition("stage_run", "skipped", "queued")
    with pytest.raises(InvalidTransition):
        check_transition("job", "queued", "skipped")


def test_terminal_statuses():
    assert frozenset({Status.succeeded, Status.failed, Status.cancelled, Status.skipped}) == TERMINAL
    assert Status.failed.is_terminal and not Status.queued.is_terminal
