"""Distributed behaviour with 2 gloo processes on the CPU: DDP leaves the IUQ memory alone, and a
non-finite loss on one rank stops every rank at the same step with the same message."""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from iuq.config import load_config
from iuq.core.sampling import PixelSamples
from iuq.engine.module import IUQModule
from iuq.engine.step import NonFiniteLossError, check_finite
from tests.conftest import spawn_two_ranks


def _module() -> IUQModule:
    cfg = load_config(
        None,
        [
            "model.type=condinst", "model.backbone=resnet", "model.backbone_widths=[8,16,16,16]",
            "model.backbone_weights=none", "model.condinst.fpn_channels=32", "model.condinst.head_convs=1",
            "model.condinst.mask_branch_channels=32", "iuq.memory_capacity=50", "iuq.inter_center=true",
        ],
    )  # fmt: skip
    return IUQModule(cfg.to_dict(), [1, 2], ["a", "b"])


def _memory_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # the ranks' weights differ before DDP syncs them
    result = {}
    for marked in (True, False):
        module = _module()
        if not marked:  # the control: an ordinary module whose buffers DDP broadcasts
            module._ddp_params_and_buffers_to_ignore = []
        memory = module.criterion.memory
        # Each rank's memory is made different on purpose (in training the all-gather keeps them equal).
        memory.embeddings.fill_(float(rank + 1))
        memory.count.fill_(7 + rank)
        module.criterion.center.fill_(float(10 + rank))
        wrapped = DistributedDataParallel(module)  # broadcast_buffers=True, the default Lightning keeps
        wrapped._check_sync_bufs_pre_fwd() and wrapped._sync_buffers()  # what DDP does before a forward
        result[marked] = {
            "memory": memory.embeddings[0, 0].item(),
            "count": int(memory.count),
            "center": module.criterion.center[0].item(),
            "first_param": next(module.model.parameters()).detach().clone(),
        }
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_does_not_broadcast_the_memory_or_the_running_mean(tmp_path):
    spawn_two_ranks(_memory_worker, tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for marked in (True, False):
        assert torch.equal(r0[marked]["first_param"], r1[marked]["first_param"])  # weights synced from rank 0
    ours, control = (r0[True], r1[True]), (r0[False], r1[False])
    assert (ours[0]["memory"], ours[0]["count"], ours[0]["center"]) == (1.0, 7, 10.0)
    assert (ours[1]["memory"], ours[1]["count"], ours[1]["center"]) == (2.0, 8, 11.0)  # rank 1 kept its own
    assert (control[1]["memory"], control[1]["count"], control[1]["center"]) == (1.0, 7, 10.0)  # overwritten


def test_the_ignored_names_are_the_criterions_buffers():
    module = _module()
    ignored = set(module._ddp_params_and_buffers_to_ignore)
    assert ignored == {f"criterion.{n}" for n, _ in module.criterion.named_buffers()}
    assert {"criterion.memory.embeddings", "criterion.center"} <= ignored
    assert not any(name.startswith("model.") for name in ignored)
    buffers = dict(module.named_buffers())
    assert all(name in buffers for name in ignored)
    # enqueue still works after marking (the memory is an ordinary buffer)
    module.criterion.memory.enqueue(PixelSamples(torch.ones(3, 8), torch.rand(3, 2), torch.tensor([1, 1, 2])))
    assert len(module.criterion.memory) == 3


def _nonfinite_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    terms = {"loss_mask": torch.tensor(0.5), "loss_inter": torch.tensor(0.1)}
    check_finite(terms, step=3)  # finite everywhere: no error, no hang
    if rank == 1:
        terms["loss_inter"] = torch.tensor(float("inf"))
    try:
        check_finite({**terms, "loss": sum(terms.values())}, step=4, advice="Lower train.lr.")
        message = "no error"
    except NonFiniteLossError as e:
        message = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


def test_a_nonfinite_term_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    spawn_two_ranks(_nonfinite_worker, tmp_path)
    m0, m1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert m0 == m1 == "step 4: loss term 'loss_inter' is inf on rank 1; stopping. Lower train.lr."


def test_check_finite_single_process_message():
    try:
        check_finite({"loss_mask": torch.tensor(float("nan"))}, step=2)
    except NonFiniteLossError as e:
        assert str(e) == "step 2: loss term 'loss_mask' is nan; stopping."
    else:
        raise AssertionError("no error raised")
