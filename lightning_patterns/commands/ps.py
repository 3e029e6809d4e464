"""``lightning-patterns ps plan``: how many parameter servers for how many workers, and whether to use DDP instead.

Measured mode (a recipe or config, as for ``fit``): the model and its data are built as ``fit`` builds them; a few
training steps on one device time the step, its backward and its optimizer (the cost model's ``C``, ``beta``,
``O``), the optimizer is timed on a server's CPU (``U``), and this machine's copies, sums and TCP between two
processes are timed; the cluster is the recipe's (its devices × nodes as workers), unless flags say otherwise.
What-if mode: cluster numbers (``--workers 64 --nodes 8 --bandwidth 25Gbps --server-nodes 4``) replace this
machine's, and without a recipe the model's numbers come from flags too (``--model-bytes 97MB --compute 110ms
--optimizer 25ms``). The table predicts the step for S = 1 … ``--max-servers`` with each update placement and for
DDP's ring all-reduce, then recommends one (the formulas: :mod:`lightning_patterns.strategies.parameter_server
.cost_model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from lightning_patterns.commands.base import PROG, Command, CommandParser, echo
from lightning_patterns.commands.errors import UsageError

__all__ = ["PsCommand", "parse_bandwidth", "parse_bytes", "parse_seconds"]

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_NUMBER = r"([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"


def parse_bytes(text: str) -> float:
    """``"97MB"``, ``"1.5GiB"``, ``"4096"`` → bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]i?)?b?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 97MB, 1.5GiB or 4096")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def parse_bandwidth(text: str) -> float:
    """``"25Gbps"``, ``"25Gb/s"`` (bits), ``"3GB/s"``, ``"600MiB/s"`` (bytes) → bytes per second."""
    match = re.fullmatch(_NUMBER + r"\s*([kKmMgGtT]i?)?(bps|bit/s|b/s|B/s|Bps|bytes/s)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bandwidth; write it like 25Gbps or 25Gb/s (bits), 3GB/s (bytes)"
        )
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    return value if match.group(3)[0] == "B" else value / 8.0


def parse_seconds(text: str) -> float:
    """``"110ms"``, ``"2.5s"``, ``"50us"`` → seconds."""
    match = re.fullmatch(_NUMBER + r"\s*(s|ms|us|µs|ns)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write it like 110ms, 2.5s or 50us")
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


class PsCommand(Command):
    """``lightning-patterns ps plan``: the parameter server's cost model for a recipe, or for a cluster you describe."""

    name = "ps"
    help = "parameter server: `ps plan` predicts step times for S servers and DDP, and recommends one"

    def run(self, argv: list[str]) -> int:
        """Parse the options; the rest of the command line (``--recipe``/``--config``, overrides) builds the model."""
        parser = self._parser()
        args, rest = parser.parse_known_args(argv)
        if args.action != "plan":
            raise UsageError(f"`{self.prog}` knows one action, `plan`; got {args.action!r}.")
        unknown = [a for a in rest if a.startswith("--") and not _is_cli_option(a)]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        measured = bool(rest)
        if not measured and (args.model_bytes is None or args.compute is None):
            raise UsageError(
                f"`{self.prog} plan` needs a model: a recipe or config to measure (--recipe NAME, --config FILE, as "
                "for `fit`), or its numbers for a what-if plan (--model-bytes 97MB --compute 110ms, and optionally "
                "--optimizer 25ms --server-update 25ms)."
            )
        from lightning_patterns.strategies.parameter_server.planner import format_plan

        result = self._plan(args, rest)
        echo(format_plan(result))
        return 0

    def _parser(self) -> CommandParser:
        parser = CommandParser(
            prog=self.prog,
            description="Predict the step time of synchronous training with S = 1 … --max-servers parameter servers "
            "(each update placement) and with DDP's ring all-reduce, on this machine (measured) or on a cluster "
            f"you describe (what-if); recommend one. Measure a recipe: `{PROG} ps plan --recipe "
            f"fashion_mnist_parameter_server`. Size a cluster: `{PROG} ps plan --recipe NAME --workers 64 --nodes 8 "
            "--bandwidth 25Gbps --server-nodes 4`, or without a recipe: `--model-bytes 97MB --compute 110ms "
            "--optimizer 25ms --workers 64 --nodes 8 --bandwidth 25Gbps`.",
        )
        parser.add_argument("action", choices=["plan"], help="what to do (only `plan`)")
        cluster = parser.add_argument_group("cluster (what-if; default: the recipe's, on this machine)")
        cluster.add_argument("--workers", type=_positive_int, help="workers (default: the recipe's devices × nodes)")
        cluster.add_argument("--nodes", type=_positive_int, help="nodes the workers run on (default 1)")
        cluster.add_argument("--server-nodes", type=int, default=0, help="nodes of their own for the servers")
        cluster.add_argument("--cores", type=_positive_int, help="CPU cores per node (default: this machine's)")
        cluster.add_argument("--bandwidth", type=parse_bandwidth, help="network link per node, e.g. 25Gbps")
        cluster.add_argument("--latency", type=parse_seconds, default=50e-6, help="per message between nodes")
        cluster.add_argument(
            "--accelerator", choices=["cpu", "gpu"], help="where workers compute (default: where they were measured)"
        )
        cluster.add_argument("--max-servers", type=_positive_int, default=4, help="largest S in the table")
        cluster.add_argument(
            "--transport", choices=["auto", "shm", "tcp"], default="auto", help="shared memory within a node or not"
        )
        model = parser.add_argument_group("model (what-if without a recipe; each overrides the measured value)")
        model.add_argument("--model-bytes", type=parse_bytes, help="bytes of the gradient, e.g. 97MB")
        model.add_argument("--compute", type=parse_seconds, help="a worker's step without optimizer, e.g. 110ms")
        model.add_argument("--optimizer", type=parse_seconds, help="the optimizer step on a worker")
        model.add_argument("--server-update", type=parse_seconds, help="the optimizer step on a server's CPU")
        model.add_argument("--steps", type=_positive_int, default=5, help="steps timed when measuring (default 5)")
        return parser

    def _plan(self, args: argparse.Namespace, rest: list[str]) -> Any:
        import torch

        from lightning_patterns.strategies.parameter_server.cost_model import Workload
        from lightning_patterns.strategies.parameter_server.planner import (
            count_buckets,
            local_cluster,
            measure_links,
            plan,
        )

        workers, nodes, accelerator = 1, 1, "cpu"
        numels: list[int] = []
        itemsizes: list[int] = []
        workload = Workload(
            model_bytes=args.model_bytes or 0.0,
            compute_seconds=args.compute or 0.0,
            optimizer_seconds=args.optimizer if args.optimizer is not None else 0.0,
            server_update_seconds=args.server_update if args.server_update is not None else 0.0,
        )
        if rest:
            workload, numels, itemsizes, workers, nodes, accelerator = self._measure(rest, args.steps)
            workload = Workload(
                model_bytes=args.model_bytes or workload.model_bytes,
                compute_seconds=args.compute if args.compute is not None else workload.compute_seconds,
                optimizer_seconds=args.optimizer if args.optimizer is not None else workload.optimizer_seconds,
                server_update_seconds=(
                    args.server_update if args.server_update is not None else workload.server_update_seconds
                ),
                backward_fraction=workload.backward_fraction,
            )
        elif args.optimizer is None or args.server_update is None:
            # Element-wise optimizers stream over the parameters a few times: time SGD with momentum here.
            from lightning_patterns.strategies.parameter_server.planner import measure_optimizer

            numel = int(workload.model_bytes // 4)
            probe = min(numel, 16 * 2**20)
            update = measure_optimizer([probe], torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}) * numel / probe
            workload = Workload(
                model_bytes=workload.model_bytes,
                compute_seconds=workload.compute_seconds,
                optimizer_seconds=args.optimizer if args.optimizer is not None else update,
                server_update_seconds=args.server_update if args.server_update is not None else update,
            )
        workers = args.workers or workers
        nodes = args.nodes or nodes
        if workers % nodes:
            raise UsageError(f"--workers {workers} must be a multiple of --nodes {nodes}.")
        cores = args.cores or os.cpu_count() or 1
        what_if = args.workers is not None or args.nodes is not None or args.bandwidth is not None
        links = measure_links(int(workload.model_bytes), threads=1, tcp=True)
        on_cpu = (args.accelerator or accelerator) == "cpu"
        cluster = dataclasses.replace(
            local_cluster(workers, links, workers_on_cpu=on_cpu, cores=cores),
            nodes=nodes,
            server_nodes=args.server_nodes,
            cores=cores if on_cpu or not what_if else args.cores,
            net_bandwidth=args.bandwidth or links["tcp_bandwidth"],
            net_latency=args.latency if what_if else links["tcp_latency"],
            shared_memory=args.transport != "tcp",
        )

        def buckets(servers: int) -> int:
            return count_buckets(numels, itemsizes, servers) if numels else servers

        return plan(workload, cluster, args.max_servers, buckets)

    def _measure(self, rest: list[str], steps: int) -> tuple[Any, list[int], list[int], int, int, str]:
        """Build the recipe's model and data as ``fit`` does, and profile a few steps on one device."""
        from lightning_patterns import _lightning
        from lightning_patterns.commands.fit import _cli_class
        from lightning_patterns.strategies.parameter_server.planner import profile_module

        cli: Any = _cli_class()(args=rest, run=False, prog=f"{self.prog} plan")  # type: ignore[call-arg]
        tree = _lightning.tree(_lightning.active_package())
        trainer = cli.trainer
        workers = int(trainer.num_devices) * int(trainer.num_nodes)
        accelerator = "gpu" if trainer.strategy.root_device.type == "cuda" else "cpu"

        def make_trainer(**kwargs: Any) -> Any:
            return tree.pl.Trainer(
                accelerator=accelerator,
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                **kwargs,
            )

        def fit(profiling: Any, module: Any) -> None:
            profiling.fit(module, datamodule=cli.datamodule)

        # A server shares its node's cores with the workers there, as the servers do (`serve._share_cores`).
        per_node = max(workers // max(int(trainer.num_nodes), 1), 1)
        threads = max(1, (os.cpu_count() or 1) // (per_node + 1))
        workload, numels, itemsizes = profile_module(
            cli.model, make_trainer, fit, tree.pl.Callback, steps=steps, server_threads=threads
        )
        return workload, numels, itemsizes, workers, int(trainer.num_nodes), accelerator


def _is_cli_option(argument: str) -> bool:
    """Options that ``fit``'s LightningCLI understands (passed through): ``--recipe``, ``--config``, ``--key=...``."""
    name = argument.split("=", 1)[0]
    return name in ("--recipe", "--config", "--seed_everything") or "." in name or name in ("--trainer", "--model")
