"""The ``lmms_eval.models`` entry point: tells lmms-eval that ``--model ptp_ros`` is
``ptp_ros.integrations.lmms.PTPRos``.

lmms-eval loads every entry point of the group each time it starts, whatever model is asked for, so this
module imports nothing heavy: the model class (and torch, transformers, the adapters) is imported only
when ``--model ptp_ros`` is used.
"""

from __future__ import annotations

MODEL_ID = "ptp_ros"
CLASS_PATH = "ptp_ros.integrations.lmms.PTPRos"


def manifest():
    """lmms-eval's ``ModelManifest`` for ``--model ptp_ros`` (a callable payload: see
    ``lmms_eval.models.registry_v2.ModelRegistryV2.load_entrypoint_manifests``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
