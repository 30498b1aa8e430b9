"""The "dino" pixel embedder: last-layer patch tokens of a DINO ViT.

Spec (json-able, see `tasks.labelfree.embeddings`)::

    {"kind": "dino", "arch": "vit_small" | "vit_base", "patch_size": 8 | 16,
     "checkpoint": "path/to/dino_deitsmall8_pretrain.pth", "which": "teacher"}

The embedder's stride is the patch size: a 144 px image gives an 18 x 18 map with patch 8.
"""

from __future__ import annotations

from typing import Any

import torch

from models.vit import build_vit, load_vit_checkpoint
from tasks.labelfree.embeddings import Embedder


def dino_embedder(spec: dict[str, Any]) -> Embedder:
    """Build a frozen DINO ViT embedder from its spec; a checkpoint is required."""
    if not spec.get("checkpoint"):
        # A random ViT is not a feature extractor, and workers could not rebuild the same one.
        raise ValueError("a 'dino' embedder needs a 'checkpoint' "
                         "(e.g. dino_deitsmall8_pretrain.pth)")
    # Allocate without DINO's init (seconds for a ViT-B on a CPU): the strict load below
    # overwrites every parameter or raises.
    with torch.device("meta"):
        vit = build_vit(spec.get("arch", "vit_small"), int(spec.get("patch_size", 8)))
    vit.to_empty(device="cpu")
    load_vit_checkpoint(vit, spec["checkpoint"], which=spec.get("which", "teacher"))
    return Embedder(spec, vit, vit.patch_tokens, vit.embed_dim, vit.patch_size)
