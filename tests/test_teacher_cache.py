"""The teacher cache (``SpanDistillation(teacher_cache_mb=...)``) on a tiny random Llama: loss and
gradients equal those without it, a row seen before is never forwarded again (only the new rows of a
batch are), the byte budget holds, the cache follows the LM, and it never reaches a checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_llama_run

from umim.errors import UserError
from umim.ktoken.training import KTokenDistillation, KTokenSettings
from umim.lm import LMSpec
from umim.merging.batch import add_segments
from umim.merging.span_encoder import RuleSegmenter
from umim.training.datamodule import UMIMDataModule
from umim.training.distillation import TeacherCache, UMIMDistillation

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run folder with lm/ and corpus/, a data module with mined rules, set up for fitting)."""
    root = make_tiny_llama_run(tmp_path_factory.mktemp("tiny"))
    dm = UMIMDataModule(corpus=str(root / "corpus"), lm=LMSpec(str(root / "lm")), rules=str(root / "rules"),
                        block_size=BLOCK, batch_size=4, max_train_blocks=8, max_eval_blocks=4)
    dm.prepare_data()
    dm.setup("fit")
    return root, dm


def _batch(dm, rows: list[int], lengths: list[int] | None = None) -> dict:
    """Training blocks ``rows`` [B, BLOCK] (row i cut to ``lengths[i]`` tokens), segmented by the rules."""
    ids = torch.from_numpy(dm.blocks["train"][rows]).clone()
    n = torch.tensor(lengths or [BLOCK] * len(rows))
    ids[torch.arange(BLOCK)[None] >= n[:, None]] = 0  # padding
    return add_segments({"input_ids": ids, "lengths": n}, RuleSegmenter(dm.rules))


def _module(root, cls=UMIMDistillation, **kw):
    m = cls(lm=LMSpec(str(root / "lm")), train_metrics=False, **kw)
    m.configure_model()
    return m


def _loss_and_grads(module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss, _ = module.loss(module.segment(batch, "train"), "train")
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in module.span_encoder.named_parameters()}


class TeacherCalls:
    """Rows per teacher forward (calls of ``lm.base_model`` with ``input_ids``; the student passes embeddings)."""

    def __init__(self, lm):
        self.rows: list[int] = []
        self.handle = lm.base_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs.get("input_ids") is not None:
            self.rows.append(kwargs["input_ids"].shape[0])

    def take(self) -> list[int]:
        out, self.rows = self.rows, []
        return out


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


@pytest.mark.parametrize("cls", [UMIMDistillation, KTokenDistillation])
def test_cached_loss_and_gradients_equal_uncached(tiny, cls):
    root, dm = tiny
    kw = {"ktoken": KTokenSettings(k=4)} if cls is KTokenDistillation else {}
    off, on = _module(root, cls, **kw), _module(root, cls, teacher_cache_mb=16, **kw)
    calls = TeacherCalls(on.lm)
    first = _batch(dm, [0, 1, 2], [BLOCK, 40, 57])  # padded rows too: cached rows are stored without padding
    _assert_same(_loss_and_grads(off, first), _loss_and_grads(on, first))
    assert calls.take() == [3]
    _assert_same(_loss_and_grads(off, first), _loss_and_grads(on, first))  # repeated: all from the cache
    assert calls.take() == []
    assert len(on.teacher_cache.rows) == 3 and on.teacher_cache.forwarded_rows == 3
    # rows in another order and another batch: the content is the key, not the place
    again = _batch(dm, [2, 0], [57, BLOCK])
    _assert_same(_loss_and_grads(off, again), _loss_and_grads(on, again))
    assert calls.take() == []


def test_only_new_rows_are_forwarded(tiny):
    root, dm = tiny
    on, off = _module(root, teacher_cache_mb=16), _module(root)
    calls = TeacherCalls(on.lm)
    _loss_and_grads(on, _batch(dm, [0, 1]))
    assert calls.take() == [2]
    # rows 0 and 1 cached; row 3 new, and row 0 cut shorter is another row (its length is in the key)
    mixed = _batch(dm, [3, 0, 1, 0], [BLOCK, BLOCK, BLOCK, 30])
    cached, plain = _loss_and_grads(on, mixed), _loss_and_grads(off, mixed)
    assert calls.take() == [2]
    # the new rows ran in a batch of their own: equal up to float rounding of another batch shape
    torch.testing.assert_close(cached[0], plain[0], rtol=1e-5, atol=1e-6)
    for k in plain[1]:
        torch.testing.assert_close(cached[1][k], plain[1][k], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        teacher = on.teacher_cache.hidden(on.lm, mixed)  # [4, L, d], all four rows cached now
    assert calls.take() == []
    n = mixed["lengths"]
    assert not teacher[3, n[3]:].any()  # positions past a row's length are 0
    # causal LM: the cut row's states are those of the whole row's prefix
    torch.testing.assert_close(teacher[3, : n[3]], teacher[1, : n[3]], rtol=1e-5, atol=1e-5)


def test_budget_is_respected(tiny):
    root, dm = tiny
    d = 32  # the tiny Llama's hidden size, fp32
    row_bytes = BLOCK * d * 4
    on = _module(root, teacher_cache_mb=2.5 * row_bytes / 2**20)  # room for two full rows
    calls = TeacherCalls(on.lm)
    batch = _batch(dm, [0, 1, 2, 3])
    _loss_and_grads(on, batch)
    cache = on.teacher_cache
    assert calls.take() == [4]
    assert len(cache.rows) == 2 and cache.used == 2 * row_bytes <= cache.budget
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and v.shape == (BLOCK, d)
               for v in cache.rows.values())
    _loss_and_grads(on, batch)  # full: the first two rows hit, the other two are forwarded and not stored
    assert calls.take() == [2]
    assert len(cache.rows) == 2 and cache.used == 2 * row_bytes
    short = _batch(dm, [4], [BLOCK // 4])  # a quarter row still fits the last half row of room
    _loss_and_grads(on, short)
    assert cache.used == 2 * row_bytes + row_bytes // 4 <= cache.budget


def test_cache_is_dropped_when_the_lm_changes(tiny):
    root, dm = tiny
    on = _module(root, teacher_cache_mb=16)
    calls = TeacherCalls(on.lm)
    batch = _batch(dm, [0, 1])
    _loss_and_grads(on, batch)
    _loss_and_grads(on, batch)
    assert calls.take() == [2]
    off = _module(root)
    with torch.no_grad():
        for m in (on, off):
            m.lm.model.norm.weight.mul_(2.0)  # an in-place change of a frozen weight
    _assert_same(_loss_and_grads(on, batch), _loss_and_grads(off, batch))
    assert calls.take() == [2]
    _loss_and_grads(on, batch)
    assert calls.take() == []
    # another LM object: nothing carries over
    other = _module(root)
    cache = on.teacher_cache
    cache.hidden(other.lm, batch)
    assert cache.forwarded_rows == 6 and len(cache.rows) == 2


def test_cache_is_not_in_checkpoints_and_serves_validation_and_later_epochs(tiny, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    root, dm = tiny
    module = UMIMDistillation(lm=LMSpec(str(root / "lm")), teacher_cache_mb=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[ckpt],
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    cache = module.teacher_cache
    unique = len(dm.blocks["train"]) + len(dm.blocks["validation"])  # 8 + 4 blocks, each seen 3 times
    assert cache.forwarded_rows == unique and len(cache.rows) == unique
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["state_dict"] and all(k.startswith("merger.") for k in saved["state_dict"])
    assert saved["hyper_parameters"]["teacher_cache_mb"] == 16  # the setting is kept, its contents are not
    assert not any("cache" in k for k in module.state_dict())
    cached_bytes = sum(v.numel() * v.element_size() for v in cache.rows.values())
    saved_bytes = sum(v.numel() * v.element_size() for v in saved["state_dict"].values())
    assert cache.used == cached_bytes and saved_bytes < cached_bytes
    copied = pickle.loads(pickle.dumps(cache))  # a pickled module (spawned workers, torch.save) carries none either
    assert copied.budget == cache.budget and not copied.rows and copied.used == 0


@pytest.mark.parametrize("budget", [-1, float("nan"), float("inf")])
def test_a_budget_that_is_not_a_finite_size_is_refused(tiny, budget):
    root, _ = tiny
    with pytest.raises(UserError, match="teacher_cache_mb"):
        UMIMDistillation(lm=LMSpec(str(root / "lm")), teacher_cache_mb=budget)
    assert UMIMDistillation(lm=LMSpec(str(root / "lm"))).teacher_cache is None
    assert TeacherCache(1).budget == 2**20


def _fsdp_worker(rank: int, root: str, port: int, blocks: torch.Tensor, plan: list[list[int]]) -> None:
    """One of 2 gloo processes: a sharded module with the cache and an unsharded one without it, step by step."""
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from umim.rules.store import MergeRules
    from umim.training.strategy import shard_frozen_lm_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        sharded, plain = _module(Path(root), teacher_cache_mb=16), _module(Path(root))
        shard_frozen_lm_module(sharded, init_device_mesh("cpu", (2,)))
        seg = RuleSegmenter(MergeRules.load(Path(root) / "rules"))
        for i in plan[rank]:
            b = add_segments({"input_ids": blocks[i : i + 1], "lengths": torch.tensor([BLOCK])}, seg)
            got, _ = sharded.loss(b, "train")
            got.backward()
            want, _ = plain.loss(b, "train")
            assert want > 0
            torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
        assert sharded.teacher_cache.forwarded_rows == len(set(plan[rank])) == len(sharded.teacher_cache.rows)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_sharded_ranks_that_hit_and_miss_in_one_step_stay_in_step(tiny):
    """FSDP2 all-gathers the LM's weights in every forward: when one rank's rows are all cached and another's
    are not, both must still run the teacher (without that, gloo aborts on a collective mismatch)."""
    import socket

    import torch.multiprocessing as mp

    root, dm = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # rank 0: A A B A, rank 1: C D D C -> step 2 rank 0 hits while rank 1 misses, step 3 the reverse, step 4 both hit
    plan = [[0, 0, 1, 0], [2, 3, 3, 2]]
    mp.spawn(_fsdp_worker, args=(str(root), port, torch.from_numpy(dm.blocks["train"][:4]), plan), nprocs=2)
