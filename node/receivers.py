"""Receiver processes: more than one process serves associations on the node's DICOM ports.

One Python process runs its associations' Python code (pynetdicom's PDU and DIMSE layers, the
C-STORE handler) one thread at a time, so several associations at once share one core. With
``NNUNET_NODE_DICOM_PROCESSES`` = n > 1, :class:`ReceiverPool` starts ``n - 1`` receiver
processes beside the node's own. The node's process alone listens on the plain and TLS ports;
each connection it accepts goes to the process serving the fewest associations at that moment
(itself on a tie, so that one association at a time pays no hand-over; else the receivers in
turn), passed as a file descriptor over a Unix socket (``SCM_RIGHTS``,
:func:`multiprocessing.reduction.send_handle`) before anything is read from it. Four
associations at once on two processes are so served two and two, which ``SO_REUSEPORT`` (each
process listening, the kernel choosing by a hash of the addresses) left to chance: three and
one, or all four on one process, in half the runs. Each process counts the associations it
has ended in a shared array; the node's process counts those it handed over.

Each receiver is a whole DICOM node (node/ae.py: the same AE title, contexts, access control,
TLS, C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET) over its own database connection and the shared
archive (``Archive(shared=True)``, storage/archive.py). A TLS connection is handed over before
its handshake, which the receiver makes.

Durability is the archive's: a receiver answers a C-STORE success only once the file and its
index rows are committed, exactly as the node's own process does. Nothing about an arrival has
to reach the node's process: series completion and routing (pipeline/completion.py) read the
arrivals from the index (``Series.last_received_at``), whichever process committed them, so an
acknowledged instance can never be missed by routing, even if its receiver dies just after.

Each receiver writes its temporary files into its own folder, ``.incoming/receiver-<i>/``. When a
receiver dies (killed, crashed), the node logs it, finishes or drops the writes the death
interrupted in that folder (:meth:`Archive.recover`, as at start; no other process writes
there) and starts another receiver in its place; until it is ready, the node's process serves
the connections. A connection handed to a receiver that dies before serving it is closed (the
peer sees the connection end, as with any server that dies). A receiver whose node process is
gone stops (its pipes to the node read end-of-file).

Metrics: a receiver counts nothing itself; it sends its events to the node's process every
:data:`FLUSH_S` seconds (:func:`core.metrics.forward_events`), so ``/metrics`` counts every
association's requests and instances.

Processes are started with ``spawn`` (no inherited threads, locks or sockets). Stopping
(:meth:`ReceiverPool.request_stop`, then :meth:`ReceiverPool.stop`): the node's process has
closed its ports, so it hands over no more connections; each receiver gets ``("stop", grace_s)``
on its hand-over pipe, after every connection handed to it, serves those, lets its associations
end by themselves for up to ``grace_s`` seconds (``NNUNET_NODE_DICOM_STOP_GRACE_S`` when a
signal stops the node, else 0), aborts those still open (node/ae.py, :meth:`DicomNode.stop`),
says how many with ``("stopped", aborted)`` and exits. ``("abort",)`` (a second signal to the
node) cuts the wait short. One that has not exited :data:`STOP_TIMEOUT_S` after its grace is
killed. A receiver that gets SIGTERM itself (systemd signals every process of the service)
stops the same way with the grace of the settings; a second SIGTERM aborts at once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from nnunet_node.core import metrics
from nnunet_node.core.errors import ConfigError
from nnunet_node.core.logging import configure_logging
from nnunet_node.core.settings import Settings
from nnunet_node.storage.archive import Archive

if TYPE_CHECKING:
    from nnunet_node.node.ae import DicomNode

LOGGER = logging.getLogger(__name__)

FLUSH_S = 0.25
"""How often a receiver sends its metric events to the node's process."""
START_TIMEOUT_S = 120.0
"""Longest wait for a receiver to listen."""
STOP_TIMEOUT_S = 15.0
"""Longest wait for a receiver to exit after the stop message and its grace, before it is
killed."""
RESTART_DELAY_S = 1.0
"""Wait before a receiver that died is replaced."""


def receiver_folder(index: int) -> str:
    """The name of receiver ``index``'s folder in the archive's ``.incoming``."""
    return f"receiver-{index}"


def count_ended(node: Any, ended: Any, index: int) -> None:
    """Count each association ``node`` (a :class:`~nnunet_node.node.ae.DicomNode`) ends in
    ``ended[index]`` (a shared array that only this process writes at ``index``)."""
    lock = threading.Lock()

    def one_more() -> None:
        with lock:
            ended[index] += 1

    node.ae.association_ended.append(one_more)


def run_receiver(
    settings: Settings,
    index: int,
    tls: bool,
    conn: Connection,
    handoff: Connection,
    ended: Any,
) -> None:
    """A receiver process's body (``spawn`` target): serve the connections the node's process
    sends over ``handoff`` (plain, or TLS when ``tls``), count each association it ends in
    ``ended[index]``, say ``("ready", pid)`` or ``("failed", reason)`` on ``conn``, send
    ``("metrics", events)`` while running, and stop on ``("stop", grace_s)`` (on ``handoff``,
    after the connections handed over before it), SIGTERM (with the grace of the settings) or
    the end of either pipe (at once). Stopping, it says ``("stopping",)``, lets its
    associations end for up to the grace, or until ``("abort",)`` or a second SIGTERM, aborts
    the others and says ``("stopped", aborted)``. SIGINT is left to the node's process, which
    stops its receivers."""
    from nnunet_node.node.ae import DicomNode  # the receiver's imports, not the module's
    from nnunet_node.pipeline.spec import NodeSpec
    from nnunet_node.storage.db import make_engine, make_sessionmaker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    abort = threading.Event()
    grace = [0.0]  # what the open associations get once stopping (seconds)
    terms = [0]  # SIGTERMs: the handler only counts (a lock taken there could deadlock)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        terms[0] += 1

    def aborting() -> bool:
        return abort.is_set() or terms[0] > 1

    signal.signal(signal.SIGTERM, on_sigterm)
    configure_logging(settings.log_level, settings.log_format)
    metrics.forward_events()
    engine = make_engine(settings.database_url)
    archive: Archive | None = None
    node: DicomNode | None = None
    try:
        archive = Archive(
            settings.archive_dir,
            make_sessionmaker(engine),
            min_free_bytes=settings.min_free_disk_mb * 1024 * 1024,
            shared=True,
            incoming_name=receiver_folder(index),
        )
        spec = NodeSpec.load(settings, quiet=True)  # the node's process logged it already
        node = DicomNode(
            settings, archive, spec.routing, port=0, tls_port=0 if tls else None, listening=False
        )
        count_ended(node, ended, index)
        node.start()
    except BaseException as exc:  # every failure is reported to the node
        with contextlib.suppress(OSError):
            conn.send(("failed", str(exc) or type(exc).__name__))
        if archive is not None:
            archive.close()
        engine.dispose()
        return

    def watch_node() -> None:
        with contextlib.suppress(EOFError, OSError):
            while conn.recv() != ("abort",):
                pass
            abort.set()
            stop.set()
            return
        abort.set()  # the node's process is gone: no grace
        stop.set()

    def take_connections() -> None:
        assert node is not None
        with contextlib.suppress(EOFError, OSError):
            while not stop.is_set():
                kind, address = handoff.recv()
                if kind == "stop":  # after every connection handed over
                    grace[0] = float(address)
                    break
                fd = reduction.recv_handle(handoff)
                sock = socket.socket(fileno=fd)
                try:
                    node.serve_connection(sock, address, tls=kind == "tls")
                except Exception:
                    LOGGER.exception("a connection handed over (%s) could not be served", address)
                    sock.close()
                    node.ae.notify_ended()  # counted as ended: it never became an association
        stop.set()

    threading.Thread(target=watch_node, name="receiver-stop", daemon=True).start()
    threading.Thread(target=take_connections, name="receiver-handoff", daemon=True).start()
    conn.send(("ready", multiprocessing.current_process().pid))

    def flush() -> None:
        events = metrics.take_events()
        if events:
            with contextlib.suppress(OSError):
                conn.send(("metrics", events))

    aborted = 0
    try:
        while not stop.wait(FLUSH_S):
            if terms[0] and not stop.is_set():
                grace[0] = settings.dicom_stop_grace_s
                stop.set()
                break
            flush()
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stopping",))  # no more connections to this process
    finally:
        aborted = node.stop(grace[0], aborting)
        flush()
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stopped", aborted))
        archive.close()
        engine.dispose()


@dataclass
class _Receiver:
    index: int
    process: Any
    conn: Connection
    handoff: Connection
    ready: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    reader: threading.Thread | None = None
    handed: int = 0
    """Connections handed to this process (its ``ended`` slot starts at 0 with it)."""
    draining: bool = False
    """It said it is stopping: no more connections for it."""
    aborted: int = 0
    """Associations it aborted when it stopped (its ``("stopped", n)``)."""


class ReceiverPool:
    """``count`` receiver processes beside the node's own (see the module docstring), over
    ``archive`` (the node's; it finishes a dead receiver's writes)."""

    def __init__(self, settings: Settings, archive: Archive, count: int) -> None:
        self.settings = settings
        self.archive = archive
        self.count = count
        self._context = multiprocessing.get_context("spawn")
        self._receivers: dict[int, _Receiver] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._kill_at: float | None = None
        """When a receiver still running after :meth:`request_stop` is killed (monotonic)."""
        self._tls = False
        self._node: DicomNode | None = None
        self._ended: Any = self._context.RawArray("q", count + 1)
        """Associations ended, per process: 0 the node's, i receiver i; each writes its own."""
        self._handed_here = 0
        self._turn = 0

    def pids(self) -> list[int]:
        """The receivers' process ids (tests kill one)."""
        with self._lock:
            return [r.process.pid for r in self._receivers.values() if r.process.pid]

    def start(self, node: DicomNode) -> None:
        """Start the receivers beside ``node`` (the node's process's, started: it accepts the
        connections and from now on hands them over, :meth:`hand_over`); return when all are
        ready. Raises ConfigError (after stopping those that started) when one cannot."""
        self._stopping.clear()
        self._kill_at = None
        self._tls = node.tls_port is not None
        started = [self._spawn(index) for index in range(1, self.count + 1)]
        for receiver in started:
            if not self._wait_ready(receiver):
                reason = receiver.failure or "it did not start"
                self.stop()
                raise ConfigError(f"DICOM receiver process {receiver.index}: {reason}")
        self._node = node
        count_ended(node, self._ended, 0)
        node.hand_over_with(self.hand_over)
        LOGGER.info(
            "%d DICOM receiver process(es) serving associations beside this one (pids %s)",
            len(started),
            ", ".join(str(pid) for pid in self.pids()),
        )

    def loads(self) -> list[int]:
        """Associations open (handed over and not yet ended) per process: this one first, then
        each receiver by index."""
        with self._lock:
            return [self._handed_here - self._ended[0]] + [
                r.handed - self._ended[r.index] for _, r in sorted(self._receivers.items())
            ]

    def hand_over(self, sock: socket.socket, address: Any, tls: bool) -> bool:
        """Give the connection ``sock`` (just accepted, nothing read) to the process serving the
        fewest associations: this one on a tie (a hand-over adds ~0.1 ms to the peer's wait),
        else the receivers in turn. True when a receiver took it
        (this process's copy is closed), False to serve it here: chosen, or no receiver is
        ready, or the hand-over failed (logged)."""
        with self._lock:
            candidates: list[tuple[int, _Receiver | None]] = [
                (self._handed_here - self._ended[0], None)
            ]
            if not self._stopping.is_set():
                candidates += [
                    (r.handed - self._ended[r.index], r)
                    for _, r in sorted(self._receivers.items())
                    if r.ready.is_set() and r.failure is None and not r.draining
                ]
            # this process first on a tie (no hand-over to pay), then the receivers in turn
            others = len(candidates) - 1
            order = [0] + [1 + (self._turn + k) % others for k in range(others)]
            chosen = min(order, key=lambda k: candidates[k][0])
            if chosen:
                self._turn = chosen % others
            receiver = candidates[chosen][1]
            if receiver is not None:
                try:
                    receiver.handoff.send(("tls" if tls else "plain", address))
                    reduction.send_handle(receiver.handoff, sock.fileno(), receiver.process.pid)
                except (OSError, ValueError) as exc:
                    LOGGER.warning(
                        "DICOM receiver process %d did not take a connection (%s); served here",
                        receiver.index,
                        exc,
                    )
                else:
                    receiver.handed += 1
                    sock.close()
                    return True
            self._handed_here += 1
            return False

    def _wait_ready(self, receiver: _Receiver) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not receiver.ready.wait(0.1):
            if receiver.failure is not None or not receiver.process.is_alive():
                return receiver.ready.is_set()
            if time.monotonic() > deadline:
                return False
        return True

    def _spawn(self, index: int) -> _Receiver:
        parent_conn, child_conn = self._context.Pipe()
        parent_handoff, child_handoff = self._context.Pipe()  # a Unix socket pair: fds travel
        self._ended[index] = 0  # the process before (if any) is gone
        process = self._context.Process(
            target=run_receiver,
            args=(self.settings, index, self._tls, child_conn, child_handoff, self._ended),
            name=f"nnunet-node-receiver-{index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        child_handoff.close()
        receiver = _Receiver(index, process, parent_conn, parent_handoff)
        receiver.reader = threading.Thread(
            target=self._read, args=(receiver,), name=f"receiver-{index}-pipe", daemon=True
        )
        with self._lock:
            self._receivers[index] = receiver
        receiver.reader.start()
        return receiver

    def _read(self, receiver: _Receiver) -> None:
        """Take the receiver's messages until its pipe ends; then, unless the pool is stopping,
        recover its folder and start another."""
        try:
            while True:
                message = receiver.conn.recv()
                if message[0] == "metrics":
                    metrics.replay(message[1])
                elif message[0] == "ready":
                    receiver.ready.set()
                elif message[0] == "failed":
                    receiver.failure = str(message[1])
                elif message[0] == "stopping":
                    receiver.draining = True
                elif message[0] == "stopped":
                    receiver.aborted = int(message[1])
        except (EOFError, OSError):
            pass
        receiver.process.join(STOP_TIMEOUT_S)
        receiver.conn.close()
        with self._lock:  # no more hand-overs to it
            receiver.failure = receiver.failure or "ended"
            receiver.handoff.close()
        if self._stopping.is_set() or not receiver.ready.is_set():
            return
        LOGGER.error(
            "DICOM receiver process %d (pid %s) ended (exit code %s): finishing its interrupted "
            "writes and starting another",
            receiver.index,
            receiver.process.pid,
            receiver.process.exitcode,
        )
        self.recover(receiver.index)
        if self._stopping.wait(RESTART_DELAY_S):
            return
        with self._lock:  # stop() sees the replacement, or the replacement sees stop()
            if self._stopping.is_set():
                return
            replacement = self._spawn(receiver.index)
        if not self._wait_ready(replacement):
            LOGGER.error(
                "DICOM receiver process %d did not start again: %s",
                receiver.index,
                replacement.failure or "no answer",
            )

    def recover(self, index: int) -> None:
        """Finish or drop the writes of receiver ``index``'s folder (it must not be running)."""
        folder = self.archive.incoming / receiver_folder(index)
        if not folder.is_dir():
            return
        try:
            report = self.archive.recover(folder)
        except Exception:
            LOGGER.exception("recovering %s failed; the next start tries again", folder)
            return
        LOGGER.info(
            "receiver %d: %d interrupted write(s) completed, %d dropped",
            index,
            report.completed,
            report.dropped,
        )

    def request_stop(self, grace_s: float) -> None:
        """Hand no more connections to the receivers and send each ``("stop", grace_s)`` on
        its hand-over pipe, after the connections handed to it: it serves them, lets its
        associations end for up to ``grace_s`` seconds, aborts those still open and exits. Call
        it once the node's ports are closed (:meth:`DicomNode.stop_accepting`); a second call
        changes nothing. Returns at once; :meth:`stop` waits."""
        with self._lock:  # hand_over sends under this lock: the stop comes after its sends
            if self._kill_at is not None:
                return
            self._stopping.set()
            self._kill_at = time.monotonic() + grace_s + STOP_TIMEOUT_S
            for receiver in self._receivers.values():
                with contextlib.suppress(OSError, ValueError):
                    receiver.handoff.send(("stop", grace_s))

    def stop(self, abort: Callable[[], bool] | None = None) -> int:
        """Stop every receiver and wait for them: :meth:`request_stop` with no grace unless it
        was called; ``("abort",)`` to each once ``abort()`` says True; a receiver still running
        :data:`STOP_TIMEOUT_S` after its grace is killed. Returns how many associations the
        receivers aborted (those of a killed receiver counted as aborted)."""
        self.request_stop(0.0)
        with self._lock:
            receivers = list(self._receivers.values())
            self._receivers.clear()
            if self._node is not None:
                self._node.hand_over_with(None)
                self._node = None
            kill_at = self._kill_at or time.monotonic()
        aborted = 0
        abort_sent = False
        for receiver in receivers:
            while receiver.process.is_alive() and (left := kill_at - time.monotonic()) > 0:
                if abort is not None and not abort_sent and abort():
                    abort_sent = True
                    for other in receivers:
                        with contextlib.suppress(OSError, ValueError):
                            other.conn.send(("abort",))
                receiver.process.join(min(0.1, left))
            if receiver.process.is_alive():
                LOGGER.warning(
                    "DICOM receiver process %d did not stop %.0f s after its grace: killed",
                    receiver.index,
                    STOP_TIMEOUT_S,
                )
                aborted += max(0, receiver.handed - self._ended[receiver.index])
                receiver.process.kill()
                receiver.process.join()
        for receiver in receivers:
            if receiver.reader is not None and receiver.reader is not threading.current_thread():
                receiver.reader.join(STOP_TIMEOUT_S)
            aborted += receiver.aborted
        return aborted
