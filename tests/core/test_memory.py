import os

import torch
import torch.distributed as dist

from iuq.core.memory import PixelMemory
from iuq.core.sampling import PixelSamples
from tests.conftest import spawn_two_ranks


def _samples(values, image_id=0):
    v = torch.as_tensor(values, dtype=torch.float32)
    return PixelSamples(v[:, None].repeat(1, 2), torch.stack([v, -v], 1), torch.full((len(v),), image_id))


def test_fifo_wraparound_order_and_capacity():
    mem = PixelMemory(capacity=5, dim=2)
    assert len(mem) == 0
    mem.enqueue(_samples([1, 2, 3]))
    assert len(mem) == 3 and mem.contents().embeddings[:, 0].tolist() == [1, 2, 3]
    mem.enqueue(_samples([4, 5, 6, 7], image_id=9))  # 6 and 7 overwrite the oldest (1, 2)
    assert len(mem) == 5
    assert mem.embeddings[:, 0].tolist() == [6, 7, 3, 4, 5]
    assert mem.image_ids.tolist() == [9, 9, 0, 9, 9]
    assert mem.xy[:, 1].tolist() == [-6, -7, -3, -4, -5]
    assert int(mem.ptr) == 2
    mem.enqueue(_samples(list(range(10, 22))))  # more than the capacity: the newest 5 survive
    assert sorted(mem.embeddings[:, 0].tolist()) == [17, 18, 19, 20, 21] and len(mem) == 5
    mem.enqueue(_samples([]))
    assert len(mem) == 5


def test_state_dict_round_trip():
    a = PixelMemory(capacity=4, dim=2)
    a.enqueue(_samples([1, 2, 3, 4, 5], image_id=3))
    b = PixelMemory(capacity=4, dim=2)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    a.enqueue(_samples([6]))
    b.enqueue(_samples([6]))
    assert torch.equal(a.embeddings, b.embeddings) and len(b) == 4


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mem = PixelMemory(capacity=8, dim=2)
    # rank 0 enqueues 2 then 4 samples, rank 1 enqueues 3 then 0
    sizes = [[2, 4], [3, 0]][rank]
    base = 100 * rank
    for step, n in enumerate(sizes):
        mem.enqueue(_samples([base + 10 * step + i for i in range(n)], image_id=rank))
    torch.save(mem.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_gloo_ranks_hold_identical_memory(tmp_path):
    spawn_two_ranks(_worker, tmp_path)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # step 0: [0, 1] from rank 0 + [100, 101, 102] from rank 1; step 1: [10..13] + nothing -> 9 > 8
    assert int(a["count"]) == 8
    assert sorted(a["embeddings"][:, 0].tolist()) == [1, 10, 11, 12, 13, 100, 101, 102]
