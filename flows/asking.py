"""`validate.on_block: ask`: a blocked run pauses and waits for a person's decision, typed in the
Prefect UI's Resume form (or sent by `convflow decide`, which calls the same API). Approved, the run
goes on; rejected, or with no decision within `validate.ask_timeout`, it ends as under `fail`.

The run pauses in place (Prefect's pause_flow_run): its process, and the worker slot of a work-pool
run, wait with it, and a decision resumes it where it stopped, with no stage run again.
"""

from __future__ import annotations

import threading
from typing import Literal

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from convflow.core.records import Decision

# How often the paused run asks the server whether it was resumed: a decision takes effect within this.
POLL_SECONDS = 5
# How much longer the server keeps the pause open than the run waits (see ask_a_person).
SERVER_GRACE_SECONDS = 120


class BlockedRunDecision(RunInput):
    """The Resume form of a blocked run: the UI draws a field for each of these."""

    approve: bool = Field(
        False, description="Switch on to go on despite the blocking checks (train, or promote); leave off to reject."
    )
    reason: str = Field(min_length=1, description="Why: kept in the run's catalog row and its report.")


def ask_a_person(
    about: Literal["data checks", "model gate"], reasons: list[str], figures: str, timeout: float
) -> Decision:
    """Pause the flow run until a person approves or rejects it (BlockedRunDecision), or `timeout`
    seconds pass; their answer, or a rejection that says no decision came."""
    form = BlockedRunDecision.with_initial_data(description=_form_description(about, reasons, figures))
    get_run_logger().warning(_waiting_message(about, timeout))
    no_answer = f"no decision within ask_timeout {timeout:g} s"
    with _RejectWhenDue(flow_run.id, timeout, no_answer) as deadline:
        try:
            # The server's own deadline comes later than ours: a pause it let expire could no longer
            # end in any state but Failed. A key per question: a run asked about its data, then
            # about its model, pauses twice.
            answer = pause_flow_run(
                wait_for_input=form,
                timeout=int(timeout) + SERVER_GRACE_SECONDS,
                poll_interval=POLL_SECONDS,
                key=about.replace(" ", "-"),
            )
        except FlowPauseTimeout:  # not even our own rejection reached the server
            return Decision(about=about, approved=False, reason=no_answer, timed_out=True)
    return Decision(about=about, approved=answer.approve, reason=answer.reason, timed_out=deadline.rejected)


class _RejectWhenDue:
    """At the deadline, reject the paused run through the API a person's answer takes, unless one
    came first: the pause then ends as a rejection does, the UI shows why, and the run ends Blocked."""

    def __init__(self, flow_run_id: str, timeout: float, reason: str):
        self._flow_run_id, self._reason = flow_run_id, reason
        self._timer = threading.Timer(timeout, self._reject)
        self._timer.daemon = True
        self.rejected = False

    def __enter__(self) -> _RejectWhenDue:
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._timer.cancel()

    def _reject(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            result = client.resume_flow_run(self._flow_run_id, run_input={"approve": False, "reason": self._reason})
        # Refused when a person's answer already resumed the run: theirs stands.
        self.rejected = result.status.value == "ACCEPT"


def _form_description(about: str, reasons: list[str], figures: str) -> str:
    """Markdown shown above the form: what blocked the run and where its figures are."""
    listed = "\n".join(f"- {reason}" for reason in reasons[:10])
    more = f"\n- ... and {len(reasons) - 10} more" if len(reasons) > 10 else ""
    return (
        f"**The {about} blocked this run.**\n\n{listed}{more}\n\n"
        f"The figures: `{figures}`\n\n"
        "Approve to go on (the data: train; the model: promote it), or reject to end the run blocked. "
        "Either way, give a reason: it is kept in the catalog and the report."
    )


def _waiting_message(about: str, timeout: float) -> str:
    from prefect.settings import get_current_settings

    ui_url = get_current_settings().ui_url or ""
    return (
        f"the {about} blocked this run; waiting up to {timeout:g} s for a decision: Resume it in the Prefect UI "
        f"({ui_url}/runs/flow-run/{flow_run.id}), or run `convflow decide {flow_run.id} --approve|--reject "
        '--reason "..."`'
    )
