"""The end-to-end demo (``kdkit demo``): built-in data, two teachers, CE vs KD students.

scikit-learn and matplotlib (``pip install 'kdkit[demo]'``) are imported only when the
demo runs, and checked before it starts (:func:`~kdkit.demo.run.check_demo_extras`).
"""

from kdkit.demo.run import CONDITIONS, DemoConfig, DemoResult, run_demo

__all__ = ["CONDITIONS", "DemoConfig", "DemoResult", "run_demo"]
