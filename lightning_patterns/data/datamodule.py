"""``ShardedStreamingDataModule``: sharding, streaming and caching behind one LightningDataModule.

Give it the URLs of datasets written by :func:`~lightning_patterns.data.shards.write_dataset` and it
serves them to any ``Trainer``: one process, DDP, or the parameter-server strategy (whose
``distributed_sampler_kwargs`` name the workers only, so data never goes to servers). Every rank yields
the same number of batches, and the train loader's position is saved in Lightning checkpoints, so
``trainer.fit(ckpt_path=...)`` resumes mid-epoch exactly, even on another number of devices.

Its training batch size can change in the middle of an epoch (``set_batch_size(b, at_batch=n)``, the
:class:`~lightning_patterns.adaptive.BatchSizeAdjustable` seam that ``AdaptiveBatchSize`` uses): the stream
re-plans the samples not yet delivered at the new size, so none is lost or repeated, and the Trainer's count of
the epoch's batches follows. The batch size is saved in checkpoints with the stream's position.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lightning_patterns import _lightning
from lightning_patterns._warnings import silence_known_noise
from lightning_patterns.data.caching import CacheConfig
from lightning_patterns.data.embedded import (
    EmbeddedClickThrough,
    EmbeddedDataset,
    EmbeddedFashionMNIST,
    prepare_embedded_dataset,
)
from lightning_patterns.data.remote import RetryPolicy
from lightning_patterns.data.streaming.dataset import StreamingDataset
from lightning_patterns.data.streaming.loader import StreamingDataLoader
from lightning_patterns.data.streaming.options import ClassBalance, ReadAhead
from lightning_patterns.data.streaming.topology import trainer_rank_and_world_size
from lightning_patterns.demo.server import LocalHTTPServer

if TYPE_CHECKING:
    from pytorch_lightning import LightningDataModule as _LightningDataModule
else:
    _LightningDataModule = object  # the Lightning base is added per package: see lightning_patterns._lightning

__all__ = ["ShardedStreamingDataModule"]

# The public classes are the bodies below built for the Lightning package in use (lightning_patterns._lightning).
__getattr__ = _lightning.class_getter(__name__, ["ShardedStreamingDataModule"])

silence_known_noise()

log = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test", "predict")


class _ShardedStreamingDataModule(_LightningDataModule):
    """Streams sharded datasets from any fsspec URL, split evenly across the ranks of the Trainer.

    Args:
        train_url: dataset root of the training split (local path, ``s3://``, ``gs://``, ``http(s)://``...).
        val_url: dataset root of the validation split.
        test_url: dataset root of the test split.
        predict_url: dataset root of the prediction split.
        batch_size: samples per training batch, on each rank.
        eval_batch_size: samples per batch for validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per rank.
        shuffle: shuffle the training data every epoch (two levels: span order, then windows).
        seed: shuffle seed, the same on every rank.
        drop_last: drop up to ``world_size - 1`` training samples per epoch instead of repeating as many.
        shuffle_window: samples per window of the within-worker shuffle.
        span_samples: split shards into spans of at most this many samples before shuffling span order.
        read_ahead: shards (and bytes) fetched ahead of the one in use, fetch threads per worker, and seconds one
            shard may take (default: ``ReadAhead()``; in a recipe, a nested block ``read_ahead: {shards: 4}``).
        retry: retry policy for transient remote faults (default: ``RetryPolicy()``; nested in a recipe too).
        cache: ``"memory"``, ``"disk"``, a :class:`~lightning_patterns.data.caching.CacheConfig` or ``None``: keep
            shards so epochs after the first skip the remote.
        cache_dir: folder of the disk cache, with ``cache="disk"``; the ranks and workers of a machine may share it.
        cache_limit: bytes the cache may hold, with a cache name.
        storage_options: passed unchanged to fsspec (credentials, ``client_kwargs={"endpoint_url": ...}``).
        verify_checksums: check every shard against its manifest checksum.
        min_per_class: make every training batch hold at least this many samples of each class: short for
            ``class_balance=ClassBalance(min_per_class)``.
        class_balance: class-balanced training batches with all their settings (label field, number of classes,
            look-ahead); give it or ``min_per_class``, not both.
        embedded: instead of URLs, generate this dataset, serve it over HTTP from a process started on
            127.0.0.1 by global rank zero, and stream it from there (the main job's embedded default).
        embedded_click_through: the same with synthetic click-through impressions of a known model
            (:class:`~lightning_patterns.data.embedded.EmbeddedClickThrough`); give it or ``embedded``.
    """

    def __init__(
        self,
        train_url: str | None = None,
        val_url: str | None = None,
        test_url: str | None = None,
        predict_url: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_window: int = 1024,
        span_samples: int | None = None,
        read_ahead: ReadAhead | None = None,
        retry: RetryPolicy | None = None,
        cache: str | CacheConfig | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        storage_options: dict[str, Any] | None = None,
        verify_checksums: bool = True,
        min_per_class: int | None = None,
        class_balance: ClassBalance | None = None,
        embedded: EmbeddedFashionMNIST | None = None,
        embedded_click_through: EmbeddedClickThrough | None = None,
    ) -> None:
        super().__init__()
        if embedded is not None and embedded_click_through is not None:
            raise ValueError("Give one embedded dataset: `embedded` or `embedded_click_through`, not both.")
        source = embedded if embedded is not None else embedded_click_through
        if source is not None and (train_url is not None or val_url is not None):
            raise ValueError(
                "Give either `embedded` or `embedded_click_through` (a generated dataset served from 127.0.0.1) or "
                "`train_url`/`val_url`, not both."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"`eval_batch_size` must be at least 1, got eval_batch_size={eval_batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got num_workers={num_workers!r}.")
        self.urls = {"train": train_url, "val": val_url, "test": test_url, "predict": predict_url}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_window = shuffle_window
        self.span_samples = span_samples
        self.read_ahead = read_ahead
        self.retry = retry
        self.cache = cache
        self.cache_dir = cache_dir
        self.cache_limit = cache_limit
        self.storage_options = storage_options
        self.verify_checksums = verify_checksums
        # Either embedded dataset is served the same way. (Two arguments, not one of two types: LightningCLI cannot
        # tell two dataclasses apart when a flag such as `--data.init_args.embedded.seed=1` sets a shared field.)
        self.embedded: EmbeddedDataset | None = source
        self.min_per_class = min_per_class
        self.class_balance = class_balance
        self._server: LocalHTTPServer | None = None
        self.datasets: dict[str, StreamingDataset] = {}
        self.loaders: dict[str, StreamingDataLoader] = {}
        self._train_state: dict[str, Any] | None = None
        # A mid-epoch change asked for before the training loader exists (a resumed run): (batch_size, at_batch).
        self._pending_switch: tuple[int, int] | None = None

    def rank_and_world_size(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the data-parallel replicas: from the Trainer's strategy when attached."""
        return trainer_rank_and_world_size(self.trainer)

    def _make_dataset(self, split: str) -> StreamingDataset:
        url = self.urls[split]
        if url is None:
            raise ValueError(
                f"`{split}_url` is not set, but the Trainer asked for the {split} data. Pass "
                f"`ShardedStreamingDataModule({split}_url=...)` (or set `data.init_args.{split}_url` in the recipe)."
            )
        rank, world_size = self.rank_and_world_size()
        training = split == "train"
        return StreamingDataset(
            url,
            batch_size=self.batch_size if training else self.eval_batch_size,
            shuffle=self.shuffle and training,
            seed=self.seed,
            drop_last=self.drop_last and training,
            shuffle_window=self.shuffle_window,
            span_samples=self.span_samples,
            storage_options=self.storage_options,
            verify_checksums=self.verify_checksums,
            rank=rank,
            world_size=world_size,
            read_ahead=self.read_ahead,
            retry=self.retry,
            cache=self.cache,
            cache_dir=self.cache_dir,
            cache_limit=self.cache_limit,
            # Class balance shapes training batches only.
            min_per_class=self.min_per_class if training else None,
            class_balance=self.class_balance if training else None,
        )

    def prepare_data(self) -> None:
        """Write the embedded dataset's shards (once per machine; later runs reuse them)."""
        if self.embedded is not None:
            prepare_embedded_dataset(self.embedded)

    def _serve_embedded(self) -> None:
        assert self.embedded is not None
        trainer = self.trainer
        is_zero = trainer is None or trainer.is_global_zero
        url = None
        if is_zero and self._server is None:
            self._server = LocalHTTPServer(prepare_embedded_dataset(self.embedded, progress=False))
            url = self._server.start()
        elif self._server is not None:
            url = self._server.url
        if trainer is not None:
            url = trainer.strategy.broadcast(url, src=0)
        self.urls["train"], self.urls["val"] = f"{url}/train", f"{url}/val"
        self.urls["test"] = self.urls["predict"] = self.urls["val"]

    def setup(self, stage: str) -> None:
        """Open the manifests of the splits this stage needs (each rank opens its own, no communication)."""
        if self.embedded is not None:
            self._serve_embedded()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage, _SPLITS):
            if split in self.datasets or (split == "val" and self.urls["val"] is None):
                continue
            self.datasets[split] = self._make_dataset(split)

    def _loader(self, split: str) -> StreamingDataLoader:
        if split not in self.datasets:
            self.datasets[split] = self._make_dataset(split)
        if split not in self.loaders:
            loader = StreamingDataLoader(self.datasets[split], num_workers=self.num_workers)
            if split == "train":
                loader.track_consumption()
                if self._train_state is not None:
                    # Before Lightning measures the epoch (len), so a resumed epoch has its true length.
                    loader.load_state_dict(self._train_state)
                    self._train_state = None
                if self.datasets[split].batch_size != self.batch_size:
                    loader.set_batch_size(self.batch_size)  # the resumed epoch ends at its own size, then this
                if self._pending_switch is not None:
                    batch_size, at_batch = self._pending_switch
                    self._pending_switch = None
                    try:
                        loader.set_batch_size(batch_size, at_batch=at_batch)
                    except ValueError as error:
                        # Resumed on another topology, the epoch may end before that batch: change at the next one.
                        log.warning("Batch size %d from the next epoch instead: %s", batch_size, error)
                        loader.set_batch_size(batch_size)
            self.loaders[split] = loader
        return self.loaders[split]

    def train_dataloader(self) -> StreamingDataLoader:
        """The training stream of this rank."""
        return self._loader("train")

    def val_dataloader(self) -> StreamingDataLoader | list[Any]:
        """The validation stream of this rank (none when ``val_url`` is unset)."""
        return self._loader("val") if self.urls["val"] is not None else []

    def test_dataloader(self) -> StreamingDataLoader:
        """The test stream of this rank."""
        return self._loader("test")

    def predict_dataloader(self) -> StreamingDataLoader:
        """The prediction stream of this rank."""
        return self._loader("predict")

    def set_batch_size(self, batch_size: int, at_batch: int | None = None) -> None:
        """Change the training batch size per rank (:class:`~lightning_patterns.adaptive.BatchSizeAdjustable`).

        Args:
            batch_size: samples per training batch on each rank, at least 1.
            at_batch: ``None``: from the next epoch. An integer: from batch ``at_batch`` (0-based ``batch_idx``)
                of the epoch being trained on; every rank must be given the same one. The samples not yet
                delivered are re-planned at the new size, so none is lost or repeated.

        Raises:
            ValueError: ``batch_size < 1``; ``at_batch`` already delivered (Lightning fetches one batch ahead, so
                the earliest is ``batch_idx + 2`` in ``on_train_batch_end``) or past the epoch's last batch;
                class-balanced batches (``min_per_class``), which keep their batch size.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got batch_size={batch_size!r}.")
        if self.min_per_class is not None or self.class_balance is not None:
            raise ValueError(
                f"Class-balanced batches keep the batch size they were built with ({self.batch_size}), got "
                f"batch_size={batch_size!r}. Drop `min_per_class`/`class_balance` to change it while training."
            )
        loader = self.loaders.get("train")
        if loader is not None:
            loader.set_batch_size(batch_size, at_batch=at_batch)
        elif at_batch is not None:
            self._pending_switch = (batch_size, at_batch)  # checked when the loader exists
        else:
            self._pending_switch = None
            if "train" in self.datasets:
                self.datasets["train"].set_batch_size(batch_size)
        self.batch_size = batch_size

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches that reach the model, so checkpoints resume after exactly those."""
        trainer = self.trainer
        if trainer is not None and trainer.training and "train" in self.loaders:
            loader = self.loaders["train"]
            loader.mark_consumed()
            self._follow_epoch_length(trainer, len(loader))
        return batch

    @staticmethod
    def _follow_epoch_length(trainer: Any, length: int) -> None:
        """After a mid-epoch batch-size change, tell the Trainer how many batches the epoch now has."""
        fit_loop = trainer.fit_loop
        if fit_loop.max_batches == length or trainer.limit_train_batches != 1.0:
            return
        fit_loop.max_batches = length
        interval = trainer.val_check_interval
        if isinstance(interval, float) and trainer.val_check_batch not in (None, float("inf")):
            trainer.val_check_batch = max(1, int(length * interval))

    def teardown(self, stage: str) -> None:
        """Stop the embedded server, once every rank is done reading from it."""
        if self.embedded is None:
            return
        if self.trainer is not None:
            self.trainer.strategy.barrier("lightning_patterns.embedded_teardown")
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.datasets.clear()
        self.loaders.clear()

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, saved in Lightning checkpoints with the datamodule."""
        loader = self.loaders.get("train")
        state: dict[str, Any] = {"batch_size": self.batch_size}
        return {**state, "train": loader.state_dict()} if loader is not None else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training stream's position when its loader is created.

        Lightning also restores the loader itself (from the fit loop's copy), but only after it has
        measured the epoch's length; applying the state when the loader is created makes that length
        right when the run resumes on another world size.
        """
        self._train_state = state_dict.get("train")
        self.batch_size = int(state_dict.get("batch_size", self.batch_size))

    def metrics(self) -> dict[str, dict[str, float]]:
        """This rank's streaming counters for every split that was read."""
        return {split: loader.metrics() for split, loader in self.loaders.items()}


if TYPE_CHECKING:  # type checkers see the bodies; at run time `__getattr__` builds the classes
    ShardedStreamingDataModule = _ShardedStreamingDataModule
