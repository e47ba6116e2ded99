"""Out-of-distribution evaluation of a study's fine-tunes with lm-evaluation-harness."""

DEFAULT_TASKS = ("hellaswag", "arc_challenge", "piqa", "winogrande")
