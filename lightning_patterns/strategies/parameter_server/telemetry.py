"""Communication telemetry of one worker: bytes, time in communication and computation, staleness."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ParameterServerTelemetry"]


@dataclass
class ParameterServerTelemetry:
    """Counters a worker keeps; the last step's values and running totals.

    Bytes count every byte this worker handed to or received from ``torch.distributed`` for the
    parameter-server protocol (headers included), so they can be checked against the theory of one push
    of the gradients and one pull of the parameters per step.

    Attributes:
        num_servers: number of servers.
        steps: optimizer steps taken (pushes).
        bytes_pushed: bytes sent in the last step, all servers.
        bytes_pulled: bytes received in the last step, all servers.
        bytes_pushed_per_server: bytes sent in the last step, by server index.
        bytes_pulled_per_server: bytes received in the last step, by server index.
        total_bytes_pushed: bytes sent over all steps.
        total_bytes_pulled: bytes received over all steps.
        comm_seconds: time in the last push and pull.
        compute_seconds: time between the end of the previous pull and the start of the last push.
        total_comm_seconds: communication time over all steps.
        total_compute_seconds: computation time over all steps.
        staleness: staleness of the last push (server updates between the pull this gradient was computed
            on and its application), the largest over servers.
        max_staleness_seen: the largest staleness seen so far.
        staleness_sum: sum of ``staleness`` over steps (for the mean).
        partition_bytes: bytes of parameters each server holds (from the partition).
    """

    num_servers: int
    steps: int = 0
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    bytes_pushed_per_server: list[int] = field(default_factory=list)
    bytes_pulled_per_server: list[int] = field(default_factory=list)
    total_bytes_pushed: int = 0
    total_bytes_pulled: int = 0
    comm_seconds: float = 0.0
    compute_seconds: float = 0.0
    total_comm_seconds: float = 0.0
    total_compute_seconds: float = 0.0
    staleness: int = 0
    max_staleness_seen: int = 0
    staleness_sum: int = 0
    partition_bytes: list[int] = field(default_factory=list)

    def record_step(
        self,
        pushed: list[int],
        pulled: list[int],
        comm_seconds: float,
        compute_seconds: float,
        staleness: int,
    ) -> None:
        """Add one step's measurements."""
        self.steps += 1
        self.bytes_pushed_per_server = pushed
        self.bytes_pulled_per_server = pulled
        self.bytes_pushed = sum(pushed)
        self.bytes_pulled = sum(pulled)
        self.total_bytes_pushed += self.bytes_pushed
        self.total_bytes_pulled += self.bytes_pulled
        self.comm_seconds = comm_seconds
        self.compute_seconds = compute_seconds
        self.total_comm_seconds += comm_seconds
        self.total_compute_seconds += compute_seconds
        self.staleness = staleness
        self.staleness_sum += staleness
        self.max_staleness_seen = max(self.max_staleness_seen, staleness)

    @property
    def load_imbalance(self) -> float:
        """``max / mean - 1`` of the bytes each server holds: 0 is perfectly balanced."""
        if not self.partition_bytes or sum(self.partition_bytes) == 0:
            return 0.0
        mean = sum(self.partition_bytes) / len(self.partition_bytes)
        return max(self.partition_bytes) / mean - 1.0

    @property
    def mean_staleness(self) -> float:
        """Mean staleness over the steps so far."""
        return self.staleness_sum / self.steps if self.steps else 0.0

    def metrics(self, prefix: str = "ps/") -> dict[str, float]:
        """The last step's values and running means, named for a Lightning logger."""
        out: dict[str, float] = {
            f"{prefix}bytes_pushed": float(self.bytes_pushed),
            f"{prefix}bytes_pulled": float(self.bytes_pulled),
            f"{prefix}comm_seconds": self.comm_seconds,
            f"{prefix}compute_seconds": self.compute_seconds,
            f"{prefix}comm_fraction": self.total_comm_seconds
            / max(self.total_comm_seconds + self.total_compute_seconds, 1e-12),
            f"{prefix}load_imbalance": self.load_imbalance,
            f"{prefix}staleness": float(self.staleness),
            f"{prefix}staleness_mean": self.mean_staleness,
            f"{prefix}staleness_max": float(self.max_staleness_seen),
        }
        for s, (pushed, pulled) in enumerate(
            zip(self.bytes_pushed_per_server, self.bytes_pulled_per_server, strict=True)
        ):
            out[f"{prefix}server{s}/bytes_pushed"] = float(pushed)
            out[f"{prefix}server{s}/bytes_pulled"] = float(pulled)
        return out
