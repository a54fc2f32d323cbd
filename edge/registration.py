"""FedCache's registration of a device: hello, then its hashes in resumable chunks, on a background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge.baseline import RegistrationError, hello_request, say_hello
from edge.config import DeviceConfig
from edge.hashing import HashEncoder
from edge.link import KnowledgeLink
from fedwire import Register, RegisterAck
from fedwire.constants import REGISTER_CHUNK
from models.encoder import export_encoder_onnx

if TYPE_CHECKING:
    from edge.data import Shard

log = logging.getLogger(__name__)


class Registration:
    """Makes the server hold this device's (id, label, hash) triples; training goes on while it does."""

    def __init__(self, *, config: DeviceConfig, link: KnowledgeLink, shard: Shard) -> None:
        self.config = config
        self.link = link
        self.shard = shard
        self._registered = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self._hash_cache: tuple[np.ndarray, HashEncoder] | None = None
        # Wall seconds of the last registration's parts (hashing, hello, chunks) and chunks sent again.
        self.timings: dict[str, float] = {}
        # A hub or copy device (edge/attacks.py) appends crafted (hashes, labels) to its own: (hashes, labels) -> both.
        self.extend: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def done(self) -> bool:
        """True once the server acknowledged every chunk (until `lost`)."""
        return self._registered.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait that long at most for the registration to complete; True when it did."""
        return self._registered.wait(timeout)

    def lost(self) -> None:
        """The server evidently lost (or never had) this registration: the next `ensure` registers again."""
        self._registered.clear()

    def ensure(self) -> None:
        """(Re-)register in the background unless done or under way; raises what a background attempt raised."""
        if self._error is not None:
            raise RegistrationError(repr(self._error)) from self._error
        if self._registered.is_set() or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._register_in_background, name="registration", daemon=True)
        self._thread.start()

    def _register_in_background(self) -> None:
        try:
            self.register()
        except Exception as exc:  # surfaced on the training thread, which stops the device
            self._error = exc

    @property
    def encoder(self) -> HashEncoder:
        """The encoder this device's hashes come from (the fleet's: every device builds or ships the same)."""
        return self._hashes()[1]

    def _hashes(self) -> tuple[np.ndarray, HashEncoder]:
        if self._hash_cache is None:
            cfg = self.config.hash
            path = Path(cfg.encoder) if cfg.encoder else self._default_encoder_path()
            encoder = HashEncoder(path, hash_kind=cfg.kind)
            self._hash_cache = (encoder.encode(self.shard.x_train), encoder)
        return self._hash_cache

    def _default_encoder_path(self) -> Path:
        """The built-in encoder is deterministic from (shape, dim, seed): every device builds the same file."""
        cfg = self.config.hash
        input_shape = self.shard.input_shape
        shape = "x".join(str(s) for s in input_shape)
        path = self.config.state_path / f"encoder-{shape}-{cfg.dim}-{cfg.seed}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_encoder_onnx(path, input_shape=input_shape, dim=cfg.dim, seed=cfg.seed)
        return path

    def register(self) -> None:
        """Hello until the server answers, then send the chunks it does not hold yet (resumable)."""
        started = time.monotonic()
        hashes, encoder = self._hashes()
        labels = self.shard.y_train.astype(np.uint16)
        if self.extend is not None:
            hashes, labels = self.extend(hashes, labels)
        hashed = time.monotonic()
        samples = len(labels)
        hello = say_hello(
            self.link,
            hello_request(
                config=self.config,
                samples=samples,
                capability="update_fetch",
                classes=self.shard.classes,
                hash_kind=encoder.hash_kind,
                hash_dim=encoder.hash_dim,
            ),
        )
        greeted = time.monotonic()
        resent = 0
        # Chunks go in id order and each is acknowledged before the next, so the server's count is a prefix.
        start = min(hello.registered, samples)
        if start:
            log.info("server already holds %d of %d samples; resuming registration there", start, samples)
        while start < samples:
            ids = np.arange(start, min(start + REGISTER_CHUNK, samples), dtype=np.uint32)
            request = Register(
                device=self.config.id, cid=self.link.new_cid(), ids=ids, labels=labels[ids], hashes=hashes[ids]
            )
            try:
                reply = self.link.call(request, timeout=self.config.reply_timeout_s)
            except TimeoutError:
                log.warning("registration chunk at %d timed out; sending it again", start)
                resent += 1
                continue
            if not isinstance(reply, RegisterAck):
                raise RegistrationError(f"registration chunk rejected: {reply}")
            start = int(ids[-1]) + 1
        now = time.monotonic()
        self.timings = {
            "hash": round(hashed - started, 3),
            "hello": round(greeted - hashed, 3),
            "chunks": round(now - greeted, 3),
            "resent": resent,
        }
        if hello.registered < samples:
            log.info("registered %d samples (%d hash bytes each) %s", samples, hashes.shape[1], self.timings)
        self._registered.set()
