"""A low-latency all_reduce for small CPU tensors among processes on one host, over loopback TCP.

Why our own: SyncBatchNorm issues two collectives per norm layer and training step whose payloads are tiny (``2C+1``
and ``2C`` numbers), so what they cost is *latency*. gloo -- the only torch.distributed backend for CPU tensors --
hands every collective from the calling thread to a worker thread and from there to its transport's event-loop
thread and back. On a small VM those thread wake-ups cost several times a plain TCP round trip between the same two
processes, and for narrow layers they are most of SyncBN's cost on CPU (``scripts/bench_syncbn.py`` prints both
latencies side by side; docs/bench has the figures). Intel's oneCCL bindings solve the same problem for CPU
clusters, but are a separate, platform-specific install; this module needs nothing but sockets.

Opt-in (``GNLIGHTNING_HOST_ALL_REDUCE=1`` on every rank; see :data:`gnlightning.distributed.HOST_CHANNEL_ENV`):
the default is plain torch.distributed, which the field's users run (NCCL on GPUs) and which meets SyncBN's cost
target at ResNet widths on CPU too; this channel only narrows the gap for narrow CPU layers.

Scope, deliberately narrow: CPU tensors up to :data:`MAX_BYTES`, in process groups whose ranks all run on this host
(the CPU-only tests, CI and single-node CPU training). Everything else -- accelerator tensors (NCCL), larger
tensors, groups spanning hosts -- stays on ``torch.distributed.all_reduce``; :func:`gnlightning.distributed
.all_reduce_sum` makes that choice, identically on every rank since it depends only on values all ranks share, and
:func:`gnlightning.distributed.host_channel` keeps one channel per group.

How: each pair of ranks in a group shares one TCP connection on 127.0.0.1, set up once per group through the
group itself (``all_gather_object``). An all_reduce sends this rank's bytes to every peer, receives every peer's,
and sums the contributions in group-rank order, so every rank computes bit-identical results (as gloo does);
ranks then take identical data-dependent branches, e.g. SyncBN's check of the global count. Setup verifies that
the peers are who they claim (a per-rank random token) and that every rank connected, and falls back to gloo for
the whole group otherwise, so a hostname shared by two machines cannot cross-wire ranks.

Failure behaviour: a peer that dies closes its sockets, and the survivors raise at once instead of waiting for a
collective timeout; a peer that hangs is waited for as long as the group's timeout, as with gloo.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import socket
import struct
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["HostAllReduce", "MAX_BYTES"]

log = logging.getLogger(__name__)

# Larger payloads go to gloo, whose bandwidth then matters more than its latency. Every rank sends before it
# receives, which cannot deadlock as long as a payload fits into the kernel's socket buffers; they are sized below
# to hold it several times over.
MAX_BYTES = 64 * 1024
_SOCKET_BUFFER_BYTES = 4 * MAX_BYTES
# How long setup waits for peers to connect; they are already past the all_gather before it, so this only bounds
# the failure case (a peer that could not connect) before everyone falls back to gloo.
_CONNECT_TIMEOUT_S = 60.0
_HELLO = struct.Struct("!i16s")  # connecting rank's index in the group, token of the rank it connects to

def _host_id() -> str:
    """Identifies this machine: hostname plus, on Linux, the boot id (containers sharing a name still differ)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot_id = handle.read().strip()
    except OSError:
        boot_id = ""
    return f"{socket.gethostname()}/{boot_id}"


def _group_timeout(group: Any) -> float:
    """The group's collective timeout in seconds, so that waiting on a hung peer behaves as gloo would."""
    try:
        timeout = group._get_backend(torch.device("cpu")).options._timeout  # private; absent on some versions
    except (AttributeError, RuntimeError):
        timeout = dist.default_pg_timeout
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)


def _receive_exactly(connection: socket.socket, buffer: memoryview) -> None:
    received = 0
    while received < len(buffer):
        count = connection.recv_into(buffer[received:])
        if count == 0:
            raise ConnectionResetError("connection closed by the peer")
        received += count


class HostAllReduce:
    """Sum-all_reduce over a fully connected mesh of loopback TCP connections between the ranks of one group.

    Get it through :func:`gnlightning.distributed.host_channel`, which creates it once per group with
    :meth:`connect`, on every rank of the group at the same point: setup is a collective.
    """

    def __init__(self, index: int, ranks: list[int], connections: dict[int, socket.socket], timeout: float) -> None:
        self.index = index
        self.size = len(ranks)
        self._ranks = ranks  # global rank of each group index, for error messages
        self._connections = connections
        self._timeout = timeout
        self._broken: BaseException | None = None
        # Landing space for each peer's contribution (this rank's own row stays unused), as a tensor for the sum
        # and as memoryviews for the sockets.
        self._received_tensor = torch.empty((self.size, MAX_BYTES), dtype=torch.uint8)
        self._received = [memoryview(row.numpy()) for row in self._received_tensor]
        self._cached_views: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}

    @classmethod
    def connect(cls, group: Any) -> HostAllReduce | None:
        """Set up the mesh for ``group``; ``None`` (on every rank alike) if its ranks are not all on this host."""
        index, size = dist.get_rank(group), dist.get_world_size(group)
        token = secrets.token_bytes(16)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(size)
            infos: list[Any] = [None] * size
            dist.all_gather_object(infos, (_host_id(), listener.getsockname()[1], token), group=group)
            if len({host for host, _, _ in infos}) > 1:
                return None
            connections: dict[int, socket.socket] = {}
            try:
                cls._connect_mesh(index, infos, token, listener, connections)
                error = None
            except OSError as exc:  # refused, timed out, or a peer that is not who it claimed
                error = f"{type(exc).__name__}: {exc}"
            errors: list[Any] = [None] * size
            dist.all_gather_object(errors, error, group=group)
        finally:
            listener.close()
        ranks = dist.get_process_group_ranks(group)
        if any(errors):
            for connection in connections.values():
                connection.close()
            log.warning(
                "host-local all_reduce unavailable for a group of %d ranks (%s); using torch.distributed instead",
                size, "; ".join(f"rank {rank}: {error}" for rank, error in zip(ranks, errors) if error),
            )
            return None
        timeout = _group_timeout(group)
        for connection in connections.values():
            connection.settimeout(timeout)
        return cls(index, ranks, connections, timeout)

    @staticmethod
    def _connect_mesh(
        index: int, infos: list[Any], token: bytes, listener: socket.socket, connections: dict[int, socket.socket]
    ) -> None:
        """Connect to every higher-index rank and accept every lower-index one (their listeners already exist)."""

        def configure(connection: socket.socket) -> None:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)

        for peer in range(index + 1, len(infos)):
            _, port, peer_token = infos[peer]
            connection = socket.create_connection(("127.0.0.1", port), timeout=_CONNECT_TIMEOUT_S)
            connections[peer] = connection
            configure(connection)
            connection.sendall(_HELLO.pack(index, peer_token))
        listener.settimeout(_CONNECT_TIMEOUT_S)
        for _ in range(index):
            connection, _ = listener.accept()
            connection.settimeout(_CONNECT_TIMEOUT_S)
            hello = bytearray(_HELLO.size)
            _receive_exactly(connection, memoryview(hello))
            peer, peer_token = _HELLO.unpack(hello)
            if peer_token != token or not 0 <= peer < index or peer in connections:
                connection.close()
                raise ConnectionRefusedError(f"unexpected connection on 127.0.0.1:{listener.getsockname()[1]}")
            connections[peer] = connection
            configure(connection)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum the CPU ``tensor`` in place over the group and return it; bit-identical on every rank.

        Deliberately few torch calls: SyncBN calls this right after a convolution has evicted the interpreter's and
        the dispatcher's code and data from the core's caches, where small tensor ops cost several times their
        hot-loop time. Bytes move through the buffer protocol;
        peers' contributions land in a preallocated buffer.
        """
        if self._broken is not None:
            raise RuntimeError(
                "the host-local all_reduce of this process group failed earlier and its connections are out of step"
            ) from self._broken
        in_place = tensor.dim() == 1 and tensor.is_contiguous()  # the common case: SyncBN's packed statistics
        flat = (tensor if in_place else tensor.reshape(-1).contiguous()).detach()
        payload = flat.view(torch.uint8).numpy()  # via uint8: numpy has no bfloat16
        nbytes = len(payload)
        peer = self.index
        try:
            for peer, connection in self._connections.items():
                connection.sendall(payload)
            for peer, connection in self._connections.items():
                _receive_exactly(connection, self._received[peer][:nbytes])
        except BaseException as error:  # includes KeyboardInterrupt: a partial exchange desynchronizes the stream
            self._broken = error
            if isinstance(error, TimeoutError):  # socket.timeout
                raise TimeoutError(
                    f"host-local all_reduce waited more than the process group's timeout ({self._timeout:.0f} s) for "
                    f"rank {self._ranks[peer]}; a rank is hung or skipped a collective"
                ) from error
            if isinstance(error, OSError):
                raise ConnectionError(
                    f"rank {self._ranks[peer]} closed its connection in the middle of an all_reduce; it has most "
                    "likely exited or crashed (see its own log for the cause)"
                ) from error
            raise
        # Added in group-rank order, so that every rank computes the same bits (for two ranks the order is moot:
        # IEEE addition is commutative).
        contributions = self._views(flat.dtype, nbytes)
        contributions[self.index] = flat
        total = contributions[0]
        for contribution in contributions[1:]:
            total.add_(contribution)
        if total is not flat:
            flat.copy_(total)
        if not in_place:
            tensor.detach().copy_(flat.view_as(tensor))
        return tensor

    def _views(self, dtype: torch.dtype, nbytes: int) -> list[torch.Tensor]:
        """Per peer, its first ``nbytes`` received bytes as a tensor of ``dtype`` (a fresh list of cached views).

        Callers send few distinct (dtype, size) pairs -- SyncBN two per layer width -- so the cache stays small.
        """
        views = self._cached_views.get((dtype, nbytes))
        if views is None:
            views = self._cached_views[(dtype, nbytes)] = [row[:nbytes].view(dtype) for row in self._received_tensor]
        return list(views)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
