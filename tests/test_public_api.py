"""Every name in ``__all__`` imports, and every public module says what it is for."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import acl
import dualmem


@pytest.mark.parametrize("package", [acl, dualmem])
def test_all_names_import(package: object) -> None:
    for name in package.__all__:  # type: ignore[attr-defined]
        assert getattr(package, name) is not None, name


@pytest.mark.parametrize("package", [acl, dualmem])
def test_modules_have_a_purpose_and_public_functions_have_docstrings(package: object) -> None:
    for info in pkgutil.iter_modules(package.__path__):  # type: ignore[attr-defined]
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")  # type: ignore[attr-defined]
        assert module.__doc__ and module.__doc__.strip(), module.__name__
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if callable(obj):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"
