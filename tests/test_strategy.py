"""The sharded strategy's layout (FSDP2 on CPU, one gloo process): decoder layers and an untied
embedding/head are sharded; a tied embedding/head stays one replicated tensor, so calling the
embedding alone, again, and then the head (as the report and the chunked loss do) works on every
torch version (torch 2.11 left a tied unit sharded once a pass ran only one of its two modules)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from tiny_families import build_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from umim.training.strategy import shard_frozen_lm_module


class _Holder(nn.Module):
    """The shape ``shard_frozen_lm_module`` expects: a frozen ``lm`` beside trainable children."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.merger = nn.Linear(lm.config.hidden_size, lm.config.hidden_size)


@pytest.fixture()
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied"])
def test_layout_and_direct_calls_of_embedding_and_head(family, gloo_world_of_one):
    lm = build_model(family, vocab=97)
    plain = copy.deepcopy(lm).eval()
    holder = _Holder(lm)
    shard_frozen_lm_module(holder, gloo_world_of_one, checkpoint_layers=False)
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    assert all(isinstance(p, DTensor) for p in lm.model.layers[0].parameters())
    assert all(isinstance(p, DTensor) for p in holder.merger.parameters())
    if family == "llama-tied":
        assert head.weight is emb.weight and not isinstance(emb.weight, DTensor)
    else:
        assert isinstance(emb.weight, DTensor) and isinstance(head.weight, DTensor)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        for _ in range(2):  # the embedding alone, twice, then the head alone, then the base model
            torch.testing.assert_close(emb(ids), plain.get_input_embeddings()(ids))
        h = plain.model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(head(h), plain.lm_head(h))
        torch.testing.assert_close(lm.model(input_ids=ids).last_hidden_state, h)


def test_a_torch_without_ignored_params_is_refused_in_one_line(monkeypatch, gloo_world_of_one):
    import torch.distributed.fsdp as fsdp

    from umim.errors import UserError

    def old_fully_shard(module, *, mesh=None, reshard_after_forward=True, mp_policy=None):  # torch 2.6's keywords
        raise AssertionError("not reached")

    monkeypatch.setattr(fsdp, "fully_shard", old_fully_shard)
    with pytest.raises(UserError, match=r"needs torch >= 2\.7 .*--trainer\.strategy ddp"):
        shard_frozen_lm_module(_Holder(build_model("llama-tied", vocab=97)), gloo_world_of_one)
