"""What users run: the CLI, the training driver and worker loop, evaluation and submission.

Kept free of imports so that `python3 -m jobs.bootstrap` runs on a bare interpreter.
"""
