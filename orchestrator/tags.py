"""The MLflow tags sweetspot writes on a study's runs: one place, read by the quick commands
(``status``, ``table``) without importing the tracking module, which pulls in Ray Tune and torch."""

TAG_KIND = "sweetspot.kind"  # "study" (the parent run) or "trial"
TAG_STUDY = "sweetspot.study"
TAG_HASH = "sweetspot.trial_hash"  # a trial's identity across runs
TAG_NAME = "sweetspot.trial_name"
TAG_SEED = "sweetspot.seed"
TAG_ERROR = "sweetspot.error"  # a failed trial's error text (its tail; the whole text is error.txt)
TAG_AXIS = "sweetspot.axis."  # + the axis name: the trial's value on it
TAG_PARENT = "mlflow.parentRunId"
TAG_INIT_CHECKPOINT = "sweetspot.init_checkpoint"
TAG_INIT_TRIAL = "sweetspot.init_trial"
TAG_STOPPED_EARLY = "sweetspot.stopped_early"  # "true": FINISHED before its last epoch, by design
TAG_STOP_REASON = "sweetspot.stop_reason"
TAG_STOP_WARNING = "sweetspot.stop_warning"
TAG_CHECKPOINT_FALLBACK = "sweetspot.checkpoint_fallback"  # a resume skipped checkpoints that did not load
