"""NormSpec: one options object, one name per meaning, read the same by every entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import MISSING, OmegaConf
from torch import nn

from gnlightning import NormSpec, NormSwap, SyncBatchNormPlugin, convert_norms
from gnlightning.lightning.norm_swap import CHECKPOINT_KEY, _record, read_specs
from gnlightning.schema import NormConfig
from gnlightning.train import built_norm, norm_spec


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32))


def test_a_spec_converts_exactly_like_the_same_keywords() -> None:
    torch.manual_seed(0)
    by_keywords = convert_norms(conv_net(), "gn_ws", num_groups=4, exclude=["4"])
    torch.manual_seed(0)
    by_spec = convert_norms(conv_net(), NormSpec("GN+WS", num_groups=4, exclude="4"))
    assert [type(m).__name__ for m in by_spec] == [type(m).__name__ for m in by_keywords] == [
        "WSConv2d", "GroupNorm", "ReLU", "Conv2d", "BatchNorm2d"]
    assert by_spec[1].num_groups == by_keywords[1].num_groups == 4
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(by_spec(x), by_keywords(x), rtol=0, atol=0)


def test_spec_is_frozen_resolved_and_checked_when_built() -> None:
    spec = NormSpec("GroupNorm", include="backbone")
    assert spec.norm == "gn" and spec.include == ("backbone",) and spec.ws_mode is False
    assert NormSpec("gn_ws").ws_mode == "auto" and NormSpec("gn_ws", ws=False).ws_mode is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_groups = 8
    assert NormSpec.of(spec, num_groups=8) == NormSpec("gn", num_groups=8, include=["backbone"])
    assert repr(NormSpec("gn", num_groups=8)) == "NormSpec('gn', num_groups=8)"
    with pytest.raises(ValueError, match="num_groups must be a positive integer.*got 0"):
        NormSpec("gn", num_groups=0)
    with pytest.raises(TypeError, match="did you mean 'sync_group_size'"):
        NormSpec.of("syncbn", sync_groupsize=2)


def test_one_name_per_meaning_for_group_sizes() -> None:
    with pytest.raises(ValueError, match=r"group_size is channels per group.*sync_group_size=2"):
        NormSpec("syncbn", group_size=2)
    with pytest.raises(ValueError, match="sync_group_size=2 applies to syncbn only"):
        NormSpec("gn", sync_group_size=2)
    assert SyncBatchNormPlugin(sync_group_size=2).spec == NormSpec("syncbn", sync_group_size=2)
    with pytest.raises(ValueError, match="sync_group_size must be a positive integer"):
        SyncBatchNormPlugin(sync_group_size=0)


def test_hydra_norm_node_is_normspec_with_a_name() -> None:
    spec_fields = {f.name: f.default for f in dataclasses.fields(NormSpec)}
    config_fields = {f.name: f.default for f in dataclasses.fields(NormConfig)}
    assert config_fields.pop("name") == MISSING
    spec_fields.pop("norm")
    assert config_fields == spec_fields
    node = OmegaConf.structured(NormConfig(name="SyncBN", sync_group_size=2, include=["a"]))
    spec = norm_spec(node)
    assert spec == NormSpec("syncbn", sync_group_size=2, include=("a",))
    assert built_norm(spec) == NormSpec("bn", include=("a",))  # trained as BN, synchronised by the plugin


def test_checkpoint_records_round_trip_and_old_records_still_load(tmp_path) -> None:
    swap = NormSwap("syncbn", module="model", sync_group_size=2, include=["a", "b"])
    record = _record(swap.targets[0])
    assert record == {"norm": "syncbn", "module": "model",
                      "options": {**NormSpec("syncbn").options(), "sync_group_size": 2, "include": ["a", "b"]}}
    old = {"norm": "syncbn", "module": None, "options": {"group_size": 4, "strict": True}}  # before sync_group_size
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, CHECKPOINT_KEY: [record, old]}, path)
    assert read_specs(path, weights_only=True) == [
        ("model", NormSpec("syncbn", sync_group_size=2, include=("a", "b"))),
        (None, NormSpec("syncbn", sync_group_size=4, strict=True)),
    ]
    restored = NormSwap.from_checkpoint(path)
    assert restored.spec == swap.spec and restored.module == "model" and len(restored.targets) == 2
