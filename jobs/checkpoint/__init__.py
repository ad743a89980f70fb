"""The checkpoint component: it owns the format and every rule about checkpoints.

- files.py:  the format (each rank's DeepSpeed shard, data position and RNG state, completion
             markers with sha256, signed), saving, completeness, verification before anything is
             unpickled, listing, download and conversion to DeepSpeed's universal format;
- signing.py: who wrote a checkpoint or export (an HMAC under the account's key);
- resume.py: the resume plan the driver computes once before the cluster starts (which
             checkpoint, resize, compatibility of the saved config with the new one) and the
             rules the workers follow to restore from it (a rank's start and save, which build and
             check DeepSpeed engines, are the training loop's: jobs/train/start.py, save.py);
- upload.py: a rank's upload of its staged part while training goes on;
- retention.py: which checkpoints Ray Train keeps (the newest, or the best by valid BLEU), those
             it never registered, and which the export averages.

This module exports what the rest of aiayn uses; the modules above use each other directly.
"""

from jobs.checkpoint.files import (
    AVERAGE,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    JOB_STATE,
    CheckpointError,
    JobState,
    RankState,
    checkpoint_dir_name,
    is_complete,
    list_checkpoints,
    load_engine_state,
    load_rank_state,
    load_weight_average,
    local_copy,
    read_job_state,
    save_checkpoint,
    saved_weight_average,
    signed_checkpoints,
    verify,
    weights_only_loads,
)
from jobs.checkpoint.resume import (
    ResumePlan,
    attempt_source,
    check_compatible,
    plan_resume,
    reshard_of,
    resume_source,
)
from jobs.checkpoint.retention import checkpoint_config, scores_of, to_average, untracked
from jobs.checkpoint.signing import Signer
from jobs.checkpoint.upload import Uploads

__all__ = [
    "AVERAGE", "DEEPSPEED_DIR", "DEEPSPEED_TAG", "JOB_STATE", "CheckpointError", "JobState", "RankState",
    "ResumePlan", "attempt_source", "check_compatible", "checkpoint_config", "checkpoint_dir_name", "is_complete",
    "list_checkpoints", "load_engine_state", "load_rank_state", "load_weight_average", "local_copy", "plan_resume",
    "read_job_state", "reshard_of", "resume_source", "save_checkpoint", "saved_weight_average", "scores_of", "Signer", "signed_checkpoints", "to_average", "untracked", "Uploads", "verify", "weights_only_loads",
]
