import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from siclip.blocks import PreLNBlock, SASPBlock, SharingPlan, apply_sharing, count_parameters, plan_sharing
from siclip.blocks.sharing import plan_brute_force, plan_cost, plan_optimal, plan_threshold

from helpers import randomize_


def _stack(n=4, dim=16, heads=2, cls=SASPBlock):
    return nn.ModuleList(randomize_(cls(dim, heads)) for _ in range(n))


def test_plan_validation_and_fixed_strategies():
    assert SharingPlan.from_sizes([2, 2]).groups == ((0, 1), (2, 3))
    assert plan_sharing("none", 3).groups == ((0,), (1,), (2,))
    assert plan_sharing("all", 3).groups == ((0, 1, 2),)
    assert plan_sharing("adjacent", 5).groups == ((0, 1), (2, 3), (4,))
    assert SharingPlan.from_sizes([1, 3]).owner(3) == 1
    for bad in [((0, 2), (1,)), ((1, 2),), ((0,), ()), ()]:
        with pytest.raises(ValueError, match="runs of adjacent blocks"):
            SharingPlan(bad)


def test_threshold_strategy():
    d = [0.1, 0.5, 0.05, 0.02, 0.9]
    assert plan_threshold(d, 0.2).groups == ((0, 1), (2, 3, 4), (5,))
    assert plan_threshold(d, 0.2, max_group_size=2).groups == ((0, 1), (2, 3), (4,), (5,))
    matrix = np.zeros((6, 6))
    matrix[np.arange(5), np.arange(1, 6)] = d
    matrix = matrix + matrix.T
    assert plan_threshold(matrix, 0.2) == plan_threshold(d, 0.2)


@pytest.mark.parametrize("n", [2, 3, 5, 7])
@pytest.mark.parametrize("form", ["vector", "matrix"])
def test_optimal_partition_equals_brute_force(seed, n, form):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        if form == "vector":
            d = rng.random(n - 1)
        else:
            a = rng.random((n, n))
            d = a + a.T
            np.fill_diagonal(d, 0)
        for k in range(1, n + 1):
            plan = plan_optimal(d, k)
            _, best = plan_brute_force(d, k)
            assert plan.num_groups <= k
            assert plan_cost(d, plan) == pytest.approx(best, abs=1e-12)


def test_optimal_picks_the_obvious_split():
    # Blocks 0-1 and 2-3 are near-identical, 1-2 far apart.
    assert plan_optimal([0.01, 5.0, 0.02], 2).groups == ((0, 1), (2, 3))
    assert plan_sharing("optimal", 4, [0.01, 5.0, 0.02], max_groups=2).groups == ((0, 1), (2, 3))


def test_strategy_errors():
    with pytest.raises(ValueError, match="needs measured divergences"):
        plan_sharing("optimal", 4)
    with pytest.raises(ValueError, match="describe 3 blocks but the stack has 4"):
        plan_sharing("threshold", 4, [0.1, 0.2], threshold=0.1)
    with pytest.raises(ValueError, match="unknown sharing strategy"):
        plan_sharing("random", 4)
    with pytest.raises(ValueError, match="non-negative"):
        plan_optimal([0.1, -1.0], 2)
    with pytest.raises(ValueError, match="symmetric"):
        plan_optimal(np.array([[0, 1.0], [2.0, 0]]), 1)


@pytest.mark.parametrize("scope", ["block", "attention"])
@pytest.mark.parametrize("cls", [SASPBlock, PreLNBlock])
def test_shared_blocks_share_storage_and_count_drops_as_computed(seed, scope, cls):
    blocks = _stack(cls=cls)
    one_block = count_parameters(blocks[0])
    one_attn = count_parameters(blocks[0].attn)
    plan = SharingPlan.from_sizes([2, 2])
    report = apply_sharing(blocks, plan, scope=scope)
    per_copy = one_block if scope == "block" else one_attn
    assert report.params_before == 4 * one_block
    assert report.params_saved == 2 * per_copy == report.params_before - count_parameters(blocks)
    for a, b in [(0, 1), (2, 3)]:
        shared = blocks[a] if scope == "block" else blocks[a].attn
        other = blocks[b] if scope == "block" else blocks[b].attn
        for pa, pb in zip(shared.parameters(), other.parameters()):
            assert pa.data_ptr() == pb.data_ptr()
    assert blocks[1].mlp.fc1.weight.data_ptr() != blocks[2].mlp.fc1.weight.data_ptr()
    if scope == "attention":
        assert blocks[0].mlp.fc1.weight.data_ptr() != blocks[1].mlp.fc1.weight.data_ptr()
    assert "-" in str(report) and f"{report.params_saved:,}" in str(report)


def test_gradients_accumulate_over_every_use(seed):
    """A block used twice gets the sum of the gradients of two independent copies of itself."""
    base = randomize_(SASPBlock(16, 2)).double()
    shared = nn.ModuleList([base, copy.deepcopy(base)])
    apply_sharing(shared, SharingPlan.from_sizes([2]))
    untied = nn.ModuleList([copy.deepcopy(base), copy.deepcopy(base)])
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for stack in (shared, untied):
        y = x
        for block in stack:
            y = block(y)
        y.pow(2).sum().backward()
    for (name, p), q0, q1 in zip(shared[0].named_parameters(), untied[0].parameters(), untied[1].parameters()):
        torch.testing.assert_close(p.grad, q0.grad + q1.grad, msg=name)


def test_merge_mean_starts_from_the_average(seed):
    blocks = _stack(3)
    expected = torch.stack([b.mlp.fc1.weight.detach().clone() for b in blocks]).mean(0)
    apply_sharing(blocks, SharingPlan.from_sizes([3]), merge="mean")
    torch.testing.assert_close(blocks[2].mlp.fc1.weight.detach(), expected)


def test_sharing_errors():
    blocks = _stack(4)
    with pytest.raises(ValueError, match="covers 3 blocks but the stack has 4"):
        apply_sharing(blocks, SharingPlan.from_sizes([3]))
    mixed = nn.ModuleList([SASPBlock(16, 2), SASPBlock(32, 2)])
    with pytest.raises(ValueError, match="differ in layout"):
        apply_sharing(mixed, SharingPlan.from_sizes([2]))
    with pytest.raises(ValueError, match="unknown sharing scope"):
        apply_sharing(blocks, SharingPlan.from_sizes([4]), scope="mlp")
    with pytest.raises(AttributeError, match="no attention submodule 'mixer'"):
        apply_sharing(blocks, SharingPlan.from_sizes([4]), scope="attention", attention_attr="mixer")
    with pytest.raises(TypeError, match="nn.ModuleList"):
        apply_sharing(list(blocks), SharingPlan.from_sizes([4]))


def test_shared_stack_survives_a_state_dict_round_trip(seed):
    blocks = _stack(4)
    apply_sharing(blocks, SharingPlan.from_sizes([2, 2]))
    fresh = _stack(4)
    apply_sharing(fresh, SharingPlan.from_sizes([2, 2]))
    fresh.load_state_dict(blocks.state_dict())
    x = torch.randn(1, 3, 16)
    for a, b in itertools.zip_longest(blocks, fresh):
        torch.testing.assert_close(a(x), b(x))
