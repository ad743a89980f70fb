"""The names of a run's metrics that more than the module making them reads: the console lines,
the ETA, patience, retention by BLEU. What MLflow shows is the run's public output, so a name is
changed here, once, or not at all."""

TRAIN_LOSS = "train/loss"
TRAIN_PPL = "train/ppl"
TRAIN_LR = "train/lr"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_MFU = "train/mfu"
TRAIN_DATA_WAIT_S = "train/data_wait_s"
TRAIN_STEP_TIME_S = "train/step_time_s"
VALID_LOSS = "valid/loss"
VALID_NLL = "valid/nll"
VALID_PPL = "valid/ppl"
VALID_BLEU = "valid/bleu"
CHECKPOINT_STALL_S = "checkpoint/stall_s"
CHECKPOINT_UPLOAD_S = "checkpoint/upload_s"
# The ranks' own time per 1,000 target tokens (jobs.report.stragglers): a fixed set whatever the world size
OWN_MS_MIN = "train/own_ms_per_ktok/min"
OWN_MS_MEDIAN = "train/own_ms_per_ktok/median"
OWN_MS_MAX = "train/own_ms_per_ktok/max"
SLOWEST_RANK = "train/slowest_rank"
RANK_SKEW = "train/rank_skew"
