"""`convflow` whose tune trial 1 runs out of memory, for the tune tests:

    python tests/oom_trial_convflow.py tune tiny -f pipelines.yaml ...

wraps the train_model that tune trials call so that trial 1 raises TensorFlow's out-of-memory error
(ResourceExhaustedError) as its training starts. The seam is installed here, in the test process.
"""

from __future__ import annotations

from convflow.cli import app as cli
from convflow.tasks import tune_trial

FAILING_TRIAL = "1"


def run_out_of_memory_in_one_trial() -> None:
    train_model = tune_trial.train_model

    def failing_train_model(wrapped, tfrecords, settings, checkpoint_dir, *args, **kwargs):
        if checkpoint_dir.parent.name == FAILING_TRIAL:
            import tensorflow as tf

            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (the test's)")
        return train_model(wrapped, tfrecords, settings, checkpoint_dir, *args, **kwargs)

    tune_trial.train_model = failing_train_model


if __name__ == "__main__":
    run_out_of_memory_in_one_trial()
    cli.run_command()
