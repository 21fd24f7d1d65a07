"""Bad-input cases of train.py for tests/test_bad_inputs.py (the layout of its CASES:
(case, entry point, overrides, the message it must give))."""

TRAIN_CASES: list[tuple[str, str, list[str], str]] = []
