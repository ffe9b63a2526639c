"""nanopost.studies.overopt's arithmetic: the trailing mean and the verdict, on curves whose answer is known."""

import pytest

from nanopost.config import UserError
from nanopost.studies.overopt import main, smoothed, verdict


def curve(proxy, gold, kl):
    return dict(step=list(range(1, len(gold) + 1)), proxy_smooth=proxy, gold_smooth=gold, kl_smooth=kl)


def test_smoothed_is_a_trailing_mean():
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([2.0, 4.0], 5) == [2.0, 3.0]


def test_verdict_sees_gold_rise_then_fall_under_a_rising_proxy():
    v = verdict(curve([0.0, 0.5, 1.0, 1.5], [0.5, 0.8, 0.6, 0.3], [0.0, 1.0, 2.0, 4.0]))
    assert v["overoptimized"] and v["peak_step"] == 2 and v["gold_peak"] == 0.8 and v["kl_at_peak"] == 1.0
    assert v["proxy_at_peak"] == 0.5 and v["proxy_end"] == 1.5
    # gold that only falls did not rise first; gold that rises to the end was not over-optimized
    assert not verdict(curve([0.0, 0.5, 1.0], [0.6, 0.3, 0.1], [0.0, 1.0, 2.0]))["overoptimized"]
    assert not verdict(curve([0.0, 0.5, 1.0], [0.3, 0.5, 0.7], [0.0, 1.0, 2.0]))["overoptimized"]


@pytest.mark.parametrize("arg, what", [("--kl_coefs=a,b", "expected comma-separated numbers"),
                                       ("--kl_coefs=-1", "every value must be >= 0"),
                                       ("--base=nope.pt", "no such checkpoint"),
                                       ("--ppo_iters=0", "--ppo_iters=0"), ("--smooth=0", "--smooth=0")])
def test_bad_input_is_one_line(tmp_path, arg, what):
    with pytest.raises(UserError, match=what):
        main([f"--out_dir={tmp_path}", arg])
