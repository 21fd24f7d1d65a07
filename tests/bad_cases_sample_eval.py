"""Bad-input cases of sample.py and eval.py for tests/test_bad_inputs.py (the layout of its
CASES: (case, entry point, overrides, the message it must give))."""

SAMPLE_EVAL_CASES: list[tuple[str, str, list[str], str]] = []
