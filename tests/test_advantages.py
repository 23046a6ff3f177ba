import pytest
import torch

from ponder.rl.advantages import EPS, advantages


def test_group_std_matches_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 5.0]])
    a = advantages(r, "group_std")
    # group 1: mean .5, population std .5; group 2: mean 2.75, std sqrt(3*.5625+5.0625)/2 = 1.299
    h = 0.5 / (0.5 + EPS)
    assert a[0].tolist() == pytest.approx([h, -h, -h, h])
    std2 = (3 * 0.75**2 + 2.25**2) ** 0.5 / 2
    assert a[1].tolist() == pytest.approx([-0.75 / (std2 + EPS)] * 3 + [2.25 / (std2 + EPS)])


@pytest.mark.parametrize("mode", ["group_std", "batch_std", "none", "rloo"])
def test_uniform_group_gives_zero_advantage(mode):
    # 0.7 and 0.1 are not dyadic: their float mean is off by a rounding error that std scaling would blow up
    r = torch.tensor([[0.7] * 8, [0.1] * 8, [1.0, 0, 0, 0, 0, 0, 0, 0]])
    a = advantages(r, mode)
    assert a[:2].abs().max().item() == 0.0
    assert a[2].abs().max().item() > 0.1  # the group with a difference still has its signal


def test_dr_grpo_none_is_centred_only():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    assert advantages(r, "none").tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_rloo_subtracts_mean_of_the_others():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3
    assert advantages(r, "rloo")[0].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_batch_std_scales_by_the_whole_batch():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # centred per group: [.5, -.5], [0, 0]; std of [1, 0, 1, 1] = sqrt(.1875)
    s = 0.1875**0.5
    assert advantages(r, "batch_std").flatten().tolist() == pytest.approx([0.5 / (s + EPS), -0.5 / (s + EPS), 0.0, 0.0])


def test_batch_std_given_by_the_caller_replaces_the_local_std():
    """With several ranks the std is of the whole batch (other ranks' groups too), passed in as batch_std: the local
    rewards' std (here 0.5) must not be used in its place."""
    r = torch.tensor([[1.0, 0.0]])
    a = advantages(r, "batch_std", batch_std=2.0)
    assert a.flatten().tolist() == pytest.approx([0.5 / (2.0 + EPS), -0.5 / (2.0 + EPS)])
