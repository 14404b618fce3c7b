"""Speed and memory benchmarks behind `egmla bench ...` (egmla/bench/cli.py lists them); their results go to
--out and, when kept, to docs/ — never into tests."""
