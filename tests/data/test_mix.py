import numpy as np
import pytest

from zhllama.config import TrainConfig
from zhllama.data.mix import MixSchedule, parse_source
from zhllama.errors import ZhllamaError
from zhllama.train.loop import tokens_seen


def test_a_source_is_a_folder_with_an_optional_positive_weight():
    assert parse_source("runs/zh").weight == 1.0 and str(parse_source("runs/zh").folder) == "runs/zh"
    source = parse_source("runs/en:0.25")
    assert str(source.folder) == "runs/en" and source.weight == 0.25
    for bad in ("runs/en:0", "runs/en:-1", "runs/en:abc", "runs/en:nan", "runs/en:inf"):
        with pytest.raises(ZhllamaError, match=f"--data {bad}: weight .* is not a positive number"):
            parse_source(bad)


def test_repeat_covers_every_block_and_repeats_small_sources_in_new_orders():
    mix = MixSchedule([500, 50], [0.8, 0.2], seed=3)
    assert len(mix) == 625 and mix.counts.tolist() == [500, 125]  # 50 blocks / 0.2 share would need only 250
    located = [mix.locate(i) for i in range(len(mix))]
    big = [b for s, b in located if s == 0]
    small = [b for s, b in located if s == 1]
    assert sorted(big) == list(range(500))  # every block once
    assert sorted(small[:50]) == sorted(small[50:100]) == list(range(50))  # whole passes over the small source
    assert small[:50] != small[50:100] and len(set(small[100:])) == 25  # each pass in its own order


def test_stop_never_repeats_a_block():
    mix = MixSchedule([500, 50], [0.8, 0.2], seed=3, exhausted="stop")
    assert len(mix) == 250 and mix.counts.tolist() == [200, 50]
    located = [mix.locate(i) for i in range(len(mix))]
    assert len(set(located)) == 250


@pytest.mark.parametrize("weights", [[0.8, 0.2], [1, 1, 2], [0.05, 0.95]])
def test_realised_shares_follow_the_weights_over_enough_blocks(weights):
    mix = MixSchedule([300, 7, 1000][: len(weights)], weights, seed=0)
    cfg, counts = TrainConfig(batch_size=16, seed=0), np.full(len(mix), 64)
    groups = mix.source_of(np.arange(len(mix)))
    for steps in (200, 333):  # 3,200 and 5,328 blocks, across epochs of the mix
        seen = tokens_seen(steps, cfg, 1, counts, groups)
        shares = seen / seen.sum()
        assert np.abs(shares - np.asarray(weights) / sum(weights)).max() <= 0.02, shares


def test_the_same_seed_gives_the_same_mix_and_another_seed_another():
    a, b, c = (MixSchedule([40, 30], [1, 1], seed) for seed in (1, 1, 2))
    assert [a.locate(i) for i in range(len(a))] == [b.locate(i) for i in range(len(b))]
    assert [a.locate(i) for i in range(len(a))] != [c.locate(i) for i in range(len(c))]
