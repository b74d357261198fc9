"""``loss: auto``: the full softmax up to a catalogue size per device, the sampled softmax above."""

from __future__ import annotations

import pytest

from raysrec.models.losses import CE_MAX_ITEMS, resolve_loss


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_is_full_ce_up_to_the_devices_limit_and_sampled_above(device):
    limit = CE_MAX_ITEMS[device]
    if limit:
        assert resolve_loss("auto", limit, device) == "ce"
    assert resolve_loss("auto", limit + 1, device) == "sampled"
    assert resolve_loss("auto", 10_000_000, device) == "sampled"


def test_the_cold_start_protocol_and_an_explicit_loss_are_kept():
    assert resolve_loss("auto", 10_000_000, "cpu", cold_items=True) == "ce"      # the protocol needs the full softmax
    for loss in ("ce", "sampled", "gbce", "bce"):
        assert resolve_loss(loss, 10_000_000, "cpu") == loss
        assert resolve_loss(loss, 10, "cuda") == loss


def test_auto_follows_the_measured_rule_on_cpu():
    """Accuracy first (docs/benchmarks.md, "Choosing the loss"): on Amazon Sports' 18,357 items full CE reached
    1.30x the sampled softmax's test NDCG@10, so a catalogue of that size trains with full CE on CPU."""
    assert resolve_loss("auto", 18_357, "cpu") == "ce"
    assert resolve_loss("auto", 55_368, "cpu") == "sampled"      # the Taobao sample's catalogue: not measured
