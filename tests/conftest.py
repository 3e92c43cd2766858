import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Six real COCO images shipped with the tests (tests/assets/coco_sample/README.md).
COCO_SAMPLE = ROOT / "tests" / "assets" / "coco_sample"
COCO_JSON = COCO_SAMPLE / "instances.json"
COCO_IMAGES = COCO_SAMPLE / "images"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small embedded synthetic dataset shared by the tests of one session."""
    from iuq.data.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(images=10, seed=7, size=128))
    return out


def plain_transformers_max_diff(model_dir: Path, hf_model, work: Path) -> float:
    """Largest |difference| of mask logits between `hf_model` and `model_dir` loaded by plain
    transformers in a fresh interpreter that never imports iuq (it fails if iuq gets imported)."""
    import subprocess
    import sys

    import torch

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    training = hf_model.training
    with torch.no_grad():
        ours = hf_model.eval()(pixel_values=x).masks_queries_logits
    hf_model.train(training)
    torch.save(x, work / "x.pt")
    torch.save(ours, work / "ours.pt")
    script = (
        "import sys, torch\n"
        "from transformers import Mask2FormerForUniversalSegmentation as M\n"
        "m = M.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    out = m(pixel_values=torch.load(sys.argv[2] + '/x.pt')).masks_queries_logits\n"
        "assert 'iuq' not in sys.modules\n"
        "print(float((out - torch.load(sys.argv[2] + '/ours.pt')).abs().max()))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), str(work)], capture_output=True, text=True, check=True
    )
    return float(res.stdout.strip().splitlines()[-1])


def write_tiny_coco(tmp_path: Path, annotations: list[dict], size=(20, 30), images=None) -> tuple[Path, Path]:
    """A one-image COCO dataset (image id 1, categories 1 and 2) with the given annotations."""
    h, w = size
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(img_dir / "a.png")
    data = {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def spawn_two_ranks(worker, out) -> None:
    """Run worker(rank, 2, port, str(out)) in two processes that can form a gloo group on a free port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(out)), nprocs=2, join=True)
