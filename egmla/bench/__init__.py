"""Speed benchmarks behind `egmla bench decode|generate|train` (results go to docs/, never into tests)."""
