"""Only adds the lm-eval start-up hook (umim-lm-eval.pth) at the root of the wheel.

All metadata is in pyproject.toml. pyproject cannot place a file at the root of site-packages;
this build step copies ``umim_eval/harness/umim-lm-eval.pth`` there so that a regular install makes
``lm_eval --model umim`` work with no import by the user (see ``umim_eval/harness/lm_eval_hook.py``).
Editable installs do not get it: run ``umim-eval install-lm-eval-hook`` once, or use
``umim-eval lm-eval ...``.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "umim-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join("umim_eval", "harness", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
