"""The studies of `iuq ablate`: each is a list of arms (name, config overrides, the paper's row).

Every arm trains with G as ordinary augmentation (`iuq.g_augment=true`) unless it says otherwise,
so arms differ in the IUQ terms only: the paper's baseline is trained with G as augmentation
(its Table 4d "w/ aug" row equals its Table 3 baseline). The first arm of each study is the
reference of the paired differences.

The paper's rows are CondInst R50 on COCO val2017 (Tables 3 and 4): AP, AP50, AP75, APs, APm, APl
where printed (Table 4 prints AP, APs, APm, APl only; None where a value is not printed). The
paper ablates CondInst only: for another model the report shows that model's Table 1 rows instead
(`paper_rows`), and nothing where the paper has no row.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: dict = field(default_factory=dict)
    paper: dict | None = None  # the paper's metrics for this row, where it has one


FAIR = {"iuq.g_augment": True}
BASELINE = {**FAIR, "iuq.inter": False, "iuq.equi": False}
INTER = {**FAIR, "iuq.inter": True, "iuq.equi": False}
EQUI = {**FAIR, "iuq.inter": False, "iuq.equi": True}
BOTH = {**FAIR, "iuq.inter": True, "iuq.equi": True}
SPARSE = {**INTER, "iuq.sampling": "sparse"}
# The "readings" study starts from both terms as the config ships them and changes one switch at a
# time (the study's config is the reference: the shipped defaults unless it sets otherwise).
READING = BOTH


def _t4(ap, aps, apm, apl) -> dict:
    return {"AP": ap, "APs": aps, "APm": apm, "APl": apl}


T4_BASE = _t4(35.5, 16.9, 38.9, 50.2)
T4_FOCAL = _t4(37.6, 18.6, 40.6, 54.0)  # the adopted L_inter row, shared by Tables 4a-4c and 4e

STUDIES: dict[str, list[Arm]] = {
    "components": [  # Table 3
        Arm("baseline", BASELINE, {"AP": 35.5, "AP50": 55.9, "AP75": 37.4, "APs": 16.9, "APm": 38.9, "APl": 50.2}),
        Arm("inter", INTER, {"AP": 37.6, "AP50": 58.4, "AP75": 40.3, "APs": 18.2, "APm": 40.8, "APl": 54.0}),
        Arm("equi", EQUI, {"AP": 36.5, "AP50": 58.0, "AP75": 39.0, "APs": 17.1, "APm": 39.5, "APl": 51.6}),
        Arm("both", BOTH, {"AP": 38.1, "AP50": 60.2, "AP75": 40.6, "APs": 18.4, "APm": 40.9, "APl": 54.3}),
    ],
    "inter_loss": [  # Table 4a (L_inter alone)
        Arm("baseline", BASELINE, T4_BASE),
        Arm("l1", {**INTER, "iuq.inter_loss": "l1"}, _t4(36.0, 17.1, 39.2, 51.7)),
        Arm("l2", {**INTER, "iuq.inter_loss": "l2"}, _t4(35.9, 17.6, 39.1, 51.6)),
        Arm("bce", {**INTER, "iuq.inter_loss": "bce"}, _t4(37.3, 18.1, 40.6, 53.3)),
        Arm("focal", {**INTER, "iuq.inter_loss": "focal"}, T4_FOCAL),
    ],
    "sampling": [  # Table 4b (L_inter alone)
        Arm("baseline", BASELINE, T4_BASE),
        Arm("dense", {**INTER, "iuq.sampling": "dense"}, _t4(37.1, 18.0, 40.4, 53.0)),
        Arm("sparse_500", {**SPARSE, "iuq.samples_per_image": 500}, _t4(37.2, 17.8, 40.5, 53.2)),
        Arm("sparse_1000", {**SPARSE, "iuq.samples_per_image": 1000}, _t4(37.3, 17.9, 40.5, 53.4)),
        Arm("balanced_10", {**INTER, "iuq.samples_per_instance": 10}, _t4(37.4, 18.7, 40.5, 53.6)),
        Arm("balanced_50", {**INTER, "iuq.samples_per_instance": 50}, T4_FOCAL),
    ],
    "capacity": [  # Table 4c (L_inter alone)
        Arm("baseline", BASELINE, T4_BASE),
        Arm("minibatch", {**INTER, "iuq.inter_mode": "minibatch"}, _t4(36.9, 17.8, 40.1, 53.1)),
        Arm("memory_10k", {**INTER, "iuq.memory_capacity": 10_000}, _t4(37.0, 17.9, 40.3, 53.2)),
        Arm("memory_50k", {**INTER, "iuq.memory_capacity": 50_000}, _t4(37.3, 18.1, 40.4, 53.6)),
        Arm("memory_70k", {**INTER, "iuq.memory_capacity": 70_000}, _t4(37.5, 18.5, 40.4, 53.7)),
        Arm("memory_100k", {**INTER, "iuq.memory_capacity": 100_000}, T4_FOCAL),
    ],
    "equivariance": [  # Table 4d (L_equi alone); "aug" is the baseline with G as augmentation
        Arm("aug", BASELINE, T4_BASE),
        Arm("no_aug", {**BASELINE, "iuq.g_augment": False}, _t4(35.3, 16.2, 39.2, 49.9)),
        Arm("feature", {**EQUI, "iuq.equi_variant": "feature"}, _t4(36.3, 16.5, 39.5, 51.4)),
        Arm("full", {**EQUI, "iuq.equi_variant": "full"}, _t4(36.5, 17.1, 39.5, 51.6)),
    ],
    "lambda": [  # Table 4e (both terms)
        Arm("baseline", BASELINE, T4_BASE),
        Arm("lambda_1", {**BOTH, "iuq.equi_weight": 1.0}, _t4(37.0, 17.9, 40.4, 52.1)),
        Arm("lambda_3", {**BOTH, "iuq.equi_weight": 3.0}, T4_FOCAL),
        Arm("lambda_5", {**BOTH, "iuq.equi_weight": 5.0}, _t4(37.5, 18.3, 40.7, 53.6)),
        Arm("lambda_10", {**BOTH, "iuq.equi_weight": 10.0}, _t4(37.3, 18.1, 40.8, 53.3)),
    ],
    "readings": [  # the paper's open points and the failure-mode switches, each alone from the config
        Arm("baseline", BASELINE),
        Arm("both", READING),
        Arm("paper_comparator", {**READING, "iuq.g_augment": False}),
        Arm("g_base_loss", {**READING, "iuq.g_view_base_loss": True}),
        Arm("stretch", {**READING, "iuq.crop_mode": "stretch"}),
        Arm("no_resize", {**READING, "iuq.crop_mode": "no_resize"}),
        Arm("mask_weight", {**READING, "iuq.inter_scale": "mask_weight"}),
        Arm("batch_grad", {**READING, "iuq.inter_batch_grad": True}),
        Arm("original_views", {**READING, "iuq.inter_views": "original"}),
        Arm("alpha_0.9", {**READING, "iuq.focal_alpha": 0.9}),
        Arm("warmup_300", {**READING, "iuq.warmup_steps": 300}),
        Arm("inter_center", {**READING, "iuq.inter_center": True}),
        Arm("instance_reduction", {**READING, "iuq.query_reduction": "instance"}),
        Arm("equi_unit", {**READING, "iuq.equi_weight_base": "unit"}),
        Arm("stopgrad_features", {**READING, "iuq.equi_stopgrad": "features"}),
        Arm("stopgrad_queries", {**READING, "iuq.equi_stopgrad": "queries"}),
    ],
    "collapse": [  # L_inter alone against ReLU mask features (SOLOv2, SOTR), with and without centring
        Arm("baseline", BASELINE),
        Arm("inter", {**INTER, "iuq.inter_center": False}),
        Arm("inter_center", {**INTER, "iuq.inter_center": True}),
    ],
}


def combined_arm(name: str, arms: list[Arm]) -> Arm:
    """The arm "a+b+..." of a study: the switches of its arms a, b, ... applied together (the next
    step of the readings study, after each switch was measured alone). Arms that set one key to two
    values cannot be combined."""
    by_name = {a.name: a for a in arms[1:]}  # the reference is what the others start from, not a switch
    overrides: dict = {}
    for part in name.split("+"):
        if part not in by_name:
            raise ValueError(f"--arms: {part!r} (in {name!r}) is not a switch arm of this study: {sorted(by_name)}")
        for key, value in by_name[part].overrides.items():
            if overrides.get(key, value) != value:
                raise ValueError(f"--arms: {name!r} sets {key} to both {overrides[key]!r} and {value!r}")
            overrides[key] = value
    return Arm(name, overrides)


def study_arms(name: str, only: list[str] | None = None) -> list[Arm]:
    """The arms of study `name` (those named in `only`, in study order, the reference kept first;
    then the combinations "a+b" named in `only`, in its order)."""
    if name not in STUDIES:
        raise ValueError(f"--study: unknown study {name!r}; choose one of {sorted(STUDIES)}")
    arms = STUDIES[name]
    if only:
        unknown = sorted(set(n for n in only if "+" not in n) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"--arms: {unknown} are not arms of {name!r}: {[a.name for a in arms]}")
        combos = [combined_arm(n, arms) for n in dict.fromkeys(only) if "+" in n]
        arms = [a for i, a in enumerate(arms) if i == 0 or a.name in only] + combos
    return arms


def _t1(*values: float) -> dict:
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), values, strict=True))


# Table 1 (COCO test-dev, each model's own schedule): every base model at its smallest backbone,
# without and with IUQ (both terms). QueryInst is not among the paper's base models.
TABLE1 = {
    "condinst": ("ResNet-50", _t1(35.5, 55.8, 37.7, 16.8, 39.2, 50.6), _t1(38.6, 61.1, 41.2, 19.7, 41.1, 54.7)),
    "solov2": ("ResNet-50", _t1(35.1, 55.5, 37.0, 13.9, 38.4, 53.7), _t1(38.3, 59.6, 40.6, 17.8, 41.8, 56.2)),
    "sotr": ("ResNet-50", _t1(39.6, 60.7, 42.6, 10.3, 58.7, 72.1), _t1(42.2, 61.9, 43.9, 11.0, 60.5, 73.5)),
    "mask2former": ("Swin-S", _t1(44.5, 68.2, 47.7, 24.3, 49.0, 66.6), _t1(46.7, 70.7, 50.1, 27.0, 50.9, 68.8)),
}


CONDINST_CAPTION = "Paper: its CondInst R50 COCO val2017 row (Tables 3-4) and its gain over its reference row."


def paper_rows(study: str, arms: list[Arm], model: str | None) -> tuple[str, dict[str, dict | None]]:
    """(caption, the paper's row for each arm) for a study of base model `model` (None: not known,
    as for summaries written before they named their model; the CondInst rows are shown then)."""
    if model in (None, "condinst"):
        return CONDINST_CAPTION, {a.name: a.paper for a in arms}
    if model in TABLE1 and study == "components":
        backbone, base, ours = TABLE1[model]
        caption = (
            f"Paper: {model} {backbone} on COCO test-dev without (`baseline`) and with both terms (`both`), "
            "Table 1; it ablates CondInst only, so the single-term arms have no row."
        )
        return caption, {a.name: base if a.name == "baseline" else ours if a.name == "both" else None for a in arms}
    caption = f"Paper: no row for {model} in this study (the paper ablates CondInst only)."
    return caption, {a.name: None for a in arms}
