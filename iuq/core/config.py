"""IUQConfig: every switch of the method, with the paper's defaults (§3.3, §4.3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class IUQConfig:
    """Settings of Instance-Unique Querying.

    inter: enable L_inter (Eq. 5).
    inter_weight: weight of L_inter (the paper adds it with weight 1).
    inter_loss: per-pair loss toward 0: "focal" (paper), "bce", "l1", "l2" (Table 4a).
    focal_alpha, focal_gamma: focal loss parameters (0.1, 2.5 in the paper).
    inter_mode: "memory" (batch + external memory, paper) or "minibatch" (Table 4c row 2).
    memory_capacity: pixels in the external memory (100k in the paper).
    memory_dtype: "float32" or "bfloat16": how the memory stores its embeddings. bfloat16 halves its
        size (1M x 256 pixels: 0.5 GB instead of 1 GB, in GPU memory and in every checkpoint); the
        loss still sums in fp32.
    sampling: "instance_balanced" (paper), "sparse" or "dense" (Table 4b).
    samples_per_instance: k of instance-balanced sampling (50 in the paper).
    samples_per_image: k of sparse sampling (the paper tries 500 and 1000).
    chunk_size: pixels per chunk in the memory-efficient L_inter (sized for a CPU's caches).
    cpu_chunk_pairs: on a CPU, chunks hold about this many (query, pixel) pairs instead (at most
        chunk_size pixels, at least 256): the per-pair intermediates then stay in cache, and L_inter
        runs about twice as fast as with 16384-pixel chunks at 640 queries (docs/benchmarks.md). None:
        chunk_size pixels, as studies begun before this key keep. The value changes only the order in
        which pairs are summed.
    cuda_chunk_pairs: on a CUDA device, chunks hold about this many (query, pixel) pairs instead
        (at least chunk_size pixels): 2^26 pairs is 256 MB per fp32 intermediate, and a 1M memory
        takes a handful of chunks rather than 62 of 16384 pixels, each a few dozen kernel launches.
    equi: enable the transformed view and L_equi (Eq. 8).
    equi_weight: lambda (3 in the paper, Table 4e).
    equi_variant: "full" (Eq. 8), "feature" (Eq. 6 only), "augmentation" (no term) (Table 4d).
    flip_p: probability of a horizontal flip in G.
    crop_min, crop_max: relative side range of the random crop in G (0.6-1.0 in the paper).

    Readings of points the paper leaves open (README "Training", docs/evidence.md):
    g_augment: draw one g ~ G per training image and train on g(I) in place of I, before anything
        else: G as ordinary single-view augmentation. With IUQ off this is the paper's baseline (its
        Table 4d "w/ aug" row equals its Table 3 baseline); with IUQ on, the g-views are drawn on top.
    g_view_base_loss: the g-views also get the base model's loss. The original views keep their
        full weight either way (each view's loss is normalised over its own masks).
    crop_mode: how a crop of G returns to the input size: "stretch", "keep_aspect", "no_resize"
        (see iuq/core/transforms.py).
    inter_scale: "pair_mean" (L_inter is the mean over pairs, weight inter_weight) or "mask_weight"
        (Eq. 5 read literally: L_inter is part of L_mask, so it also carries the base model's mask-loss
        weight, 5 for Mask2Former).
    inter_batch_grad: the batch's own negatives carry gradient into the other images' pixel
        embeddings (Eq. 5 has no stop-gradient); memory entries are constants either way.
    inter_views: whose matched queries enter L_inter: "all" views or the "original" views only.

    Switches for failure modes measured on the dense models (docs/evidence.md); off by default:
    warmup_steps: both IUQ weights ramp linearly from 0 to their values over this many optimiser
        steps (0: full weight from the first step).
    inter_center: L_inter decodes the negatives' embeddings minus a running mean of instance-pixel
        embeddings (detached, momentum `inter_center_momentum`), so a kernel of constant sign against
        non-negative (ReLU) features is no longer an exact zero of L_inter. Inference is unchanged.
    query_reduction: "location" (every matched query counts once) or "instance" (the queries matched
        to one instance are averaged first, in L_inter and in L_equi, so an instance with 18 positive
        locations weighs as much as one with 4; Mask2Former has one query per instance either way).
    equi_weight_base: "weighted" (lambda times the base model's weighted mask loss, e.g. 3 x dice for
        SOLOv2) or "unit" (lambda times the unweighted form).
    equi_stopgrad: "none", "features" (L_equi does not train f(I) through g(f(I))) or "queries" (it
        does not train the g-view's queries): a one-sided stop-gradient, as in SimSiam.
    roi_memory_capacity: for RoI mask heads (QueryInst, `iuq.core.roi`): pooled RoIs of other
        images' instances in the memory, in place of `memory_capacity` pixels.
    roi_negatives: RoI mask heads: at most this many negative RoIs per query and step, drawn
        uniformly from the batch and the memory (null: all of them). Each pair is a pass of the mask
        head, so the CPU demo draws a few; the expectation of L_inter is unchanged.
    roi_chunk_pairs: RoI mask heads: (query, RoI) pairs decoded at once (checkpointed chunks).
    roi_stages: RoI mask heads with stages (QueryInst): "last" (q_n and the decoder are the last
        stage's) or "all" (every stage's matched proposals, each decoded by its own stage's mask head).
    """

    inter: bool = True
    inter_weight: float = 1.0
    inter_loss: str = "focal"
    focal_alpha: float = 0.1
    focal_gamma: float = 2.5
    inter_mode: str = "memory"
    memory_capacity: int = 100_000
    memory_dtype: str = "float32"
    sampling: str = "instance_balanced"
    samples_per_instance: int = 50
    samples_per_image: int = 1000
    chunk_size: int = 16384
    cpu_chunk_pairs: int | None = None
    cuda_chunk_pairs: int = 2**26
    equi: bool = True
    equi_weight: float = 3.0
    equi_variant: str = "full"
    flip_p: float = 0.5
    crop_min: float = 0.6
    crop_max: float = 1.0
    g_augment: bool = True
    g_view_base_loss: bool = False
    crop_mode: str = "keep_aspect"
    inter_scale: str = "pair_mean"
    inter_batch_grad: bool = False
    inter_views: str = "all"
    warmup_steps: int = 0
    inter_center: bool = False
    inter_center_momentum: float = 0.99
    query_reduction: str = "location"
    equi_weight_base: str = "weighted"
    equi_stopgrad: str = "none"
    roi_memory_capacity: int = 1000
    roi_negatives: int | None = None
    roi_chunk_pairs: int = 256
    roi_stages: str = "last"

    def __post_init__(self) -> None:
        choices = {
            "inter_loss": ("focal", "bce", "l1", "l2"),
            "inter_mode": ("memory", "minibatch"),
            "memory_dtype": ("float32", "bfloat16"),
            "sampling": ("instance_balanced", "sparse", "dense"),
            "equi_variant": ("full", "feature", "augmentation"),
            "crop_mode": ("stretch", "keep_aspect", "no_resize"),
            "inter_scale": ("pair_mean", "mask_weight"),
            "inter_views": ("all", "original"),
            "query_reduction": ("location", "instance"),
            "equi_weight_base": ("weighted", "unit"),
            "equi_stopgrad": ("none", "features", "queries"),
            "roi_stages": ("last", "all"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"iuq.{name}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("memory_capacity", "samples_per_instance", "samples_per_image", "chunk_size", "cuda_chunk_pairs",
                     "roi_memory_capacity", "roi_chunk_pairs"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"iuq.{name}: must be a positive integer, got {value!r}")
        if self.roi_negatives is not None and (isinstance(self.roi_negatives, bool) or self.roi_negatives <= 0):
            raise ValueError(f"iuq.roi_negatives: must be a positive integer or null, got {self.roi_negatives!r}")
        if self.cpu_chunk_pairs is not None and (isinstance(self.cpu_chunk_pairs, bool) or self.cpu_chunk_pairs <= 0):
            raise ValueError(f"iuq.cpu_chunk_pairs: must be a positive integer or null, got {self.cpu_chunk_pairs!r}")
        for name in ("inter_weight", "equi_weight", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"iuq.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"iuq.warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.inter_center_momentum < 1:
            raise ValueError(f"iuq.inter_center_momentum: must be in [0, 1), got {self.inter_center_momentum!r}")
        if not 0 < self.focal_alpha < 1:
            raise ValueError(f"iuq.focal_alpha: must be in (0, 1), got {self.focal_alpha!r}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"iuq.flip_p: must be in [0, 1], got {self.flip_p!r}")
        if not 0 < self.crop_min <= self.crop_max <= 1:
            raise ValueError(
                f"iuq.crop_min/crop_max: need 0 < crop_min <= crop_max <= 1, got {self.crop_min!r}, {self.crop_max!r}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> IUQConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"iuq: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
