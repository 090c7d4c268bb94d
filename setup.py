# The libslirp binding is a cffi API-mode extension, compiled at install time.
# setuptools has no pyproject.toml key for cffi_modules, hence this file.
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_commit(build_py):
    """Record the git commit in the installed nsnet/_buildinfo.py (for -v)."""

    def run(self):
        super().run()
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        # From the source, not from the copy in build/: build_py does not
        # copy over a build/ file newer than its source, so a copy stamped
        # by an earlier build would keep that build's commit.
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "nsnet", "_buildinfo.py")) as f:
            text = f.read()
        target = os.path.join(self.build_lib, "nsnet", "_buildinfo.py")
        if commit and os.path.exists(target):
            with open(target, "w") as f:
                f.write(text.replace('COMMIT = ""', f'COMMIT = "{commit}"', 1))


setup(
    cffi_modules=[
        "nsnet/_slirp_build.py:ffibuilder",
        "nsnet/_seccomp_build.py:ffibuilder",
        "nsnet/_relay_build.py:ffibuilder",
        "nsnet/_linux_build.py:ffibuilder",
        "nsnet/_bypass_build.py:ffibuilder",
    ],
    cmdclass={"build_py": build_py_with_commit},
    # generated from the option table (nsnet/manpage.py; kept in sync by
    # tests/unit/test_option_table.py)
    data_files=[("share/man/man1", ["man/nsnet.1"]),
                ("share/bash-completion/completions", ["completion/nsnet"])],
)
