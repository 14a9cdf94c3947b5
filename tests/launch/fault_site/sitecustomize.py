"""Test-only start-up code, on PYTHONPATH only when a test asks for faults (tests.launch.faults):
once `launch.trainer` is imported, its Trainer gets the fault hooks $CDGCNET_TEST_FAULTS names."""

import os

if os.environ.get("CDGCNET_TEST_FAULTS"):
    import importlib.abc
    import importlib.util
    import sys

    class _InstallAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "launch.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_then_install(module) -> None:
                exec_module(module)
                from tests.launch.faults import install

                install(module)

            spec.loader.exec_module = exec_then_install
            return spec

    sys.meta_path.insert(0, _InstallAfterImport())
