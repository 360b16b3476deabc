"""File and folder names made from labels: only characters that are safe on every file system and in a shell.

Why: a method label carries its init words (``coop_init-age-estimation:-the-age-of-the-person-is``); as a run
folder or a figure's file name, the colon breaks on some file systems (Windows, SMB shares) and in shell
arguments (``scp host:path``, ``PATH``-like lists). Labels stay as they are in records (``metrics.json``'s
``method``, the report); only the names coopipe writes go through :func:`safe_name`.
"""

from __future__ import annotations

import re

SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]+")  # what a name is made of: letters, digits, '.', '_', '+', '-'
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(label: str) -> str:
    """``label`` without the characters outside :data:`SAFE_NAME` (``a:-b`` -> ``a-b``), never empty or a dot
    name."""
    name = _UNSAFE.sub("", label).replace("--", "-")
    return name if name.strip(".") else "x"


def is_safe_name(name: str) -> bool:
    return bool(SAFE_NAME.fullmatch(name)) and bool(name.strip("."))
