"""Peak memory of `iuq predict` on 1, 6 and 24 megapixel photos, chunked paste vs all at once.

Each measurement is a fresh process running `iuq predict` on one JPEG; its peak resident memory
(ru_maxrss) is reported. The reference, in the same run, pastes all kept masks at the original
size at once (what prediction did before masks were kept at the model's resolution), by raising
the paste budget; it is skipped above --reference-max-mp, where it would need tens of GB.

    python benchmarks/predict_memory.py                      # a demo-sized Mask2Former, test size 800/1333
    python benchmarks/predict_memory.py --model runs/demo    # any run or model/ directory
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import resource, sys
import iuq.models.paste as paste
if sys.argv[1] == "all-at-once":
    paste.PASTE_BUDGET = 1 << 60
from iuq.cli import main
code = main(["predict", sys.argv[2], sys.argv[3], "--out", sys.argv[4]])
print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "exit", code)
"""

SIZES = {1: (1224, 816), 6: (3000, 2000), 24: (6000, 4000)}  # megapixels -> (width, height)


def demo_model(folder: Path) -> Path:
    """A Mask2Former of configs/demo.yaml's size (random init, 100 detections), test size 800 / 1333."""
    from iuq.config import load_config
    from iuq.engine.inference import save_model_dir
    from iuq.models.build import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model
    cfg.num_labels = 3
    cfg.backbone_weights = "none"
    save_model_dir(build_model(cfg, load_weights=False), folder / "model", [1, 2, 3], ["a", "b", "c"], 800, 1333)
    return folder / "model"


def photo(path: Path, width: int, height: int) -> None:
    """A smooth synthetic photo (gradients and discs): JPEG-sized like a real one."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = (127 + 120 * np.sin(x / 97.0)).astype(np.uint8)
    g = (127 + 120 * np.cos(y / 131.0)).astype(np.uint8)
    b = (((x // 400 + y // 400) % 2) * 200).astype(np.uint8)
    Image.fromarray(np.stack([r, g, b], axis=-1)).save(path, quality=90)


def peak_mb(mode: str, model: Path, image: Path, out: Path) -> float:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(model), str(image), str(out)],
                         capture_output=True, text=True)  # fmt: skip
    line = [x for x in res.stdout.splitlines() if x.startswith("peak_kb")]
    if res.returncode != 0 or not line:
        return float("nan")  # killed for memory, or failed: reported as n/a
    return int(line[-1].split()[1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a run or model/ directory (default: a demo-sized Mask2Former)")
    p.add_argument("--megapixels", type=int, nargs="+", default=[1, 6, 24], choices=sorted(SIZES))
    p.add_argument("--reference-max-mp", type=int, default=6, help="run the all-at-once reference up to this size")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or demo_model(tmp)
        print(f"model {model}")
        print("| photo | pixels | chunked paste peak MB | all at once peak MB | ratio |")
        print("|---|---|---|---|---|")
        for mp in args.megapixels:
            w, h = SIZES[mp]
            image = tmp / f"photo{mp}.jpg"
            photo(image, w, h)
            chunked = peak_mb("chunked", model, image, tmp / "out")
            if mp <= args.reference_max_mp:
                reference = peak_mb("all-at-once", model, image, tmp / "out")
                ref, ratio = f"{reference:.0f}", f"{chunked / reference:.3f}"
            else:
                ref, ratio = "not run", "-"
            print(f"| {mp} MP ({w}x{h}) | {w * h:,} | {chunked:.0f} | {ref} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
