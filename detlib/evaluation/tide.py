"""TIDE (Bolya et al., ECCV 2020): which kinds of error cost a detector its AP, by the ``tidecv`` package.

Each main error type's ``dAP`` is the AP50 gained by fixing only that type with an oracle (TIDE's
definitions, IoU thresholds foreground 0.5 and background 0.1):

* ``Cls``: localised right (IoU >= 0.5) but the wrong class;
* ``Loc``: the right class, localised between 0.1 and 0.5 IoU (the error a box loss should move);
* ``Both``: the wrong class and badly localised;  ``Dupe``: a second detection of an already found object;
* ``Bkg``: on background (IoU < 0.1 with every object);  ``Miss``: an object never detected.

The special errors ``FalsePos`` and ``FalseNeg`` fix all false positives or all misses at once. tidecv's
own COCO loader needs segmentation fields that box datasets lack, so the data are passed to it directly
from pycocotools' objects.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

log = logging.getLogger(__name__)

ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
_missing_warned = False  # one warning per process, not one per evaluation


def tide_errors(E: Any) -> dict | None:
    """TIDE's decomposition of an evaluated ``COCOeval`` ``E`` (its ground truth and detections, not its
    settings): ``{"AP50": TIDE's AP50, "dAP": {type: dAP}, "special": {FalsePos, FalseNeg}, "count": {type: n}}``,
    AP values as fractions in [0, 1] like the COCO stats; None where tidecv cannot compute it or is not
    installed (an optional analysis never stops a finished run from writing its metrics)."""
    global _missing_warned
    try:
        from tidecv import TIDE
        from tidecv.data import Data
    except ImportError as e:
        if not _missing_warned:
            log.warning("TIDE left out: tidecv cannot be imported (%s); install it for the error decomposition", e)
            _missing_warned = True
        return None

    gt, dt = Data("gt"), Data("dt")
    for img in E.cocoGt.dataset["images"]:
        gt.add_image(img["id"], str(img["id"]))
    for cat in E.cocoGt.dataset["categories"]:
        gt.add_class(cat["id"], cat["name"])
    for a in E.cocoGt.dataset["annotations"]:
        (gt.add_ignore_region if a.get("iscrowd") else gt.add_ground_truth)(a["image_id"], a["category_id"], a["bbox"])
    dt_anns = E.cocoDt.dataset.get("annotations", [])
    for d in dt_anns:
        dt.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    tide = TIDE()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tide.evaluate(gt, dt, mode=TIDE.BOX, name="run")
            main, special = tide.get_main_errors()["run"], tide.get_special_errors()["run"]
    except ZeroDivisionError:  # tidecv's mAP of an empty fixed set (e.g. no detections of any class)
        log.warning("TIDE is undefined for these detections (%d of them): left out", len(dt_anns))
        return None
    counts = {e.short_name: n for e, n in tide.runs["run"].count_errors().items()}
    return {"AP50": tide.runs["run"].ap / 100, "dAP": {k: main[k] / 100 for k in ERRORS},
            "special": {k: v / 100 for k, v in special.items()}, "count": {k: counts.get(k, 0) for k in ERRORS}}
