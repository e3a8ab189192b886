"""Every exercise's check accepts the right answer, worked out here by hand, and rejects near misses."""

import math

import pytest
import torch

from vitlab.lab.exercises import EXERCISES, check, is_right
from vitlab.model.toy import length_mask

BY_HAND = {  # the notebooks' solutions, computed the way a learner would
    "01.1": (384 // 16) ** 2 + 1,
    "01.2": 32 * 32 * 3,
    "01.3": (1 * 16 + 0) * 3 + 2,
    "02.1": ((224 // 16) ** 2 + 1) * 768,
    "02.2": (1, 1 + (42 // 7) ** 2, 64),
    "02.3": False,
    "03.1": math.exp(2) / (math.exp(2) + 1),
    "03.2": 12 * 197**2,
    "03.3": sum(min(i + 3, 13) - max(i - 3, 0) + 1 for i in range(14)) ** 2 + 2 * 196 + 1,
    "03.4": length_mask(torch.tensor([4, 3, 2]), 4).repeat_interleave(4, dim=0),
    "04.1": (8, 12, 197, 197),
    "04.2": (8, 197, 2304),
    "04.3": math.log(20),
    "04.4": 0.91,
}

WRONG = {  # the likely mistakes
    "01.1": 576,  # the CLS token forgotten
    "01.2": 32 * 32,
    "01.3": (2 * 16 + 1) * 16 + 0,  # the (c p1 p2) order of the conv weight
    "02.1": 196 * 768,
    "02.2": (1, 36, 64),
    "02.3": True,
    "03.1": 0.982,  # not scaled: softmax([4, 0])[0]
    "03.2": 12 * 196**2,
    "03.3": 7789 - 1,
    "03.4": length_mask(torch.tensor([4, 3, 2]), 4).repeat(4, 1),  # AttnGAN's repeat: rows cycle through samples
    "04.1": (8, 12, 196, 196),
    "04.2": (8, 197, 768),
    "04.3": 1 / 20,
    "04.4": 0.9,
}


def test_every_exercise_is_covered():
    assert set(BY_HAND) == set(EXERCISES) == set(WRONG)


@pytest.mark.parametrize("exercise", sorted(EXERCISES))
def test_right_answers_pass_and_near_misses_do_not(exercise, capsys):
    assert check(exercise, BY_HAND[exercise]) is True
    assert capsys.readouterr().out.startswith("Right:")
    assert check(exercise, WRONG[exercise]) is False
    out = capsys.readouterr().out
    assert out.startswith("Not quite:") and "Hint:" in out
    assert check(exercise, None) is False
    assert capsys.readouterr().out.startswith("Not answered yet:")


def test_answers_of_the_wrong_type_are_wrong_not_errors():
    assert not is_right("02.2", 37)  # not a tuple
    assert not is_right("03.1", "0.88")  # a string
    assert not is_right("02.3", 0)  # 0 is not False's answer
    assert not is_right("01.1", True)
    assert not is_right("03.4", [[True]])


def test_an_unknown_exercise_is_named():
    with pytest.raises(ValueError, match="'09.9'"):
        check("09.9", 1)
