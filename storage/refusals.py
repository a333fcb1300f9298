"""What the node answers when an instance is not stored: one table for C-STORE and STOW-RS.

An ingest (``Archive.ingest``, ``ingest_incoming``) that fails raises one of the node's
exceptions (``core.errors``) or an ``OSError``. C-STORE answers with a status (PS3.4 B.2.3,
Table B.2-1) and STOW-RS lists the instance in the Failed SOP Sequence with a Failure Reason
(0008,1197) (PS3.18 10.5.3 and I.2.2, whose reasons are C-STORE's): both read the same row of
:data:`REFUSALS`, so the same failure never gets two different answers.

=============  =================  ==============  ============================================
exception      C-STORE status     STOW-RS reason  meaning
=============  =================  ==============  ============================================
WrongStudy     0xC409             0xC409          Error: instance of another study than the
                                                  target (implementation-specific, Cxxx range)
InvalidDicom   0xC000             0xC000          Error: cannot understand
StorageFull    0xA700             0xA700          Refused: out of resources (the disk floor)
OSError        0xA701             0xA701          Refused: out of resources (disk or database
                                                  input/output)
(PEP 249)      0xA701             0xA701          Refused: out of resources: the database cannot
Operational-                                      be used now (server down, connection lost,
Error                                             locked, pool exhausted): the sender may retry
anything else  0xC001             0x0110          Error: unable to process / processing
                                                  failure
=============  =================  ==============  ============================================

PayloadTooLarge (a STOW-RS body without Content-Length that passes the upload limit midway)
is answered as StorageFull: 0xA700, out of resources.

The last row differs between the columns on purpose: C-STORE keeps to the ranges of PS3.4
Table B.2-1 (0xC001 in "Error: cannot understand", Cxxx), while STOW-RS answers 0x0110
"Processing failure", which PS3.18 I.2.2 lists for a failure of the origin server's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.exc import TimeoutError as PoolTimeout

from nnunet_node.core.errors import InvalidDicom, PayloadTooLarge, StorageFull, WrongStudy


@dataclass(frozen=True)
class Refusal:
    """How a failed ingest is answered."""

    dimse_status: int
    """The C-STORE-RSP Status (0000,0900), PS3.4 B.2.3."""
    failure_reason: int
    """The STOW-RS Failure Reason (0008,1197), PS3.18 I.2.2."""
    meaning: str
    expected: bool
    """The sender's fault or a known condition (logged as one warning line), not a bug of ours
    (logged with its traceback)."""


STUDY_MISMATCH = 0xC409
"""Implementation-specific failure (in the Cxxx "cannot understand" range PS3.4 B.2.3 and PS3.18
I.2.2 allow): the instance belongs to another study than the request's target resource (the
value dcm4chee uses; 0xC122 is already "Referenced Transfer Syntax not supported")."""

REFUSALS: tuple[tuple[type[BaseException], Refusal], ...] = (
    (
        WrongStudy,
        Refusal(STUDY_MISMATCH, STUDY_MISMATCH, "instance of another study than the target", True),
    ),
    (InvalidDicom, Refusal(0xC000, 0xC000, "cannot understand", True)),
    (StorageFull, Refusal(0xA700, 0xA700, "out of resources", True)),
    (PayloadTooLarge, Refusal(0xA700, 0xA700, "out of resources (the upload size limit)", True)),
    (OSError, Refusal(0xA701, 0xA701, "out of resources (input/output)", False)),
)
"""Exception class -> refusal, the first matching row wins (subclasses come first)."""

UNEXPECTED = Refusal(0xC001, 0x0110, "processing failure", False)
"""Any other exception: a failure of the node's own."""

DATABASE_AWAY = Refusal(0xA701, 0xA701, "out of resources (the database cannot be used)", True)
"""The database cannot be used now (server down, connection lost, locked, pool exhausted): an
outage for the sender to retry, not a failure of the instance (0xC001 told it not to send it
again) nor a bug to log with a traceback per instance."""


def refusal_for(exc: BaseException) -> Refusal:
    """The row of :data:`REFUSALS` for ``exc``; :data:`DATABASE_AWAY` for a database that
    cannot be used (:func:`database_unavailable`); else :data:`UNEXPECTED`."""
    for kind, refusal in REFUSALS:
        if isinstance(exc, kind):
            return refusal
    if database_unavailable(exc):
        return DATABASE_AWAY
    return UNEXPECTED


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be used now: PEP 249's ``OperationalError``
    (every driver defines one under that name: ``sqlite3``, ``psycopg``; the ingest's index
    writer raises the driver's own, the ORM SQLAlchemy's wrapper of it), or SQLAlchemy's pool
    timeout."""
    if isinstance(exc, PoolTimeout):
        return True
    return any(kind.__name__ == "OperationalError" for kind in type(exc).__mro__)
