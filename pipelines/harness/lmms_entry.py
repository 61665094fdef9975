"""The `lmms_eval.models` entry point (pyproject): how lmms-eval finds the model `zoo` with no import of ours.

Kept apart from the adapter so that lmms-eval listing its models imports nothing of the zoo's
(torch, transformers); the adapter loads only when `--model zoo` is asked for.
"""

from __future__ import annotations

import sys


def filelock_compat() -> None:
    """Let lmms-eval 0.7.3 run with filelock 4.

    lmms-eval's `simple_evaluate` patches `filelock._api.FileLockMeta.__call__` (singleton locks, so
    that nested `datasets` loads cannot deadlock); filelock 4 moved that class to
    `filelock._core._singleton` and dropped `filelock._api`, so every lmms-eval run fails with
    `ModuleNotFoundError: No module named 'filelock._api'`. This registers `filelock._api` as an alias
    of the classes it names, so lmms-eval's patch applies as it does on filelock 3. Nothing happens
    when `filelock._api` exists.
    """
    if "filelock._api" in sys.modules:
        return
    import importlib.util

    try:
        if importlib.util.find_spec("filelock._api") is not None:
            return
    except ModuleNotFoundError:  # no filelock at all: nothing to adapt
        return
    import types

    from filelock._core import BaseFileLock
    from filelock._core._singleton import FileLockMeta

    try:
        from filelock._core._settings import UNSET_FILE_MODE
    except ImportError:  # pragma: no cover - the name moved again
        UNSET_FILE_MODE = -1
    alias = types.ModuleType("filelock._api")
    alias.__doc__ = "moe-zoo's alias of filelock 4's lock classes for lmms-eval 0.7.3 (zoo.pipelines.harness.lmms_entry)"
    alias.BaseFileLock, alias.FileLockMeta, alias._UNSET_FILE_MODE = BaseFileLock, FileLockMeta, UNSET_FILE_MODE
    sys.modules["filelock._api"] = alias


def manifest():
    """lmms-eval's model `zoo` is `zoo.pipelines.harness.lmms_eval_model.ZooLMMS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    filelock_compat()
    return ModelManifest(model_id="zoo", simple_class_path="zoo.pipelines.harness.lmms_eval_model.ZooLMMS")


__all__ = ["filelock_compat", "manifest"]
