"""Out-of-distribution evaluation of a study's fine-tunes with lm-evaluation-harness."""

DEFAULT_TASKS = ("hellaswag", "arc_challenge", "piqa", "winogrande")
# Examples per task by default: HellaSwag's first 1000 validation items, and the whole evaluation split of the
# others (ARC-Challenge's test set, PIQA's and Winogrande's validation sets). A task not named here: all of it.
DEFAULT_LIMITS = {"hellaswag": 1000, "arc_challenge": 1172, "piqa": 1838, "winogrande": 1267}
