"""Communication telemetry of one worker: bytes, exposed and overlapped communication, staleness."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ParameterServerTelemetry"]


@dataclass
class ParameterServerTelemetry:
    """Counters a worker keeps; the last round's values and running totals.

    A round is one synchronization with the servers (one optimizer step, or one closure call of an optimizer
    that calls it several times). Bytes count every byte of the parameter-server protocol this worker sent or
    received, headers included, whether they travelled over TCP or through shared memory, so they can be checked
    against the theory of one push of the gradients and one pull of the parameters (or of the averaged gradients)
    per round.

    Time is split the way it matters for the step time:

    - *exposed* communication: time this worker's training thread spent on the protocol: copying gradients to
      host memory, posting messages, waiting for and applying the servers' replies. The step is that much
      longer than computation alone.
    - *overlapped* communication: the rest of the time the round's communication was in flight, from its first
      push to its last reply, while the worker computed (backward of earlier layers, the next forward).

    Attributes:
        num_servers: number of servers.
        steps: rounds completed.
        bytes_pushed: bytes sent in the last round, all servers.
        bytes_pulled: bytes received in the last round, all servers.
        bytes_pushed_per_server: bytes sent in the last round, by server index.
        bytes_pulled_per_server: bytes received in the last round, by server index.
        total_bytes_pushed: bytes sent over all rounds.
        total_bytes_pulled: bytes received over all rounds.
        comm_seconds: the last round's communication time, exposed plus overlapped.
        exposed_seconds: the last round's exposed communication.
        overlapped_seconds: the last round's overlapped communication.
        compute_seconds: the last round's time that was not exposed communication.
        step_seconds: time from the end of the previous round to the end of the last one.
        total_comm_seconds: communication time over all rounds.
        total_exposed_seconds: exposed communication over all rounds.
        total_overlapped_seconds: overlapped communication over all rounds.
        total_compute_seconds: time that was not exposed communication, over all rounds.
        total_step_seconds: time over all rounds.
        staleness: staleness of the last push (server updates between the pull this gradient was computed
            on and its application), the largest over servers.
        max_staleness_seen: the largest staleness seen so far.
        staleness_sum: sum of ``staleness`` over rounds (for the mean).
        partition_bytes: bytes of parameters each server holds (from the partition).
        transports: how this worker's pushes and replies travel to and from each server (``"shm"``, ``"tcp"``).
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
    exposed_seconds: float = 0.0
    overlapped_seconds: float = 0.0
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    total_comm_seconds: float = 0.0
    total_exposed_seconds: float = 0.0
    total_overlapped_seconds: float = 0.0
    total_compute_seconds: float = 0.0
    total_step_seconds: float = 0.0
    staleness: int = 0
    max_staleness_seen: int = 0
    staleness_sum: int = 0
    partition_bytes: list[int] = field(default_factory=list)
    transports: list[str] = field(default_factory=list)

    def record_step(
        self,
        pushed: list[int],
        pulled: list[int],
        exposed_seconds: float,
        overlapped_seconds: float,
        step_seconds: float,
        staleness: int,
    ) -> None:
        """Add one round's measurements."""
        self.steps += 1
        self.bytes_pushed_per_server = list(pushed)
        self.bytes_pulled_per_server = list(pulled)
        self.bytes_pushed = sum(pushed)
        self.bytes_pulled = sum(pulled)
        self.total_bytes_pushed += self.bytes_pushed
        self.total_bytes_pulled += self.bytes_pulled
        self.exposed_seconds = exposed_seconds
        self.overlapped_seconds = overlapped_seconds
        self.comm_seconds = exposed_seconds + overlapped_seconds
        self.step_seconds = max(step_seconds, exposed_seconds)
        self.compute_seconds = self.step_seconds - exposed_seconds
        self.total_exposed_seconds += exposed_seconds
        self.total_overlapped_seconds += overlapped_seconds
        self.total_comm_seconds += self.comm_seconds
        self.total_compute_seconds += self.compute_seconds
        self.total_step_seconds += self.step_seconds
        self.staleness = staleness
        self.staleness_sum += staleness
        self.max_staleness_seen = max(self.max_staleness_seen, staleness)

    @property
    def comm_fraction(self) -> float:
        """Exposed communication over the time of all rounds: how much longer the steps are than computation."""
        return self.total_exposed_seconds / max(self.total_step_seconds, 1e-12)

    @property
    def overlapped_fraction(self) -> float:
        """The share of all communication time that overlapped computation."""
        return self.total_overlapped_seconds / max(self.total_comm_seconds, 1e-12)

    @property
    def load_imbalance(self) -> float:
        """``max / mean - 1`` of the bytes each server holds: 0 is perfectly balanced."""
        if not self.partition_bytes or sum(self.partition_bytes) == 0:
            return 0.0
        mean = sum(self.partition_bytes) / len(self.partition_bytes)
        return max(self.partition_bytes) / mean - 1.0

    @property
    def mean_staleness(self) -> float:
        """Mean staleness over the rounds so far."""
        return self.staleness_sum / self.steps if self.steps else 0.0

    def metrics(self, prefix: str = "ps/") -> dict[str, float]:
        """The last round's values and running ratios, named for a Lightning logger."""
        out: dict[str, float] = {
            f"{prefix}bytes_pushed": float(self.bytes_pushed),
            f"{prefix}bytes_pulled": float(self.bytes_pulled),
            f"{prefix}comm_seconds": self.comm_seconds,
            f"{prefix}comm_exposed_seconds": self.exposed_seconds,
            f"{prefix}comm_overlapped_seconds": self.overlapped_seconds,
            f"{prefix}compute_seconds": self.compute_seconds,
            f"{prefix}comm_fraction": self.comm_fraction,
            f"{prefix}comm_overlapped_fraction": self.overlapped_fraction,
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
