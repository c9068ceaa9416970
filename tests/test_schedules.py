import pytest

from trajscope import schedules as S


def test_every_until_at_and_combinators():
    assert S.every(10).steps(35) == [0, 10, 20, 30]
    assert S.every(10, start=5).steps(30) == [5, 15, 25]
    assert S.until(3).steps(10) == [0, 1, 2, 3]
    assert S.at([4, 7]).steps(10) == [4, 7]
    assert (S.every(5) & ~S.at([0])).steps(12) == [5, 10]
    assert (S.until(2) | S.at([9])).steps(12) == [0, 1, 2, 9]
    assert S.never().steps(5) == []
    with pytest.raises(ValueError):
        S.every(0)


def test_logspace_matches_rounded_powers():
    per_decade = 4
    expected = sorted({0} | {round(10 ** (j / per_decade)) for j in range(0, 4 * per_decade + 1)})
    assert S.logspace(per_decade).steps(10_000) == expected


def test_dense_early_counts():
    s = S.dense_early(100, per_decade=20)
    fired = s.steps(10_000)
    assert fired[:101] == list(range(101))
    # 20 per decade: (100, 1000] holds 20 points and (1000, 10000] holds 20 points.
    assert len([t for t in fired if 100 < t <= 1000]) == 20
    assert len([t for t in fired if 1000 < t <= 10_000]) == 20


def test_as_schedule():
    assert S.as_schedule(None).steps(3) == []
    assert S.as_schedule(True).steps(2) == [0, 1, 2]
    assert S.as_schedule(2).steps(4) == [0, 2, 4]
    assert S.as_schedule(lambda t: t == 3).steps(5) == [3]
    with pytest.raises(TypeError):
        S.as_schedule("often")
