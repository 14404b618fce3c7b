from egmla.stats import runs_apart


def test_runs_apart_says_whether_every_run_of_one_side_is_beyond_the_other():
    assert runs_apart([1.0, 1.1], [1.2, 1.3]) == "yes"
    assert runs_apart([1.2, 1.3, 1.25], [1.0, 1.1]) == "yes"  # either side may be the larger
    assert runs_apart([1.0, 1.2], [1.1, 1.3]) == "no"  # ranges overlap: the medians differ within the spread
    assert runs_apart([1.0, 1.1], [1.1, 1.2]) == "no"  # a tie at the edge is not apart
    assert runs_apart([1.0], [2.0, 2.1]) == "1 run"
