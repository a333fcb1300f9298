"""Series completion: a series is complete after a quiet period with no new instance.

DIMSE has no "end of series" message (a C-STORE association may carry part of a series, or several
series), so the node waits until a series has received nothing for ``quiet_seconds`` (the rule's,
else ``NNUNET_NODE_SERIES_QUIET_S``), then routes it: every rule that matches makes one job.

State is in the database, so a restart in the middle of a quiet period changes nothing:

- ``Series.last_received_at`` is bumped by every ingest; ``Series.completion_handled_at`` is set to
  the ``last_received_at`` that routing handled. A series is unhandled while
  ``completion_handled_at < last_received_at``: later instances make it complete again.
- A rule has fired for the current arrival when one of its jobs (``Job.route_name``) for this
  series was created after ``last_received_at``; so a crash between creating the job and marking
  the series handled does not make a second job.
- For a later arrival, a rule with ``rerun: true`` (the default) runs again and marks its earlier
  jobs superseded; with ``rerun: false`` the earlier job stands.
- An arrival that changed nothing (every instance it brought was already held byte for byte:
  ``Series.content_changed_at`` did not move, storage/archive.py) does not run a rule again
  while a queued, running or done job of that rule, for the same models, was made after the
  series last changed: that job already covers exactly this content. After a failed or
  cancelled job, or for other models, it runs again (re-sending a series is how a PACS user
  retries).
- A job's source is the path of the arrival that completed the series (``Series.last_source``:
  a series sent by C-STORE and re-sent by STOW-RS makes a ``stow`` job the second time).

Series of our own results (instances with source ``job``) never trigger rules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from nnunet_node.core.clock import utcnow
from nnunet_node.core.errors import ClientError, NodeError
from nnunet_node.core.logging import LoopFailures
from nnunet_node.pipeline.routing import Route, RoutingTable, series_attributes
from nnunet_node.storage.arrivals import (
    SeriesArrival,
    first_instance,
    mark_handled,
    unhandled_series,
    unhandled_series_newest,
)
from nnunet_node.storage.jobs import JobStore, SeriesJob
from nnunet_node.storage.models import JobStatus

LOGGER = logging.getLogger(__name__)

TRIGGER_SOURCES = ("dimse", "stow")
"""Instance sources that make a series routable; ``job`` (our results) and ``import`` do not."""
SUPERSEDABLE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE)
COVERING = SUPERSEDABLE
"""Statuses of a job that covers its series' content: an unchanged arrival leaves it standing."""

Submit = Callable[..., str]
Supersede = Callable[[str, str], Any]


@dataclass(frozen=True)
class WaitingSeries:
    """A series not yet routed since its last arrival: the rules it matches and when each fires
    (``last_received_at`` plus the rule's quiet period, UTC)."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_description: str
    calling_ae: str
    instances: int
    last_received_at: datetime
    rules: tuple[tuple[str, datetime], ...]


def _arrival_source(series: SeriesArrival, first_source: str) -> str:
    """The source of the job a series' arrival makes: how its last instance came (``dimse``,
    ``stow``), else (rows from before migration 0007) how its first did."""
    return series.last_source if series.last_source in TRIGGER_SOURCES else first_source


def _requested_models(request: dict[str, Any]) -> tuple[str, ...]:
    models = request.get("nnunet_id")
    return (models,) if isinstance(models, str) else tuple(map(str, models or ()))


def _covering_job(jobs: list[SeriesJob], route: Route, series: SeriesArrival) -> SeriesJob | None:
    """The newest job of ``route`` that already covers the series' current content: queued,
    running or done, for the models the rule names now, made at or after the series last
    changed. None when the arrival must make a job."""
    models = _requested_models(route.request())
    for job in reversed(jobs):
        if (
            job.status in COVERING
            and job.requested_models == models
            and job.created_at >= series.changed_at
        ):
            return job
    return None


class CompletionWatcher:
    """Routes complete series: ``check()`` does one pass, ``start()`` runs passes in a thread."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        archive_dir: Path,
        routing: RoutingTable,
        *,
        submit: Submit,
        supersede: Supersede,
        default_quiet_s: float,
        poll_s: float | None = None,
    ) -> None:
        self._sessions = session_factory
        self._jobs = JobStore(session_factory)
        self._archive_dir = archive_dir
        self._routing = routing
        self._submit = submit
        self._supersede = supersede
        self._default_quiet_s = default_quiet_s
        quiet = [r.quiet_period(default_quiet_s) for r in routing.routes] or [default_quiet_s]
        self._min_quiet_s = min(quiet)
        self._poll_s = poll_s if poll_s is not None else max(0.1, min(1.0, self._min_quiet_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- one pass ------------------------------------------------------------------------
    def check(self, now: datetime | None = None) -> list[str]:
        """Route every series that is complete at ``now``; return the ids of the jobs made."""
        now = now or utcnow()
        made: list[str] = []
        for candidate in self._candidates(now):
            try:
                made.extend(self._handle(candidate, now))
            except Exception:
                # Left unhandled: the next pass tries again (a locked database, a full disk).
                LOGGER.exception("series %s: routing failed; will try again", candidate.uid)
        return made

    def _candidates(self, now: datetime) -> list[SeriesArrival]:
        horizon = now - timedelta(seconds=self._min_quiet_s)
        return unhandled_series(self._sessions, received_before=horizon)

    def _handle(self, series: SeriesArrival, now: datetime) -> list[str]:
        source, header = self._first_instance(series)
        made: list[str] = []
        waiting = False
        if source in TRIGGER_SOURCES and header is not None:
            attributes = series_attributes(
                header,
                called_ae=series.called_ae,
                calling_ae=series.calling_ae,
                keywords=self._routing.match_keywords(),
            )
            for route in self._routing.matching(attributes):
                quiet = route.quiet_period(self._default_quiet_s)
                if series.last_received_at > now - timedelta(seconds=quiet):
                    waiting = True  # this rule's quiet period is longer: come back later
                    continue
                job_id = self._fire(route, series, _arrival_source(series, source))
                if job_id:
                    made.append(job_id)
        if not waiting:
            self._mark_handled(series)
        return made

    def _first_instance(self, series: SeriesArrival) -> tuple[str, pydicom.Dataset | None]:
        """The source of the series' first instance and its header (no pixels)."""
        first = first_instance(self._sessions, series.pk)
        if first is None:
            return "", None
        source, rel_path = first.source, first.path
        if source not in TRIGGER_SOURCES:
            return source, None
        try:
            header = pydicom.dcmread(self._archive_dir / rel_path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            LOGGER.error("series %s: cannot read %s: %s", series.uid, rel_path, exc)
            return source, None
        return source, header

    def _fire(self, route: Route, series: SeriesArrival, source: str) -> str | None:
        earlier: list[tuple[str, JobStatus]] = []
        jobs = self._jobs.jobs_reading_series(
            series.uid, route_name=route.name, study_instance_uid=series.study_uid
        )
        for job in jobs:
            if job.created_at >= series.last_received_at:
                return None  # already fired for this arrival (a crash before marking handled)
            earlier.append((job.id, job.status))
        if earlier and not route.rerun:
            LOGGER.info(
                "series %s: more instances; rule %s does not run again", series.uid, route.name
            )
            return None
        standing = _covering_job(jobs, route, series)
        if standing is not None:
            LOGGER.info(
                "series %s: re-sent unchanged; job %s (%s) of rule %s stands, no new job",
                series.uid,
                standing.id,
                standing.status.value,
                route.name,
            )
            return None
        try:
            job_id = self._submit(
                route.request(), source=source, series_uids=[series.uid], route_name=route.name
            )
        except ClientError as exc:
            # The rule cannot make a valid job for this series; trying again will not help.
            LOGGER.error("series %s: rule %s made no job: %s", series.uid, route.name, exc)
            return None
        LOGGER.info("series %s complete: rule %s queued job %s", series.uid, route.name, job_id)
        for old_id, status in earlier:
            if status in SUPERSEDABLE:
                try:
                    self._supersede(old_id, job_id)
                except NodeError as exc:
                    LOGGER.warning("job %s could not be superseded: %s", old_id, exc)
        return job_id

    def _mark_handled(self, series: SeriesArrival) -> None:
        # Only if nothing arrived meanwhile: a newer last_received_at keeps the series unhandled.
        mark_handled(self._sessions, series.pk, series.last_received_at)

    # --- status --------------------------------------------------------------------------
    def waiting(self, limit: int = 200) -> list[WaitingSeries]:
        """Series received by DIMSE or STOW that routing has not handled since their last
        instance, newest first, with the rules each matches and when those fire (for status
        pages; reads one header per series, no pixels)."""
        out: list[WaitingSeries] = []
        for waiting in unhandled_series_newest(self._sessions, limit):
            candidate = waiting.arrival
            source, header = self._first_instance(candidate)
            if source not in TRIGGER_SOURCES:
                continue
            rules: list[tuple[str, datetime]] = []
            if header is not None:
                attributes = series_attributes(
                    header,
                    called_ae=candidate.called_ae,
                    calling_ae=candidate.calling_ae,
                    keywords=self._routing.match_keywords(),
                )
                for route in self._routing.matching(attributes):
                    quiet = timedelta(seconds=route.quiet_period(self._default_quiet_s))
                    rules.append((route.name, candidate.last_received_at + quiet))
            out.append(
                WaitingSeries(
                    series_instance_uid=candidate.uid,
                    study_instance_uid=candidate.study_uid,
                    modality=waiting.modality,
                    series_description=waiting.series_description,
                    calling_ae=candidate.calling_ae,
                    instances=waiting.instances,
                    last_received_at=candidate.last_received_at,
                    rules=tuple(rules),
                )
            )
        return out

    # --- thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="series-completion", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        failures = LoopFailures(LOGGER, "series completion pass")
        while not self._stop.wait(self._poll_s):
            try:
                self.check()
            except Exception as exc:
                failures.failed(exc)
            else:
                failures.succeeded()
