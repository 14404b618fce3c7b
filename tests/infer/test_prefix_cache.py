"""PrefixTable (egmla/infer/prefix_cache.py): after any sequence of row updates and moves, its index finds what a
scan of every row finds."""
import random

from egmla.infer.prefix_cache import PrefixTable, common_prefix


def scan(prefixes, prompt, free, minimum):
    """The rule, by comparing the prompt with every row."""
    best, source = 0, None
    for row, prefix in enumerate(prefixes):
        shared = 0
        while shared < min(len(prompt) - 1, len(prefix)) and prompt[shared] == prefix[shared]:
            shared += 1
        if shared > best or (shared == best and shared and row in free and source not in free):
            best, source = shared, row
    return (best, source) if best >= minimum and len(prompt) > minimum else (0, None)


def test_the_index_agrees_with_a_scan_after_sets_and_moves():
    rng = random.Random(0)
    stems = [tuple(rng.randrange(1, 9) for _ in range(8)) for _ in range(3)]
    for trial in range(200):
        rows, minimum = rng.randrange(1, 10), rng.randrange(1, 4)
        table, plain = PrefixTable(rows, minimum), [()] * rows
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.7:
                row = rng.randrange(rows)
                prefix = rng.choice(stems)[: rng.randrange(0, 9)] + tuple(rng.randrange(1, 9) for _ in range(rng.randrange(2)))
                table[row], plain[row] = prefix, prefix
            else:  # a permutation of some rows, as a compaction or a swap moves them
                sources = rng.sample(range(rows), rng.randrange(1, rows + 1))
                targets = rng.sample(sources, len(sources))
                values = [plain[r] for r in sources]
                for r, value in zip(targets, values):
                    plain[r] = value
                table.move(sources, targets)
            assert list(table) == plain
            prompt = rng.choice(stems)[: rng.randrange(1, 9)] + (rng.randrange(1, 9),)
            free = rng.sample(range(rows), rng.randrange(0, rows + 1))
            assert table.longest(prompt, free) == scan(plain, prompt, free, minimum), trial
        indexed = {row for rows_of_key in table._index.values() for row in rows_of_key}
        assert indexed == {r for r, p in enumerate(plain) if len(p) >= minimum}  # no stale entry left behind


def test_without_a_minimum_nothing_is_indexed_or_reused():
    table = PrefixTable(2, 0)
    table[0] = (1, 2, 3, 4)
    assert table.longest((1, 2, 3, 4, 5), [1]) == (0, None) and not table._index


def test_common_prefix_stops_at_its_limit_and_refuses_short_matches():
    assert common_prefix((1, 2, 3, 4), (1, 2, 3, 9), limit=10) == 3
    assert common_prefix((1, 2, 3, 4), (1, 2, 3, 4), limit=2) == 2
    assert common_prefix((1, 2, 5), (1, 2, 3), limit=10, minimum=3) == 0
