"""Device models, FedCache's loss, the hash encoder, the artifact manifest and atomic writes: no upper layer's code."""

from models import encoder, files, loss, manifest, zoo

__all__ = ["encoder", "files", "loss", "manifest", "zoo"]
