"""Root pytest configuration: skip collecting ``kdkit.hf`` when its extra is missing.

``--doctest-modules`` imports every module under ``src/kdkit``; ``kdkit.hf`` needs
``transformers`` (``pip install 'kdkit[hf]'``), so without it the package is not
collected (its tests under ``tests/hf/`` skip through ``pytest.importorskip``).
"""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("transformers") else ["src/kdkit/hf/*"]
