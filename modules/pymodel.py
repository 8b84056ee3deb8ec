"""Any Python model: a model file or directory (pickle, joblib, a saved framework model, an MLflow
model directory) plus an entry script with ``init()`` and ``run(inputs)``, as in Azure ML.

The entry script finds the model's files through one environment variable, :data:`MODEL_DIR_ENV`
(``EDGEFLEET_MODEL_DIR``, the bundle's file directory, like ``AZUREML_MODEL_DIR``), read in ``init()``::

    import os, joblib
    def init():
        global model
        model = joblib.load(os.path.join(os.environ["EDGEFLEET_MODEL_DIR"], "model.pkl"))
    def run(inputs):
        return {"label": model.predict(inputs["x"])}

The hub never loads such a model: registering and building only parse the entry script (:func:`check_entry_source`).
Pure code: no I/O beyond what the caller reads.
"""

from __future__ import annotations

import ast
from pathlib import PurePosixPath

from modules.errors import ModelError

MODEL_DIR_ENV = "EDGEFLEET_MODEL_DIR"
KNOWN_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite", ".py": "python"}
PYTHON_HOOKS = ("init", "run")  # the python runtime's entry script
ENTRY_HOOKS = ("preprocess", "postprocess")  # an optional script beside an ONNX/TFLite model


def main_file(paths: list[str]) -> tuple[int, str]:
    """Which of a model's files is its main one, and the model's framework.

    The first ``.onnx``, ``.tflite`` or ``.py`` file is the main one. A model with none of those
    (a pickle, a joblib file, a directory of framework files) is a Python model with no entry
    script yet: framework ``python``, its first file first; ``module build --entry`` supplies the script.
    """
    for i, path in enumerate(paths):
        framework = KNOWN_SUFFIXES.get(PurePosixPath(path).suffix.lower())
        if framework is not None:
            return i, framework
    return 0, "python"


def defined_functions(source: str, filename: str) -> set[str]:
    """Top-level functions a script defines (``def`` or an assignment of a name), found without running it."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        raise ModelError(f"entry script {filename} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):  # run = make_runner(...)
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.ImportFrom, ast.Import)):  # from mylib import run
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


SIGNATURE_NAMES = ("INPUTS", "OUTPUTS")  # what an entry script declares it accepts and returns


def declared_signature(source: str, filename: str) -> dict[str, list[dict[str, object]]]:
    """The ``INPUTS``/``OUTPUTS`` an entry script declares as top-level literals (absent ones left out),
    read without running it: ``INPUTS = [{"name": "frame", "dtype": "uint8", "shape": [None, None, 3]}]``."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        raise ModelError(f"entry script {filename} has a syntax error at line {exc.lineno}: {exc.msg}") from None
    found: dict[str, list[dict[str, object]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id in SIGNATURE_NAMES:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    raise ModelError(f"entry script {filename}: {target.id} must be a literal list of "
                                     '{"name", "dtype", "shape"} (it is read without running the script)') from None
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise ModelError(f"entry script {filename}: {target.id} must be a list of "
                                     '{"name", "dtype", "shape"}')
                found[target.id] = value
    return found


def check_entry_source(source: str, filename: str, runtime: str) -> None:
    """Refuse an entry script that cannot serve ``runtime``: a syntax error, or missing hooks.

    The python runtime needs ``init`` and ``run``; beside an ONNX/TFLite model the script needs
    ``preprocess`` and/or ``postprocess``. The script is parsed, never executed.
    """
    names = defined_functions(source, filename)
    if runtime == "python":
        missing = [h for h in PYTHON_HOOKS if h not in names]
        if missing:
            raise ModelError(f"entry script {filename} defines no {' and no '.join(f'{m}()' for m in missing)}: "
                             "a python module's entry script needs init() and run(inputs)")
    elif not names & set(ENTRY_HOOKS):
        raise ModelError(f"entry script {filename} defines neither preprocess() nor postprocess() for the "
                         f"{runtime} model (init()/run() scripts need --runtime python)")
