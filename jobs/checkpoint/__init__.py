"""The checkpoint component: it owns the format and every rule about checkpoints.

- files.py:  the format (each rank's DeepSpeed shard, data position and RNG state, completion
             markers with sha256), saving, completeness, verification before anything is
             unpickled, listing, download and conversion to DeepSpeed's universal format;
- resume.py: the resume plan the driver computes once before the cluster starts (which
             checkpoint, resize, compatibility of the saved config with the new one) and the
             rules the workers follow to restore from it;
- upload.py: a rank's upload of its staged part while training goes on;
- `to_average`: which checkpoints the export averages. Retention is Ray Train's
  CheckpointConfig(num_to_keep=train.keep_checkpoints), set by the driver.
"""

from jobs.checkpoint.files import (
    DEEPSPEED_DIR, DEEPSPEED_TAG, JOB_STATE, CheckpointError, JobState, RankState, checkpoint_dir_name, is_complete,
    latest_complete_checkpoint, list_checkpoints, load_engine_state, load_rank_state, local_copy, read_job_state,
    save_checkpoint, universal_copy, verify,
)
from jobs.checkpoint.upload import Uploads
from jobs.checkpoint.resume import (
    FIXED_ON_RESUME, ResumePlan, check_compatible, plan_resume, rank_start, reshard_of, resume_source,
)


def to_average(run_uri: str, count: int) -> list[str]:
    """The last `count` complete checkpoints of a run, oldest first: what the export averages."""
    complete = [uri for uri in list_checkpoints(run_uri) if is_complete(uri)]
    if not complete:
        raise CheckpointError(f"{run_uri}: training produced no complete checkpoint")
    return complete[-count:]


__all__ = [
    "DEEPSPEED_DIR", "DEEPSPEED_TAG", "JOB_STATE", "FIXED_ON_RESUME", "CheckpointError", "JobState", "RankState",
    "ResumePlan", "check_compatible", "checkpoint_dir_name", "is_complete", "latest_complete_checkpoint",
    "list_checkpoints", "load_engine_state", "load_rank_state", "local_copy", "plan_resume", "rank_start",
    "read_job_state", "reshard_of", "resume_source", "save_checkpoint", "to_average", "universal_copy", "Uploads", "verify",
]
