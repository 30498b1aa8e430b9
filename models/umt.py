"""The few-shot segmentation Transformer of UMTFSS (Li et al., AAAI 2024), in plain PyTorch.

1-way K-shot. The model follows the paper and its PFENet/CyCTR lineage:

1. A frozen backbone; layer2 ‖ layer3 (mid-level features, as in PFENet) → 1×1 conv → ``dim``,
   separately for query and support.
2. A PFENet prior mask from layer4: for every query pixel, the highest cosine similarity to any
   support foreground pixel, min-max normalised per image, averaged over the shots.
3. The masked-average support prototype, broadcast and concatenated with the query features and
   the prior → 1×1 conv → ``dim`` (the same prototype is merged into the support features).
4. ``layers`` × [self-attention over the query pixels → FFN → prototype cross-attention → FFN],
   post-norm with residuals as in the reference implementation.
5. Prototype cross-attention: the support foreground / background pixels of all K shots are
   clustered by k-means into ``n_fg_protos`` / ``n_bg_protos`` prototypes (20 + 50 in the paper);
   each carries a learned fg/bg type embedding and the query pixels attend to them.
6. A small conv head → 2 logits (bg, fg) at feature resolution → bilinear upsampling.

Deliberate departures from the reference code:

- Query self-attention is standard ``nn.MultiheadAttention`` with a 2-D sine positional encoding
  instead of multi-scale deformable attention, which needs custom CUDA ops. It is quadratic in
  the number of query pixels; PyTorch's fused SDPA kernels keep that affordable at stride 8
  (60×60 tokens at 473 px). The reference's support-side deformable self-attention before the
  clustering is left out.
- Prototype slots left empty (fewer support pixels than prototypes) are masked out of the
  attention, and one learned "null" prototype is always attendable, so a support without
  foreground (or entirely 255) gives finite outputs; the reference paints a fake 2×2 foreground
  square instead.
- k-means is seeded with a fixed generator on every forward, so the output is a deterministic
  function of the inputs (repeatable evaluation; the cached-feature path equals the image path).
- ``loss`` excludes 255 pixels from the (background + foreground) Dice loss; the reference
  counts them. Its two channel terms are averaged rather than summed (half the scale).

Cached-feature convention (``forward(..., features=...)``): ``features`` is
``{"query": {"layer2", "layer3", "layer4"}, "support": {same keys}}`` holding the raw backbone
outputs, query tensors (B, C, h, w) and support tensors (B, K, C, h, w), i.e. exactly
``{"query": model.extract(query_img), "support": model.extract(support_img)}``. Each cached
image is therefore a per-layer (C, h, w) array that an episode loader stacks to these shapes.
Other keys (e.g. "layer1") are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.kmeans import assign, cluster_means, kmeans
from models.losses import IGNORE_INDEX, dice_loss, masked_cross_entropy

TAPS = ("layer2", "layer3", "layer4")


def _conv1x1(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.ReLU(inplace=True))


def sine_positional_encoding(h: int, w: int, dim: int, *, device=None, dtype=None) -> Tensor:
    """DETR-style normalised 2-D sine encoding, (h*w, dim): half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    n = dim // 2
    freq = 10000.0 ** (2 * (torch.arange(n, device=device) // 2) / n)
    scale = 2 * math.pi
    y = (torch.arange(1, h + 1, device=device) / (h + 1e-6) * scale)[:, None] / freq
    x = (torch.arange(1, w + 1, device=device) / (w + 1e-6) * scale)[:, None] / freq
    y = torch.stack((y[:, 0::2].sin(), y[:, 1::2].cos()), -1).flatten(1)  # (h, n)
    x = torch.stack((x[:, 0::2].sin(), x[:, 1::2].cos()), -1).flatten(1)  # (w, n)
    pos = torch.cat((y[:, None].expand(h, w, n), x[None].expand(h, w, n)), -1)
    return pos.reshape(h * w, dim).to(dtype)


def support_cells(mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Support labels (B, K, H, W) in {0, 1, 255} on a (h, w) feature grid.

    Returns hard foreground and background cells (B, K, h, w) bool and the soft foreground
    fraction (B, K, h, w). A cell is foreground / background when at least half of its pixels
    are; 255 pixels count as neither. A shot whose object is too small to fill half a cell keeps
    every cell the object touches, so tiny objects do not vanish.
    """
    b, k = mask.shape[:2]
    m = mask.flatten(0, 1).unsqueeze(1)
    fg_frac = F.adaptive_avg_pool2d((m == 1).float(), size)
    bg_frac = F.adaptive_avg_pool2d((m == 0).float(), size)
    fg = fg_frac >= 0.5
    tiny = ~fg.flatten(1).any(1)
    fg = torch.where(tiny[:, None, None, None], fg_frac > 0, fg)
    bg = (bg_frac >= 0.5) & ~fg
    return fg.view(b, k, *size), bg.view(b, k, *size), fg_frac.view(b, k, *size)


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Block(nn.Module):
    """Query self-attention → FFN → prototype cross-attention → FFN, each residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        # The reference uses 3 × dim hidden units in its FFNs.
        self.ffn_self = _FFN(dim, 3 * dim, dropout)
        self.ffn_cross = _FFN(dim, 3 * dim, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, pos: Tensor, protos: Tensor, proto_pad: Tensor) -> Tensor:
        qp = q + pos
        # need_weights=False lets PyTorch use the fused (memory-efficient) SDPA kernels.
        att = self.self_attn(qp, qp, q, need_weights=False)[0]
        q = self.norms[0](q + self.drop(att))
        q = self.norms[1](q + self.ffn_self(q))
        att = self.cross_attn(q, protos, protos, key_padding_mask=proto_pad, need_weights=False)[0]
        q = self.norms[2](q + self.drop(att))
        return self.norms[3](q + self.ffn_cross(q))


class UMTTransformer(nn.Module):
    """UMTFSS few-shot segmentation Transformer (1-way K-shot); see the module docstring."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        dim: int = 256,
        n_fg_protos: int = 20,
        n_bg_protos: int = 50,
        heads: int = 8,
        layers: int = 1,
        freeze_backbone: bool = True,
        kmeans_iters: int = 10,
        dropout: float = 0.1,
        ce_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"dim must be divisible by 4 (sine encoding), got {dim}")
        self.ce_weight = ce_weight  # of the cross-entropy term in the training objective
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()
        self.dim = dim
        self.n_fg_protos = n_fg_protos
        self.n_bg_protos = n_bg_protos
        self.kmeans_iters = kmeans_iters

        mid = backbone.channels["layer2"] + backbone.channels["layer3"]
        self.reduce_query = nn.Sequential(_conv1x1(mid, dim), nn.Dropout2d(dropout))
        self.reduce_support = nn.Sequential(_conv1x1(mid, dim), nn.Dropout2d(dropout))
        self.merge_query = _conv1x1(2 * dim + 1, dim)  # features ‖ prototype ‖ prior
        self.merge_support = _conv1x1(2 * dim, dim)  # features ‖ prototype
        # Puts the prototypes on the scale of the layer-normalised query tokens.
        self.proto_norm = nn.LayerNorm(dim)
        self.proto_type = nn.Embedding(3, dim)  # 0: background, 1: foreground, 2: null prototype
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.head = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(dim, 2, 1),
        )

    def train(self, mode: bool = True) -> UMTTransformer:
        """Switch mode; a frozen backbone stays in eval mode so its BatchNorm statistics hold."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def extract(self, img: Tensor) -> dict[str, Tensor]:
        """Backbone taps layer2..layer4 for images (..., 3, H, W), keeping the leading dims.

        No autograd graph is built when the backbone is frozen.
        """
        lead = img.shape[:-3]
        grad = torch.is_grad_enabled() and not self.freeze_backbone
        with torch.set_grad_enabled(grad):
            feats = self.backbone(img.reshape(-1, *img.shape[-3:]))
        return {t: feats[t].reshape(*lead, *feats[t].shape[1:]) for t in TAPS}

    def forward(
        self,
        support_img: Tensor | None,
        support_mask: Tensor,
        query_img: Tensor | None,
        n_ways: int = 1,
        *,
        features: dict[str, dict[str, Tensor]] | None = None,
    ) -> Tensor:
        """Logits (B, 2, H, W) for (bg, fg).

        Args:
            support_img: (B, K, 3, H, W); may be None when ``features`` is given.
            support_mask: (B, K, H, W) long in {0, 1, 255}.
            query_img: (B, 3, H, W); may be None when ``features`` is given, in which case the
                logits come out at the support-mask size (one canonical size per episode).
            n_ways: 1 (the model is 1-way; the argument makes its call that of the other models).
            features: precomputed backbone features (see the module docstring); used instead of
                running the backbone on the images.
        """
        if n_ways != 1:
            raise ValueError(f"UMTTransformer is 1-way, got n_ways={n_ways}")
        if features is None:
            features = {"query": self.extract(query_img), "support": self.extract(support_img)}
        out_size = (query_img if query_img is not None else support_mask).shape[-2:]
        qf, sf = features["query"], features["support"]
        b, k = support_mask.shape[:2]

        q = self._mid(qf, self.reduce_query)
        s = self._mid({t: sf[t].flatten(0, 1) for t in TAPS}, self.reduce_support)
        h, w = q.shape[-2:]
        fg, bg, fg_frac = support_cells(support_mask, (h, w))

        # One masked-average prototype per episode, pooled over the pixels of all shots.
        s = s.view(b, k, self.dim, h, w)
        weight = fg_frac.unsqueeze(2)
        proto = (s * weight).sum((1, 3, 4)) / (weight.sum((1, 3, 4)) + 5e-4)  # (B, dim)
        proto = proto[:, :, None, None]

        prior = self.prior(qf["layer4"], sf["layer4"], support_mask, (h, w))
        q = self.merge_query(torch.cat((q, proto.expand(-1, -1, h, w), prior), 1))
        s = self.merge_support(
            torch.cat((s.flatten(0, 1), proto.repeat_interleave(k, 0).expand(-1, -1, h, w)), 1)
        )
        tokens, pad = self._prototypes(s.view(b, k, self.dim, h, w), fg, bg)

        x = q.flatten(2).transpose(1, 2)
        pos = sine_positional_encoding(h, w, self.dim, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, pos, tokens, pad)
        logits = self.head(x.transpose(1, 2).reshape(b, self.dim, h, w))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)

    def loss(self, logits: Tensor, target: Tensor, *, ce_weight: float = 0.0) -> Tensor:
        """Dice loss (the paper's loss) + ``ce_weight`` × CE.

        Dice scores both channels, background and foreground, as the reference does: per image
        and channel (smoothing 1), averaged over the two channels, then over the batch. Pixels
        labelled 255 are excluded from both terms (the reference Dice counts them).
        """
        loss = dice_loss(logits, target, IGNORE_INDEX)
        if ce_weight:
            loss = loss + ce_weight * masked_cross_entropy(logits, target, IGNORE_INDEX)
        return loss

    def compute_objective(self, batch: Mapping[str, object], n_ways: int = 1) -> Tensor:
        """Training loss of an episode batch: ``loss`` with this model's ``ce_weight``.

        Keys as in ``MetaSegNet.compute_objective``; ``features`` (cached backbone taps, see
        ``forward``) may stand in for the images, which may then be absent.
        """
        logits = self(batch.get("support_img"), batch["support_mask"], batch.get("query_img"),
                      n_ways, features=batch.get("features"))
        return self.loss(logits, batch["query_mask"], ce_weight=self.ce_weight)

    def _mid(self, feats: dict[str, Tensor], reduce: nn.Module) -> Tensor:
        """layer2 ‖ layer3 (layer3 resized to layer2's grid if the backbone is not dilated)."""
        l2, l3 = feats["layer2"], feats["layer3"]
        if l3.shape[-2:] != l2.shape[-2:]:
            l3 = F.interpolate(l3, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        return reduce(torch.cat((l2, l3), 1).to(self.head[-1].weight.dtype))

    def prior(self, q4: Tensor, s4: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """PFENet prior (B, 1, h, w); layer4 query (B, C, h4, w4), support (B, K, C, h4, w4)."""
        h4, w4 = q4.shape[-2:]
        fg4, _, _ = support_cells(mask, (h4, w4))
        qn = F.normalize(q4.flatten(2).float(), dim=1)  # (B, C, Nq)
        priors = []
        # One shot at a time: the (B, Ns, Nq) similarity is the largest tensor of the model.
        for shot in range(s4.shape[1]):
            sn = F.normalize(s4[:, shot].flatten(2).float(), dim=1)
            sim = torch.bmm(sn.transpose(1, 2), qn)
            sim = sim.masked_fill_(~fg4[:, shot].flatten(1).unsqueeze(-1), float("-inf")).amax(1)
            sim = torch.where(torch.isinf(sim), torch.zeros_like(sim), sim)  # shot without fg
            lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
            priors.append((sim - lo) / (hi - lo + 1e-7))
        prior = torch.stack(priors, 1).mean(1).view(-1, 1, h4, w4)
        if (h4, w4) != tuple(size):
            prior = F.interpolate(prior, size=size, mode="bilinear", align_corners=False)
        return prior.to(self.head[-1].weight.dtype)

    def _prototypes(self, s: Tensor, fg: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        """Prototype tokens (B, n_fg + n_bg + 1, dim) and their key padding mask (True = skip)."""
        b = s.shape[0]
        points = s.permute(0, 1, 3, 4, 2).reshape(b, -1, self.dim)
        gen = torch.Generator(device=points.device).manual_seed(0)
        fg_p, fg_ok = self._cluster(points, fg.flatten(1), self.n_fg_protos, gen)
        bg_p, bg_ok = self._cluster(points, bg.flatten(1), self.n_bg_protos, gen)
        kind = self.proto_type.weight
        tokens = torch.cat(
            (
                self.proto_norm(fg_p) + kind[1],
                self.proto_norm(bg_p) + kind[0],
                kind[2].expand(b, 1, self.dim),
            ),
            1,
        )
        ok = torch.cat((fg_ok, bg_ok, fg_ok.new_ones(b, 1)), 1)
        return tokens, ~ok

    def _cluster(
        self, points: Tensor, valid: Tensor, k: int, gen: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        centers, ok = kmeans(points, k, iters=self.kmeans_iters, valid=valid, generator=gen)
        # Re-average under the final assignment so gradients reach the support features, as the
        # reference's one-hot grouping does; slots that end up empty keep their k-means center.
        labels = assign(points.detach(), centers, ok, valid)
        means, counts = cluster_means(points, labels, k)
        return torch.where(counts.unsqueeze(-1) > 0, means, centers), ok
