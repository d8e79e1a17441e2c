"""The run folder, owned here: its files (``layout``), its record and identity (``record``), its lock and
which folder a launch trains in (``lock``), and the finished runs a comparison reads (``results``, ``groups``).
Nothing else in detlib spells a file name of a run folder; ``from detlib import runs`` and ask it."""

from detlib.runs.layout import (  # noqa: F401
    CHECKPOINTS,
    DETECTIONS,
    DIVERGED,
    EVAL_DETAIL,
    EVAL_DIR,
    HPARAMS_RUN,
    HYDRA_DIR,
    LAST,
    LOCK,
    LR_TAG,
    METRICS,
    METRICS_JSONL,
    RECORD,
    TB,
    checkpoints,
    current_tag,
    foreign_files,
    has_diverged,
    is_finished,
    last_checkpoint,
    loss_tag,
)
from detlib.runs.lock import RunDirInUse, RunLock, run_dir, unfinished_run  # noqa: F401
from detlib.runs.record import (  # noqa: F401
    EVAL_ONLY,
    IGNORED,
    SEED,
    RunIdentityError,
    check,
    comparison_identity,
    diff,
    eval_settings,
    file_fingerprint,
    fingerprint,
    flatten,
    hparams,
    identity,
    ignored,
    make_record,
    read_record,
    recorded_classes,
    restore_hydra_files,
    write_record,
)
